"""Tiny, randomly initialised models of the five real architectures, for tests and the offline demo.

No weights can be downloaded here, so tests, the demo and the search tests build these instead:
the same libraries and classes as the real models (open_clip ViT with a custom config and a text tower,
transformers Dinov2Model, DINOv3ViTModel with 4 register tokens), only small. They are saved to a
folder with a registry file pointing at them, and loaded through the very same `load_encoder` code.
Every entry is marked `"standin": true` so status and search can warn that the vectors mean nothing.
Deterministic: the same seed gives the same weights, hence the same vectors. Paths in the registry
are relative (`./...`), so the folder can be moved or copied whole.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from imageselector.db import EMBED_MODELS
from imageselector.models.registry import ModelSpec, write_registry

REGISTRY_NAME = "standin_models.json"

# name -> (vision layers, width, patch, head_width, embed_dim); dims differ so a mix-up cannot pass a test.
_CLIP = {
    "clip_vitb32": dict(patch_size=32, embed_dim=24),
    "clip_vitl14": dict(patch_size=14, embed_dim=40),
}
_DINOV2 = {"dinov2_base": 32, "dinov2_large": 48}


def _clip_config(patch_size: int, embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": patch_size, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def _build_clip(name: str, out: Path, seed: int) -> ModelSpec:
    import open_clip

    cfg_name = f"standin_{name}"
    cfg_path = out / f"{cfg_name}.json"
    cfg_path.write_text(json.dumps(_clip_config(**_CLIP[name]), indent=2))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(cfg_name, pretrained=None)
    weights = out / f"{cfg_name}.pt"
    torch.save(model.state_dict(), weights)
    return ModelSpec(
        name=name,
        library="open_clip",
        source=cfg_name,
        config=f"./{cfg_path.name}",
        pretrained=f"./{weights.name}",
        dim=_CLIP[name]["embed_dim"],
        has_text=True,
        pooling="clip",
        standin=True,
        notes="stand-in: tiny random open_clip ViT",
    )


def _build_dinov2(name: str, out: Path, seed: int) -> ModelSpec:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden = _DINOV2[name]
    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224
    )
    model = Dinov2Model(cfg)
    target = out / name
    model.save_pretrained(target)
    # The real facebook/dinov2-* processor: shortest edge 256, bicubic, centre crop 224, ImageNet mean/std.
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(target)
    return ModelSpec(
        name=name,
        library="transformers",
        source=f"./{name}",
        dim=hidden,
        pooling="cls",
        standin=True,
        notes="stand-in: tiny random Dinov2Model",
    )


def _build_dinov3(name: str, out: Path, seed: int) -> ModelSpec:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_register_tokens=4,
        patch_size=16,
    )
    model = DINOv3ViTModel(cfg)
    target = out / name
    model.save_pretrained(target)
    DINOv3ViTImageProcessor().save_pretrained(target)  # the real one: 224x224 bilinear, ImageNet mean/std
    return ModelSpec(
        name=name,
        library="transformers",
        source=f"./{name}",
        dim=32,
        pooling="cls",
        standin=True,
        notes="stand-in: tiny random DINOv3ViTModel",
    )


def build_standins(directory: str | Path, models: Iterable[str] = EMBED_MODELS, *, seed: int = 0) -> Path:
    """Build the stand-ins into `directory`; return the registry file that points at them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs: dict[str, ModelSpec] = {}
    for name in models:
        s = seed * 1000 + (EMBED_MODELS.index(name) if name in EMBED_MODELS else 999)
        if name in _CLIP:
            specs[name] = _build_clip(name, out, s)
        elif name in _DINOV2:
            specs[name] = _build_dinov2(name, out, s)
        elif name == "dinov3_base":
            specs[name] = _build_dinov3(name, out, s)
        else:
            raise ValueError(f"no stand-in for {name!r}; known: {', '.join(EMBED_MODELS)}")
    return write_registry(out / REGISTRY_NAME, specs)


def main(argv: list[str] | None = None) -> int:
    """`python -m imageselector.models.standins DIR [--models a,b]`: build stand-ins, print the registry path."""

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("dir")
    ap.add_argument("--models", default=",".join(EMBED_MODELS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_standins(a.dir, [m for m in a.models.split(",") if m], seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
