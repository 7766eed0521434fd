"""Fast preprocessing (preprocess.py) against each library's own transform, JPEG draft decoding, the switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageselector.embedding.stage import EmbedStage, Options, Prefetcher
from imageselector.layout import image_path
from imageselector.models import preprocess as pp
from imageselector.models.encoders import load_encoder
from imageselector.models.registry import load_registry
from imageselector.stopping import KILL_EMBED, Stopper
from tests.helpers import embed_fixtures
from tests.helpers.embed_data import seed_embeddable

standin_registry = embed_fixtures.standin_registry
standin_encoders = embed_fixtures.standin_encoders


def make_stage(settings, conn, encoders: dict, names: list[str]) -> EmbedStage:
    stopper = Stopper(settings.home, (KILL_EMBED,), install_signals=False)
    return EmbedStage(settings, conn, {n: encoders[n] for n in names}, Options(batch_size=4, poll_s=0.1), stopper)


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth, photo-like content (JPEG-friendly): gradients, a blob, mild noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(10, 60, 2)
    arr = np.stack(
        [128 + 90 * np.sin(xx / a) * np.cos(yy / b), 255 * xx / w, 255 * (1 - yy / h)], axis=-1
    ) + rng.normal(0, 4, (h, w, 3))
    cy, cx = int(h * rng.uniform(0.3, 0.7)), int(w * rng.uniform(0.3, 0.7))
    arr[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(w, h) / 5) ** 2] = rng.integers(0, 255, 3)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def fast_tensor(enc, img: Image.Image) -> torch.Tensor:
    x = enc.preprocess(img)
    assert x.dtype == torch.uint8
    return enc.recipe.normalise(x[None])[0]


@pytest.mark.parametrize("name", ["clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"])
def test_fast_matches_reference_on_real_jpegs(standin_encoders: dict, tmp_path: Path, name: str) -> None:
    """Same shape and range as the library's transform; without draft within rounding, with draft close."""
    enc = standin_encoders[name]
    assert enc.recipe is not None  # every shipped kind of preprocessing is recognised
    for i, size in enumerate([(570, 456), (570, 760), (300, 200), (1000, 1000), (120, 90)]):
        path = save(photo(size, i), tmp_path / f"{name}_{i}.jpg", quality=90)
        ref = enc._reference(pp.decode(path))
        same = fast_tensor(enc, pp.decode(path))
        assert same.shape == ref.shape == (3, 224, 224) and same.dtype == torch.float32
        assert (same - ref).abs().max() < 0.1 and (same - ref).abs().mean() < 0.01
        drafted_img = pp.decode(path, enc.geometry.needed_side)
        drafted = fast_tensor(enc, drafted_img)
        assert drafted.shape == ref.shape
        assert (drafted - ref).abs().mean() < 0.06  # ~1.5 grey levels on average: a slightly softer image
        assert float(torch.corrcoef(torch.stack([drafted.flatten(), ref.flatten()]))[0, 1]) > 0.99
        lo, hi = float(ref.min()), float(ref.max())
        assert lo - 0.1 <= float(drafted.min()) and float(drafted.max()) <= hi + 0.1


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_torch_resize_gives_pils_pixels(resample: int) -> None:
    """The fast path resamples in torch; the pixels are PIL's resize-then-crop (what open_clip runs) up to
    rounding (1 grey level, 2 when upscaling), for landscape, portrait, upscaled and exact-size images, and
    for an exact-size (no crop) recipe."""
    for geo in (
        pp.Geometry(resample=resample, short=224, crop=(224, 224)),
        pp.Geometry(resample=resample, size=(224, 224), crop_round=False),
    ):
        for i, size in enumerate([(570, 456), (456, 570), (300, 200), (224, 224), (120, 90)]):
            img = photo(size, i)
            rw, rh = geo.resized(*size)
            ch, cw = geo.crop or (rh, rw)
            top, left = geo._offset(rh - ch), geo._offset(rw - cw)
            want = np.asarray(img.resize((rw, rh), resample).crop((left, top, left + cw, top + ch)))
            got = geo.pixels(img)
            assert got.dtype == torch.uint8 and got.shape == (3, ch, cw) and got.is_contiguous()
            diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want.astype(int))
            assert diff.max() <= (1 if min(size) >= 224 else 2) and diff.mean() < 0.05, (geo, size)  # 2: upscaled


