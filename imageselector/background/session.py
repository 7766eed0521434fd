"""The one rembg session of a run, and a fast batched path for the u2net family.

Models live in one directory, a setting: `U2NET_HOME` (default `<home>/models/rembg`); rembg reads
it from the environment, so it is exported before the session is built. Named models (`u2net`, ...)
are downloaded there by rembg on first use, or found there (`<dir>/u2net.onnx` or
`<dir>/models/u2net/u2net.onnx`). A custom ONNX (`--model-path`) must sit inside that directory since
rembg 2.0.75: one outside is linked or copied in first.

For the u2net family (u2net, u2netp, u2net_human_seg, silueta, u2net_custom) rembg's `predict` is
reproduced here exactly (same resize, normalisation and min-max scaling), but split so that
preparation can run in a prefetch thread and several images can go through onnxruntime in one call
when the model's batch dimension is dynamic. Other models go through `session.predict` per image.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageselector.background.providers import ProviderChoice
from imageselector.config import Settings
from imageselector.fsutil import atomic_writer
from imageselector.weights import u2net_home

log = logging.getLogger(__name__)

U2NET_FAMILY = frozenset({"u2net", "u2netp", "u2net_human_seg", "silueta", "u2net_custom"})
CUSTOM_SESSIONS = frozenset({"u2net_custom", "dis_custom", "ben_custom"})
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = (320, 320)


class ModelError(RuntimeError):
    """The model cannot be loaded (unknown name, missing file, download failed): a configuration problem."""


def models_dir(settings: Settings) -> Path:
    """Where rembg models live: the `U2NET_HOME` setting, else `<home>/models/rembg`."""
    raw = settings.get("U2NET_HOME")
    return Path(raw).expanduser().resolve() if raw else settings.home / "models" / "rembg"


def place_custom_model(path: Path, directory: Path) -> Path:
    """Return a path to `path` inside `directory` (rembg refuses models outside it): as is, linked or copied."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"--model-path {path}: no such file")
    directory = directory.resolve()
    if directory in path.parents:
        return path
    dest = directory / "custom" / path.name
    if dest.is_file() and dest.stat().st_size == path.stat().st_size and _same_bytes(dest, path):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = directory / ".tmp"
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{dest.name}.{os.getpid()}.link.tmp"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, dest)
        log.info("custom model %s linked into %s", path, dest)
    except OSError:
        with open(path, "rb") as src, atomic_writer(dest, tmp_dir) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        log.info("custom model %s copied into %s (rembg only loads models inside U2NET_HOME)", path, dest)
    return dest


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def session_options(threads: int) -> Any:
    """One intra-op pool of `threads`, no inter-op parallelism (u2net is a chain), full graph optimisation.

    Spinning is off: idle ORT threads would otherwise busy-wait, taking CPU from the prefetch and writer
    threads and from the other pipeline stages on the same machine (measured: 0.62 instead of 0.76
    CPU-s per u2net image, same wall time).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def default_threads(settings: Settings) -> int:
    """ORT intra-op threads: BG_ORT_THREADS, else every core (decode/encode threads mostly wait on I/O)."""
    return settings.get_int("BG_ORT_THREADS", os.cpu_count() or 1)


@dataclass
class BgModel:
    """A loaded rembg session plus what the stage needs to drive it."""

    session: Any
    name: str
    label: str  # what the marker records: the model name, or u2net_custom:<file name>
    fast: bool
    max_batch: int
    input_name: str

    @property
    def providers(self) -> list[str]:
        return list(self.session.inner_session.get_providers())

    def prepare(self, img: Image.Image) -> np.ndarray | None:
        """The model input for one image ([3,320,320] float32), exactly as rembg's `normalize` builds it."""
        if not self.fast:
            return None
        return prepare_u2net(img)

    def masks(self, imgs: list[Image.Image], tensors: list[np.ndarray | None]) -> list[Image.Image]:
        """One L-mode mask per image, at the image's size."""
        if not self.fast:
            return [self.session.predict(img)[0].convert("L") for img in imgs]
        out: list[Image.Image] = []
        for start in range(0, len(imgs), self.max_batch):
            chunk = tensors[start : start + self.max_batch]
            batch = np.stack(chunk)  # type: ignore[arg-type]
            pred = self.session.inner_session.run(None, {self.input_name: batch})[0]
            out += [mask_from_pred(pred[i, 0], img.size) for i, img in enumerate(imgs[start : start + self.max_batch])]
        return out


