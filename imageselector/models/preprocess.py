"""Fast preprocessing: each model's own resize/crop/normalise recipe, as one uint8 resize + a batched normalise.

The reference path is each library's transform per image (open_clip/timm torchvision `Compose`, the hub's
`AutoImageProcessor`). The fast path reads the same parameters from those very objects (never hard-coded),
then per image does a single uint8 resize to the reference's resized size in torch's antialiased
resampler (PIL's algorithm, vectorised: 4-5x faster than PIL's own bicubic here) and slices the centre crop
out of it (other filters: one PIL resize of the crop's region, `resize(box=...)`), keeps uint8 CHW
pixels, and normalises a whole batch at once right before the forward (`Recipe.normalise`). Models whose
geometry is identical (the two CLIPs; the two DINOv2s) share one resize per image (`Recipe.geometry`).
JPEGs are decoded in draft mode (libjpeg's DCT-domain 1/2, 1/4, 1/8 scaling) down to the smallest scale
that still keeps the short side at least `draft_side` pixels: the largest any model's resize needs.
Vectors move a little against the reference (measured in bench/embed.py, docs/embedding.md);
`--preprocess reference` keeps the exact path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODES = ("fast", "reference")
DEFAULT_MODE = "fast"

# torchvision InterpolationMode value / HF PILImageResampling int -> PIL resample filter
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL filters torch resamples the same way on uint8 (antialiased, PIL's kernels and support)
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


@dataclass(frozen=True)
class Geometry:
    """Resize (shortest edge to `short`, or exactly to `size`), then centre-crop `crop` (h, w) if set.

    `crop_round`: torchvision rounds the crop offset, transformers floors it."""

    resample: int
    short: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    crop_round: bool = True

    def resized(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, with the libraries' own rounding."""
        if self.size is not None:
            return self.size[1], self.size[0]
        assert self.short is not None
        if w <= h:
            return self.short, int(self.short * h / w)
        return int(self.short * w / h), self.short

    @property
    def needed_side(self) -> int:
        """The short side a decoded image must keep so the resize only ever shrinks (or keeps) it."""
        return self.short if self.size is None else max(self.size)

    def pixels(self, img: Image.Image, info: dict[str, Any] | None = None) -> torch.Tensor:
        """uint8 [3, H, W]: the resize and centre crop, computed the way the reference computes them.

        `img` is RGB. For a draft-decoded JPEG (`decode` records `draft_scale` and `full_size` in `info`),
        sizes and offsets are computed on the full-size image, as the reference sees it, and mapped into
        the smaller decode, so the crop covers the same part of the photo.

        Bicubic and bilinear run in torch's uint8 antialiased resampler (a port of PIL's own, with AVX2:
        0.5-0.9 ms for a 570x400 photo where PIL's bicubic took 2.3-2.7 ms; outputs equal PIL's up to
        rounding, max 1 grey level): the whole image goes to the reference's resized size, and the crop is
        a slice of it. Other filters use one PIL resize of the region that survives the crop."""
        info = img.info if info is None else info
        scale = int(info.get("draft_scale", 1))
        w, h = info.get("full_size", img.size) if scale > 1 else img.size
        rw, rh = self.resized(w, h)
        ch, cw = self.crop if self.crop is not None else (rh, rw)
        top, left = self._offset(rh - ch), self._offset(rw - cw)
        mode = _TORCH_MODES.get(self.resample)
        if mode is not None:
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]  # HWC memory
            return _resize(x, (rh, rw), (rh * scale / h, rw * scale / w), mode)[
                0, :, top : top + ch, left : left + cw
            ].contiguous()
        sx, sy = w / rw / scale, h / rh / scale
        box = (left * sx, top * sy, min((left + cw) * sx, img.width), min((top + ch) * sy, img.height))
        out = img.resize((cw, ch), self.resample, box=box)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)))

    def _offset(self, d: int) -> int:
        return int(round(d / 2.0)) if self.crop_round else int(d / 2.0)