def test_odd_sized_draft_keeps_the_photos_geometry(tmp_path: Path) -> None:
    """A draft decode of an odd-sized JPEG has ceil(side / 2) pixels, the last half outside the photo. The
    resize maps the photo's true extent (side / 2), as the PIL box path does, not the decode's pixel count,
    which stretched the image by half a pixel and shifted the far edge."""
    img = photo((570, 449), 7)
    path = save(img, tmp_path / "odd.jpg", quality=95)
    drafted = pp.decode(path, 224)
    assert drafted.size == (285, 225) and drafted.info["full_size"] == (570, 449)
    geo = pp.Geometry(resample=Image.Resampling.BICUBIC, short=224, crop=(224, 224))
    got = geo.pixels(drafted).permute(1, 2, 0).numpy().astype(float)
    rw, rh = geo.resized(570, 449)
    left = geo._offset(rw - 224)
    sx, sy = 570 / rw / 2, 449 / rh / 2
    exact = drafted.resize((224, 224), Image.Resampling.BICUBIC, box=(left * sx, 0, (left + 224) * sx, 224 * sy))
    stretched = drafted.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, 0, left + 224, 224))
    to_exact = np.abs(got - np.asarray(exact)).mean()
    assert to_exact < 0.5
    assert np.abs(got - np.asarray(stretched)).mean() > 2 * to_exact


def test_draft_only_for_jpegs_and_keeps_the_needed_side(tmp_path: Path) -> None:
    img = photo((1000, 800))
    jpg = pp.decode(save(img, tmp_path / "a.jpg", quality=90), 224)
    assert jpg.size == (500, 400) and jpg.info["draft_scale"] == 2 and jpg.info["full_size"] == (1000, 800)
    assert pp.decode(tmp_path / "a.jpg", 150).size == (250, 200)  # 1/4 keeps 200 >= 150, 1/8 would not
    assert pp.decode(tmp_path / "a.jpg", 450).size == (1000, 800)  # 1/2 would leave 400 < 450
    assert pp.decode(tmp_path / "a.jpg").size == (1000, 800)
    assert pp.draft_scale((1000, 800), 224) == 2 and pp.draft_scale((570, 456), 256) == 1
    for ext, kw in (("png", {}), ("webp", {"quality": 90})):
        other = pp.decode(save(img, tmp_path / f"a.{ext}", **kw), 224)
        assert other.size == (1000, 800) and "draft_scale" not in other.info
    gray = pp.decode(save(img.convert("L"), tmp_path / "g.jpg", quality=90), 224)
    assert gray.size == (500, 400) and gray.mode == "L"


def test_png_webp_gray_and_transparent_images_work(standin_encoders: dict, tmp_path: Path) -> None:
    enc = standin_encoders["dinov2_base"]
    img = photo((640, 480), 3)
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))))
    cases = {
        "png": save(img, tmp_path / "a.png"),
        "webp": save(img, tmp_path / "a.webp", quality=95),
        "gray_jpg": save(img.convert("L"), tmp_path / "g.jpg", quality=95),
        "rgba_png": save(rgba, tmp_path / "t.png"),
    }
    for label, path in cases.items():
        decoded = pp.decode(path, enc.geometry.needed_side)
        ref = enc._reference(pp.decode(path))
        fast = fast_tensor(enc, decoded)
        assert fast.shape == ref.shape, label
        assert (fast - ref).abs().mean() < 0.06, label