def prepare_u2net(img: Image.Image) -> np.ndarray:
    """rembg `BaseSession.normalize` for u2net, without the batch axis."""
    im = img.convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
    a = np.array(im)
    a = a / max(np.max(a), 1e-6)
    t = (a - np.array(MEAN)) / np.array(STD)
    return t.transpose((2, 0, 1)).astype(np.float32)


def mask_from_pred(pred: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """rembg's u2net post-processing of one [320,320] map: min-max scale, to uint8, resize to the image.

    A constant map (rembg would divide by zero) keeps the whole image: no information, no erasing.
    """
    ma, mi = np.max(pred), np.min(pred)
    if not ma > mi:
        return Image.new("L", size, 255)
    pred = (pred - mi) / (ma - mi)
    mask = Image.fromarray((pred.clip(0, 1) * 255).astype("uint8"), mode="L")
    return mask.resize(size, Image.Resampling.LANCZOS)


def _batch_dim(session: Any) -> int | None:
    """The model's fixed batch size, or None when it is dynamic."""
    dim = session.inner_session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def open_model(
    settings: Settings,
    model: str,
    *,
    model_path: Path | None,
    choice: ProviderChoice,
    threads: int,
    batch_size: int,
) -> BgModel:
    """Create the run's single rembg session (named model, or a custom ONNX through rembg's custom session)."""
    directory = models_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    label = model
    if model_path is not None:
        if model not in CUSTOM_SESSIONS:
            model = "u2net_custom"
        kwargs["model_path"] = str(place_custom_model(Path(model_path), directory))
        label = f"{model}:{Path(model_path).name}"
    elif model in CUSTOM_SESSIONS:
        raise ModelError(f"--model {model} needs --model-path")

    from rembg import new_session
    from rembg.sessions import sessions_names

    if model not in sessions_names:
        raise ModelError(f"unknown rembg model {model!r}; known: {', '.join(sorted(sessions_names))}")
    with u2net_home(directory):
        session = _new_session(new_session, model, choice, threads, kwargs)
    fast = model in U2NET_FAMILY and _looks_like_u2net(session)
    fixed = _batch_dim(session) if fast else 1
    max_batch = max(1, batch_size if fixed is None else min(fixed, batch_size))
    name = session.inner_session.get_inputs()[0].name
    return BgModel(session=session, name=model, label=label, fast=fast, max_batch=max_batch, input_name=name)


def _new_session(new_session: Any, model: str, choice: ProviderChoice, threads: int, kwargs: dict) -> Any:
    last: Exception | None = None
    for opts in choice.options.values():
        if opts.get("ModelCacheDirectory"):
            Path(opts["ModelCacheDirectory"]).mkdir(parents=True, exist_ok=True)
    # Provider options (CoreML's) differ between onnxruntime versions: retry with bare names.
    for with_options in (True, False) if choice.options else (False,):
        try:
            return new_session(
                model, providers=choice.specs(with_options), sess_opts=session_options(threads), **kwargs
            )
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        except OSError as exc:  # requests' ConnectionError is an OSError: the download failed
            raise ModelError(
                f"model {model!r} could not be downloaded or read ({exc.__class__.__name__}: {exc}). "
                f"Offline? Put {model}.onnx into {os.environ.get('U2NET_HOME')} or use --model-path"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            last = exc
            if with_options:
                log.warning("session with provider options failed (%s); retrying without options", exc)
                continue
    raise ModelError(f"could not create the {model} session: {last}")


def _looks_like_u2net(session: Any) -> bool:
    """The fast path needs u2net's signature: one [N,3,320,320] input, a [N,1,320,320] first output."""
    ins = session.inner_session.get_inputs()
    outs = session.inner_session.get_outputs()
    if len(ins) != 1 or not outs:
        return False
    return list(ins[0].shape[1:]) == [3, 320, 320] and list(outs[0].shape[1:]) == [1, 320, 320]
