"""U^2-Net (Qin et al., 2020, "U2-Net: Going Deeper with Nested U-Structure for Salient Object Detection"):
the published full-size architecture (RSU-7/6/5/4/4F blocks, six side outputs, fused d0), about 44M
parameters, as rembg's u2net.onnx. Used by bench/bg.py with random weights, because the real weights
are on GitHub, which this machine cannot reach. Exported with u2net's I/O: `input.1` [N,3,320,320] ->
d0..d6 [N,1,320,320] sigmoid maps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class REBNCONV(nn.Module):
    """3x3 conv (dilated) + batch norm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _up(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of height L (RSU-7, -6, -5, -4): a small U-Net whose output is added to its input conv."""

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.enc = nn.ModuleList([REBNCONV(out_ch, mid_ch)] + [REBNCONV(mid_ch, mid_ch) for _ in range(height - 2)])
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.bottom = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.dec = nn.ModuleList(
            [REBNCONV(mid_ch * 2, mid_ch) for _ in range(height - 2)] + [REBNCONV(mid_ch * 2, out_ch)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = []
        hx = hxin
        for i, conv in enumerate(self.enc):
            hx = conv(hx)
            skips.append(hx)
            if i < len(self.enc) - 1:
                hx = self.pool(hx)
        hx = self.bottom(hx)
        for i, conv in enumerate(self.dec):
            skip = skips[-1 - i]
            if i > 0:
                hx = _up(hx, skip)
            hx = conv(torch.cat((hx, skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: the dilated variant used at low resolution (no pooling; dilations 1, 2, 4, 8)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, 1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, 2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, 4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, 8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, 4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, 2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2NET(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 1) -> None:
        super().__init__()
        self.stage1 = RSU(7, in_ch, 32, 64)
        self.stage2 = RSU(6, 64, 32, 128)
        self.stage3 = RSU(5, 128, 64, 256)
        self.stage4 = RSU(4, 256, 128, 512)
        self.stage5 = RSU4F(512, 256, 512)
        self.stage6 = RSU4F(512, 256, 512)
        self.stage5d = RSU4F(1024, 256, 512)
        self.stage4d = RSU(4, 1024, 128, 256)
        self.stage3d = RSU(5, 512, 64, 128)
        self.stage2d = RSU(6, 256, 32, 64)
        self.stage1d = RSU(7, 128, 16, 64)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.side = nn.ModuleList(nn.Conv2d(c, out_ch, 3, padding=1) for c in (64, 64, 128, 256, 512, 512))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hx1 = self.stage1(x)
        hx2 = self.stage2(self.pool(hx1))
        hx3 = self.stage3(self.pool(hx2))
        hx4 = self.stage4(self.pool(hx3))
        hx5 = self.stage5(self.pool(hx4))
        hx6 = self.stage6(self.pool(hx5))
        hx5d = self.stage5d(torch.cat((_up(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_up(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_up(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_up(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_up(hx2d, hx1), hx1), 1))
        d1 = self.side[0](hx1d)
        ds = [d1] + [_up(s(h), d1) for s, h in zip(self.side[1:], (hx2d, hx3d, hx4d, hx5d, hx6), strict=True)]
        d0 = self.outconv(torch.cat(ds, 1))
        return tuple(torch.sigmoid(d) for d in (d0, *ds))


def export_u2net(path: Path, seed: int = 0) -> int:
    """Export a randomly initialised U2NET to ONNX (dynamic batch). Returns the parameter count."""
    torch.manual_seed(seed)
    model = U2NET().eval()
    params = sum(p.numel() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    names = [f"d{i}" for i in range(7)]
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 320, 320),),
            str(tmp),
            input_names=["input.1"],
            output_names=names,
            dynamic_axes={"input.1": {0: "batch_size"}, **{n: {0: "batch_size"} for n in names}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)
    return params


if __name__ == "__main__":
    print(sum(p.numel() for p in U2NET().parameters()))