def test_the_option_switches_paths(standin_registry: Path) -> None:
    spec = load_registry(standin_registry)["clip_vitb32"]
    ref = load_encoder(spec, "cpu", "fp32", preprocess="reference")
    fast = load_encoder(spec, "cpu", "fp32", preprocess="fast")
    fast.model = ref.model
    img = photo((400, 300))
    assert ref.recipe is None and ref.geometry is None and ref.preprocess(img).dtype == torch.float32
    assert fast.geometry is not None and fast.preprocess(img).dtype == torch.uint8
    with pytest.raises(ValueError, match="fast path is off"):
        ref.encode_batch(fast.preprocess(img)[None])
    a = ref.encode_batch(ref.preprocess(img)[None])[0]
    b = fast.encode_batch(fast.preprocess(img)[None])[0]
    assert a.shape == b.shape and float(a @ b) > 0.999
    with pytest.raises(ValueError, match="preprocess must be"):
        load_encoder(spec, "cpu", "fp32", preprocess="quick")
    # The draft scale follows the models: the largest side any of them needs, none with a reference model.
    assert pp.draft_side([fast.geometry]) == 224
    assert pp.draft_side([fast.geometry, None]) is None


def test_unknown_or_disagreeing_recipe_stays_on_reference(standin_registry: Path, monkeypatch) -> None:
    from torchvision import transforms as T

    assert (
        pp.from_torchvision(T.Compose([T.RandomResizedCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
        is None
    )
    assert (
        pp.from_torchvision(
            T.Compose([T.Resize(224), T.CenterCrop(256), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        )
        is None
    )
    good = pp.from_torchvision(
        T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    )
    assert good is not None and good.geometry.short == 224 and good.mean == (0.5, 0.5, 0.5)
    spec = load_registry(standin_registry)["dinov3_base"]
    wrong = pp.Recipe(pp.Geometry(resample=Image.Resampling.BILINEAR, size=(224, 224)), (0.5,) * 3, (0.5,) * 3)
    monkeypatch.setattr(type(load_encoder(spec, "cpu", "fp32", "reference")), "_recipe", lambda self: wrong)
    assert load_encoder(spec, "cpu", "fp32", preprocess="fast").recipe is None  # wrong mean/std: caught at load


def test_stage_drafts_jpegs_and_shares_pixels(settings, conn, standin_encoders) -> None:
    """The stage decodes at the draft scale all its models allow; models of equal geometry share one resize;
    the stored vector is the model's own encode of that decode."""
    from tests.helpers.embed_checks import vector_of

    rows = seed_embeddable(conn, settings.images_dir, 2, size=(600, 500))
    names = ["clip_vitb32", "clip_vitl14"]
    st = make_stage(settings, conn, standin_encoders, names)
    pf = Prefetcher(settings, st.owner, st.compute, st.opts, st.stopper)
    assert pf.compute.draft == 224
    out = pf._load(rows[0], names)
    assert out["clip_vitb32"] is out["clip_vitl14"] and out["clip_vitb32"].dtype == torch.uint8
    pf.pool.shutdown()
    st.open()
    st.run()
    path = image_path(settings.images_dir, rows[0]["listing_id"], rows[0]["image_id"])
    img = pp.decode(path, 224)
    assert img.size == (300, 250)
    for m in names:
        enc = standin_encoders[m]
        stored = vector_of(settings.embeddings_dir, m, int(rows[0]["gid"]))
        np.testing.assert_allclose(stored, enc.encode_batch(enc.preprocess(img)[None])[0], atol=1e-5)


def test_no_draft_while_any_model_is_on_the_reference_path(settings, conn, standin_registry, standin_encoders) -> None:
    ref = load_encoder(load_registry(standin_registry)["dinov2_base"], "cpu", "fp32", preprocess="reference")
    for encoders, draft in ((standin_encoders, 256), ({**standin_encoders, "dinov2_base": ref}, None)):
        st = make_stage(settings, conn, encoders, ["clip_vitb32", "dinov2_base"])
        pf = Prefetcher(settings, st.owner, st.compute, st.opts, st.stopper)
        assert pf.compute.draft == draft
        pf.pool.shutdown()
