"""Encoders: one object per model that turns PIL images (and, for CLIP, texts) into L2-normalised float32 vectors.

Every model, real or stand-in, loads through the same code: `open_clip.create_model_and_transforms`,
`transformers.AutoModel/AutoImageProcessor.from_pretrained`, or `timm.create_model`. Preprocessing
(`preprocess`) is split from the forward pass (`encode_batch`) so the embed stage can preprocess in
worker threads while the model runs. Pooling: CLIP's own image/text projection; DINOv2/DINOv3
`pooler_output` = the CLS token after the final norm (timm: `forward_features(x)[:, 0]`, the same token).

Two preprocessing paths (`preprocess=` of `load_encoder`, `embed.py --preprocess`): `reference` runs the
library's own transform per image and gives float tensors; `fast` (preprocess.py) gives uint8 pixels from
one PIL resize that `encode_batch` normalises per batch, with the recipe read from that same transform
and checked against it at load time (a model whose recipe cannot be read or disagrees stays on reference).

Precision: `dtype="auto"` picks per device from measured agreement with fp32 (docs/embedding.md):
bf16 on a CPU with native bf16 (AVX-512-BF16/AMX), fp16 on CUDA and MPS, else fp32. The vectors are
always returned as float32 and normalised in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imageselector.models import preprocess as pp
from imageselector.models.registry import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    """auto -> mps (Apple GPU), then cuda, then cpu. An explicit device is used as given."""
    if device != "auto":
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps requested but MPS is not available")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        return device
    if torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: str) -> str:
    """The precision to run in. `auto`: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
        return dtype
    if device.startswith("cuda") or device == "mps":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white (what the background stage does), then RGB."""
    if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


class NumpyTail:
    """A torchvision eval transform whose last two steps (ToTensor, Normalize) run in numpy instead.

    Bit-for-bit the same tensor (checked at construction, else the original transform is used), but no
    torch op: torch's intra-op threads made these two tiny ops cost 2-24 ms per image in the decode
    threads on a busy CPU, against ~0.4 ms in numpy.
    """

    def __init__(self, transform: Any) -> None:
        self.full = transform
        self.fast = False
        steps = list(getattr(transform, "transforms", []) or [])
        if len(steps) >= 2 and "ToTensor" in type(steps[-2]).__name__ and hasattr(steps[-1], "std"):
            from torchvision.transforms import Compose

            self.head = Compose(steps[:-2])
            self.mean = np.asarray(steps[-1].mean, np.float32).reshape(-1, 1, 1)
            self.std = np.asarray(steps[-1].std, np.float32).reshape(-1, 1, 1)
            probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8))
            self.fast = True
            try:
                self.fast = bool(torch.equal(self(probe), transform(probe)))
            except Exception:  # noqa: BLE001 - any doubt: use the library's own transform
                self.fast = False

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not self.fast:
            return self.full(img)
        arr = np.asarray(self.head(img), dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != len(self.mean):
            return self.full(img)
        arr = arr.transpose(2, 0, 1) / np.float32(255)
        return torch.from_numpy(np.ascontiguousarray((arr - self.mean) / self.std))


class Encoder:
    """Base: subclasses set `model`, implement `_reference` (and `_recipe`) and `_forward`."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        self.recipe: pp.Recipe | None = None  # set by `use_fast`: the fast path is on
        self.spec = spec
        self.name = spec.name
        self.device = device
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.dim = spec.dim
        self.model: torch.nn.Module

    def _place(self) -> None:
        self.model.eval()
        self.model.to(self.device)
        if self.dtype != torch.float32:
            self.model.to(self.dtype)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One decoded image -> this model's input: uint8 [3,H,W] pixels (fast) or the float tensor (reference)."""
        if self.recipe is not None:
            return self.recipe.geometry.pixels(to_rgb(img), img.info)
        return self._reference(img)

    @property
    def geometry(self) -> pp.Geometry | None:
        """The fast path's resize/crop (models with equal ones share pixels); None on the reference path."""
        return self.recipe.geometry if self.recipe is not None else None

    def use_fast(self) -> bool:
        """Switch to the fast path if this model's recipe can be read and agrees with the reference on a probe."""
        recipe = self._recipe()
        if recipe is None:
            log.info("%s: preprocessing not recognised; using the reference path", self.name)
            return False
        probe = pp.probe_image()
        ref = self._reference(probe)
        fast = recipe.normalise(recipe.geometry.pixels(probe)[None])[0]
        if not pp.agrees(fast, ref):
            log.warning("%s: fast preprocessing disagrees with the reference; using the reference path", self.name)
            return False
        self.recipe = recipe
        return True

    def _reference(self, img: Image.Image) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _recipe(self) -> pp.Recipe | None:
        return None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_batch(self, x: torch.Tensor) -> np.ndarray:
        """A batch stacked from `preprocess` (uint8 pixels, normalised here in one op, or float tensors) ->
        [n, dim] float32, L2-normalised."""
        with torch.inference_mode():
            if x.dtype == torch.uint8:
                if self.recipe is None:
                    raise ValueError(f"{self.name}: uint8 pixels given but the fast path is off")
                x = self.recipe.normalise(x)
            out = self._forward(x.to(self.device, self.dtype))
        vecs = _normalise(out)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"{self.name}: model produced {vecs.shape[1]}-dim vectors, registry says {self.dim}")
        return vecs

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_batch(torch.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise TypeError(f"{self.name} has no text tower")

    @property
    def has_text(self) -> bool:
        return False


class OpenClipEncoder(Encoder):
    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import open_clip

        super().__init__(spec, device, dtype)
        name = spec.source
        if spec.config:
            open_clip.add_model_config(spec.config)  # a custom architecture (the stand-ins)
        if not name.startswith(("local-dir:", "hf-hub:")) and Path(name).is_dir():
            name = f"local-dir:{name}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=spec.pretrained, device="cpu")
        self.model = model
        self._preprocess = NumpyTail(preprocess)
        self._tokenizer = open_clip.get_tokenizer(name)
        self._place()

    def _reference(self, img: Image.Image) -> torch.Tensor:
        return self._preprocess(to_rgb(img))

    def _recipe(self) -> pp.Recipe | None:
        return pp.from_torchvision(self._preprocess.full)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    @property
    def has_text(self) -> bool:
        """Whether the stage builds this model's text index (the registry's `has_text`)."""
        return self.spec.has_text

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self._tokenizer(list(texts)).to(self.device)
        with torch.inference_mode():
            out = self.model.encode_text(tokens)
        return _normalise(out)


class TransformersEncoder(Encoder):
    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        super().__init__(spec, device, dtype)
        kw: dict[str, Any] = {"revision": spec.revision} if spec.revision else {}
        self.processor = AutoImageProcessor.from_pretrained(spec.source, **kw)
        self.model = AutoModel.from_pretrained(spec.source, **kw)
        self._place()

    def _reference(self, img: Image.Image) -> torch.Tensor:
        return self.processor(images=to_rgb(img), return_tensors="pt")["pixel_values"][0].float()

    def _recipe(self) -> pp.Recipe | None:
        return pp.from_hf_processor(self.processor)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.spec.pooling == "mean":  # mean of patch tokens (skips CLS and register tokens)
            skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
            return out.last_hidden_state[:, skip:].mean(dim=1)
        return out.pooler_output


class TimmEncoder(Encoder):
    """timm ViTs (the ungated DINOv3 conversion). Preprocessing mirrors the HF processor: 224x224, bilinear."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        super().__init__(spec, device, dtype)
        kw: dict[str, Any] = {"num_classes": 0}
        name = spec.source
        if not name.startswith(("local-dir:", "hf-hub:")) and Path(name).is_dir():
            name = f"local-dir:{name}"
        if spec.pretrained:
            kw["pretrained_cfg_overlay"] = {"file": spec.pretrained}
        self.model = timm.create_model(name, pretrained=spec.extra.get("timm_pretrained", True), **kw)
        size = int(spec.extra.get("image_size", 224))
        cfg = resolve_data_config({}, model=self.model)
        cfg.update(input_size=(3, size, size), interpolation="bilinear", crop_pct=1.0, crop_mode="squash")
        self._preprocess = NumpyTail(create_transform(**cfg))
        self._place()

    def _reference(self, img: Image.Image) -> torch.Tensor:
        return self._preprocess(to_rgb(img))

    def _recipe(self) -> pp.Recipe | None:
        return pp.from_torchvision(self._preprocess.full)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if self.spec.pooling == "mean":
            return feats[:, self.model.num_prefix_tokens :].mean(dim=1)
        return feats[:, 0]


_CLASSES: dict[str, type[Encoder]] = {
    "open_clip": OpenClipEncoder,
    "transformers": TransformersEncoder,
    "timm": TimmEncoder,
}


def _build(spec: ModelSpec, device: str, dtype: str) -> Encoder:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # open_clip narrates every load step on the root logger
    try:
        return _CLASSES[spec.library](spec, device, dtype)
    finally:
        root.setLevel(level)


def load_encoder(
    spec: ModelSpec, device: str = "auto", dtype: str = "auto", preprocess: str = pp.DEFAULT_MODE
) -> Encoder:
    """Load one model for inference. If the primary source cannot be loaded (a gated repo without a token,
    no network) and the spec has a `fallback`, the fallback is loaded instead and `encoder.spec` says so.
    `preprocess`: `fast` or `reference` (module docstring)."""
    if preprocess not in pp.MODES:
        raise ValueError(f"preprocess must be one of {', '.join(pp.MODES)}, not {preprocess!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        enc = _build(spec, dev, dt)
    except Exception as exc:  # noqa: BLE001 - every loader error is worth one try of the fallback
        fb = spec.fallback_spec()
        if fb is None:
            raise
        log.warning(
            "%s: cannot load %s (%s: %s); using the fallback %s",
            spec.name,
            spec.source,
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
            fb.source,
        )
        enc = _build(fb, dev, dt)
    if preprocess == "fast":
        enc.use_fast()
    log.info(
        "%s: loaded %s on %s in %s (dim %d), %s preprocessing",
        spec.name,
        enc.spec.describe(),
        dev,
        dt,
        enc.dim,
        "fast" if enc.recipe is not None else "reference",
    )
    return enc
