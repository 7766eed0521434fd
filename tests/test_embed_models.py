"""Registry, encoders and stand-ins: the models load through one code path and give unit float32 vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageselector.db import EMBED_MODELS
from imageselector.models import encoders as enc_mod
from imageselector.models.registry import DEFAULT_REGISTRY, RegistryError, load_registry, registry_path
from tests.helpers import embed_fixtures

standin_registry = embed_fixtures.standin_registry
standin_encoders = embed_fixtures.standin_encoders


def _img(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))


def test_shipped_registry_names_the_five_models() -> None:
    reg = load_registry()
    assert list(reg) == list(EMBED_MODELS)
    assert {n: s.dim for n, s in reg.items()} == {
        "clip_vitb32": 512,
        "clip_vitl14": 768,
        "dinov2_base": 768,
        "dinov2_large": 1024,
        "dinov3_base": 768,
    }
    assert reg["clip_vitb32"].has_text and reg["clip_vitl14"].has_text
    assert not any(s.standin for s in reg.values())
    fb = reg["dinov3_base"].fallback_spec()
    assert fb is not None and fb.library == "timm" and fb.source == "vit_base_patch16_dinov3.lvd1689m"


def test_registry_override_env_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "weights" / "models.json"
    f.parent.mkdir()
    f.write_text(json.dumps({"models": {"dinov2_base": {"library": "transformers", "source": "./d2", "dim": 32}}}))
    monkeypatch.setenv("IMAGESELECTOR_MODELS_FILE", str(f))
    assert registry_path() == f.resolve()
    reg = load_registry()
    assert list(reg) == ["dinov2_base"]
    assert reg["dinov2_base"].source == str((f.parent / "d2").resolve())
    monkeypatch.delenv("IMAGESELECTOR_MODELS_FILE")
    assert registry_path() == DEFAULT_REGISTRY


@pytest.mark.parametrize(
    "models, msg",
    [
        ({"clip_rn50": {"library": "open_clip", "source": "RN50", "dim": 1024}}, "unknown model name"),
        ({"dinov2_base": {"library": "onnx", "source": "x", "dim": 3}}, "library"),
        ({"dinov2_base": {"library": "transformers", "source": "x", "dim": 3, "pool": "cls"}}, "unknown field"),
        ({"dinov2_base": {"library": "transformers", "dim": 3}}, "missing field"),
    ],
)
def test_bad_registry_is_refused(tmp_path: Path, models: dict, msg: str) -> None:
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"models": models}))
    with pytest.raises(RegistryError, match=msg):
        load_registry(f)


def test_standins_are_the_real_architectures(standin_registry: Path, standin_encoders: dict) -> None:
    import open_clip
    from transformers import Dinov2Model, DINOv3ViTModel

    reg = load_registry(standin_registry)
    assert all(s.standin for s in reg.values()) and list(reg) == list(EMBED_MODELS)
    assert isinstance(standin_encoders["clip_vitb32"].model, open_clip.CLIP)
    assert isinstance(standin_encoders["dinov2_large"].model, Dinov2Model)
    d3 = standin_encoders["dinov3_base"].model
    assert isinstance(d3, DINOv3ViTModel) and d3.config.num_register_tokens == 4
    assert d3.config.patch_size == 16 and standin_encoders["dinov2_base"].model.config.patch_size == 14


def test_vectors_are_unit_float32_and_deterministic(standin_registry: Path, standin_encoders: dict, tmp_path) -> None:
    from imageselector.models.standins import build_standins

    other = load_registry(build_standins(tmp_path / "again", ["dinov3_base", "clip_vitb32"]))
    imgs = [_img(1), _img(2)]
    for name, enc in standin_encoders.items():
        v = enc.encode_images(imgs)
        assert v.dtype == np.float32 and v.shape == (2, enc.dim)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(v[0], v[1])
        if name in other:
            again = enc_mod.load_encoder(other[name], "cpu", "fp32").encode_images(imgs)
            np.testing.assert_array_equal(v, again)


def test_text_tower_only_for_clip(standin_encoders: dict) -> None:
    t = standin_encoders["clip_vitl14"].encode_texts(["blue ceramic mug", "silver ring"])
    assert t.shape == (2, standin_encoders["clip_vitl14"].dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    with pytest.raises(TypeError):
        standin_encoders["dinov2_base"].encode_texts(["x"])


def test_dtype_and_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert enc_mod.resolve_dtype("auto", "cuda") == "fp16"
    assert enc_mod.resolve_dtype("auto", "mps") == "fp16"
    monkeypatch.setattr(enc_mod, "cpu_has_fast_bf16", lambda: False)
    assert enc_mod.resolve_dtype("auto", "cpu") == "fp32"
    monkeypatch.setattr(enc_mod, "cpu_has_fast_bf16", lambda: True)
    assert enc_mod.resolve_dtype("auto", "cpu") == "bf16"
    assert enc_mod.resolve_dtype("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError):
        enc_mod.resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert enc_mod.resolve_device("auto") == "cpu"


def test_bf16_agrees_with_fp32_on_standins(standin_registry: Path, standin_encoders: dict) -> None:
    reg = load_registry(standin_registry)
    imgs = [_img(i) for i in range(4)]
    for name in ("clip_vitb32", "dinov3_base"):
        lo = enc_mod.load_encoder(reg[name], "cpu", "bf16").encode_images(imgs)
        hi = standin_encoders[name].encode_images(imgs)
        assert (lo * hi).sum(axis=1).min() > 0.99


def test_fallback_source_used_when_primary_fails(standin_registry: Path, caplog) -> None:
    import dataclasses

    good = load_registry(standin_registry)["dinov3_base"]
    bad = dataclasses.replace(good, source=str(standin_registry.parent / "nope"), fallback={"source": good.source})
    enc = enc_mod.load_encoder(bad, "cpu", "fp32")
    assert enc.spec.source == good.source
    assert "using the fallback" in caplog.text


def test_clip_preprocess_numpy_tail_is_bit_identical(standin_encoders: dict) -> None:
    for name in ("clip_vitb32", "clip_vitl14"):
        enc = standin_encoders[name]
        assert enc._preprocess.fast
        for seed, size in ((3, (480, 640)), (4, (700, 300))):
            img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))
            assert torch.equal(enc._reference(img), enc._preprocess.full(img))
    transparent = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    clip = standin_encoders["clip_vitb32"]
    assert torch.equal(clip._reference(transparent), clip._reference(white))
    assert torch.equal(clip.preprocess(transparent), clip.preprocess(white))  # the fast path flattens too