def _resize(x: torch.Tensor, size: tuple[int, int], factor: tuple[float, float], mode: str) -> torch.Tensor:
    """x [1, 3, h, w] uint8 resampled to `size`, mapping coordinates by `factor` (output/input).

    A draft decode of an odd-sized JPEG has ceil(side/scale) pixels, the last one half outside the photo:
    its real extent is side/scale, so the factor is passed as such rather than recomputed from the sizes
    (0.5 px of stretch otherwise, a visible shift at the far edge)."""
    if (x.shape[2], x.shape[3]) == size:
        return x
    if any(abs(f * n - s) > 1e-9 for f, n, s in zip(factor, x.shape[2:], size, strict=True)):
        y = F.interpolate(x, scale_factor=factor, recompute_scale_factor=False, mode=mode, antialias=True)
        if y.shape[2] >= size[0] and y.shape[3] >= size[1]:  # else floor(n * factor) fell short by rounding
            return y[:, :, : size[0], : size[1]]
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


@dataclass(frozen=True)
class Recipe:
    """A model's whole preprocessing: geometry, then x * scale (1/255) - mean, / std, per channel."""

    geometry: Geometry
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> float32: one conversion, then a multiply and an add in place over the batch
        (2.4x faster than `addcmul` into a fresh tensor here: 0.45 vs 1.1 ms for 8 images at 224)."""
        mul, add = self._affine
        return x.to(torch.float32, copy=True).mul_(mul).add_(add)  # never in place on the caller's tensor

    @functools.cached_property
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        mul = torch.tensor([self.scale / s for s in self.std], dtype=torch.float32).reshape(1, -1, 1, 1)
        add = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=torch.float32)
        return mul, add.reshape(1, -1, 1, 1)


def _filter(name: Any) -> int | None:
    value = getattr(name, "value", name)
    if isinstance(value, str):
        return _PIL_FILTERS.get(value.lower())
    if isinstance(value, int) and value in {int(f) for f in _PIL_FILTERS.values()}:
        return int(value)
    return None


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def from_torchvision(transform: Any) -> Recipe | None:
    """Resize -> CenterCrop -> (RGB) -> ToTensor -> Normalize, as open_clip and timm build them; else None."""
    steps = list(getattr(transform, "transforms", []) or [])
    names = [type(s).__name__ for s in steps]
    if len(steps) < 3 or names[0] != "Resize" or names[-1] != "Normalize" or "ToTensor" not in names[-2]:
        return None
    resize = steps[0]
    resample = _filter(resize.interpolation)
    if resample is None or getattr(resize, "max_size", None) or getattr(resize, "antialias", True) is False:
        return None
    short = size = crop = None
    if isinstance(resize.size, int) or len(resize.size) == 1:
        short = resize.size if isinstance(resize.size, int) else int(resize.size[0])
    else:
        size = _hw(resize.size)
    for s, n in zip(steps[1:-2], names[1:-2], strict=True):
        if n == "CenterCrop" and crop is None:
            crop = _hw(s.size)
        elif not _is_rgb_step(s):
            return None  # a step the fast path does not do
    geo = Geometry(resample=resample, short=short, size=size, crop=crop, crop_round=True)
    if not _crop_fits(geo):
        return None
    norm = steps[-1]
    return Recipe(geo, _floats(norm.mean), _floats(norm.std))


def from_hf_processor(proc: Any) -> Recipe | None:
    """A transformers image processor's resize / centre crop / rescale / normalise settings; else None."""
    known = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"}
    for k, v in vars(proc).items():
        if k.startswith("do_") and k not in known and v:
            return None  # e.g. padding or reduce_labels: a step the fast path does not do
    if not (getattr(proc, "do_resize", False) and getattr(proc, "do_rescale", False)):
        return None
    resample = _filter(getattr(proc, "resample", None))
    size = _as_dict(getattr(proc, "size", None))
    if resample is None or size is None:
        return None
    if set(size) == {"shortest_edge"}:
        geo_kw: dict[str, Any] = {"short": int(size["shortest_edge"])}
    elif set(size) == {"height", "width"}:
        geo_kw = {"size": (int(size["height"]), int(size["width"]))}
    else:
        return None
    crop = None
    if getattr(proc, "do_center_crop", False):
        c = _as_dict(getattr(proc, "crop_size", None))
        if c is None or set(c) != {"height", "width"}:
            return None
        crop = (int(c["height"]), int(c["width"]))
    geo = Geometry(resample=resample, crop=crop, crop_round=False, **geo_kw)
    if not _crop_fits(geo):
        return None
    if getattr(proc, "do_normalize", False):
        mean, std = _floats(proc.image_mean), _floats(proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Recipe(geo, mean, std, float(proc.rescale_factor))


def _is_rgb_step(step: Any) -> bool:
    """open_clip's `MaybeConvertMode('RGB')` or the older `_convert_to_rgb` function: the fast path's to_rgb."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", "") == "_convert_to_rgb"


def _as_dict(d: Any) -> dict[str, Any] | None:
    if d is None:
        return None
    items = d.items() if hasattr(d, "items") else vars(d).items()
    return {k: v for k, v in items if v is not None}


def _floats(v: Any) -> tuple[float, ...]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (int, float)):
        v = [v] * 3
    return tuple(float(x) for x in v)


def _crop_fits(geo: Geometry) -> bool:
    """A crop larger than the resized image would need padding: leave such models on the reference path."""
    if geo.crop is None:
        return True
    lo = (geo.short, geo.short) if geo.size is None else geo.size
    return geo.crop[0] <= lo[0] and geo.crop[1] <= lo[1]


def agrees(fast: torch.Tensor, ref: torch.Tensor, tol: float = 0.1) -> bool:
    """The self-check at load time: same shape, and on a probe image (no draft) every value within `tol`
    (normalised units, ~1/40 of the range) of the library's own transform. PIL vs torchvision resampling
    differ by rounding only; a wrong recipe (mean, crop, size) is far outside this."""
    return fast.shape == ref.shape and float((fast - ref).abs().max()) <= tol


def probe_image() -> Image.Image:
    """A smooth photo-like probe (gradients + a few shapes) in an aspect ratio that exercises crop offsets."""
    yy, xx = np.mgrid[0:301, 0:457].astype(np.float32)
    r = 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    g = 255 * xx / 456
    b = 255 * (1 - yy / 300)
    arr = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    arr[80:200, 150:300] = (20, 200, 60)
    return Image.fromarray(arr)


# ---- decoding ----------------------------------------------------------------------------------


def draft_side(geometries: Iterable[Geometry | None]) -> int | None:
    """The short side a JPEG draft decode must keep for every one of these models; None (no draft) as soon
    as one model is on the reference path, which must see the full-size decode."""
    sides = []
    for g in geometries:
        if g is None:
            return None
        sides.append(g.needed_side)
    return max(sides) if sides else None


def decode(path: str | Path | BinaryIO, draft: int | None = None) -> Image.Image:
    """Open and fully read an image. With `draft`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) whose short side is still >= draft, and its info says so (`draft_scale`, `full_size`); any other
    format is decoded as is."""
    im = Image.open(path)
    try:
        full, scale = im.size, 1
        if draft and im.format == "JPEG":
            im.draft(None, (draft, draft))  # a square box keeps the short side >= draft
            scale = int(im.decoderconfig[0]) if im.decoderconfig else 1
        im.load()  # a single-frame JPEG's file is closed here: no copy needed
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            out = im
        else:
            out = im.copy() if im.mode in ("RGB", "RGBA", "L", "P", "LA") else im.convert("RGB")
            im.close()
    except BaseException:
        im.close()
        raise
    if scale > 1:
        out.info.update(draft_scale=scale, full_size=full)
    return out


def draft_scale(size: tuple[int, int], side: int) -> int:
    """The DCT scale (1, 2, 4 or 8) draft mode picks for an image of `size` asked to keep `side` pixels:
    PIL takes min(w // side, h // side) rounded down to a power of two (the bench and tests report it)."""
    s = min(size[0] // side, size[1] // side)
    return next((f for f in (8, 4, 2) if s >= f), 1)
