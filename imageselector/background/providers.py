"""Which onnxruntime execution providers the background session asks for, and why.

rembg picks CUDA/ROCm/OpenVINO by itself but never CoreML, so the stage always passes an explicit
list. The choice is a pure function of (flags, what onnxruntime offers, the OS) so it can be tested
without the hardware.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPU = "CPUExecutionProvider"
COREML = "CoreMLExecutionProvider"
CUDA = "CUDAExecutionProvider"
ROCM = "ROCMExecutionProvider"
DIRECTML = "DmlExecutionProvider"

# --gpu preference after CoreML (macOS only): the first one onnxruntime offers wins.
GPU_ORDER = (CUDA, ROCM, DIRECTML)

ProviderSpec = str | tuple[str, dict[str, str]]


class ProviderError(ValueError):
    """The asked-for provider cannot be used here (bad usage: exit 2)."""


@dataclass
class ProviderChoice:
    """The providers to pass to onnxruntime (first preferred, CPU as the fallback for unsupported ops)."""

    names: list[str]
    options: dict[str, dict[str, str]] = field(default_factory=dict)
    warning: str | None = None

    @property
    def primary(self) -> str:
        return self.names[0]

    def specs(self, with_options: bool = True) -> list[ProviderSpec]:
        """The list for `InferenceSession(providers=...)`: names, or (name, options) pairs."""
        if not with_options:
            return list(self.names)
        return [(n, self.options[n]) if self.options.get(n) else n for n in self.names]


def coreml_options(cache_dir: Path | None) -> dict[str, str]:
    """CoreML as MLProgram on every compute unit (ANE, GPU, CPU); compiled models cached across starts."""
    opts = {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}
    if cache_dir is not None:
        opts["ModelCacheDirectory"] = str(cache_dir)
    return opts


def _with_cpu(name: str) -> list[str]:
    return [name] if name == CPU else [name, CPU]


def choose_providers(
    *,
    gpu: bool = False,
    provider: str | None = None,
    available: list[str] | None = None,
    system: str | None = None,
    coreml_cache: Path | None = None,
) -> ProviderChoice:
    """Decide the provider list.

    `provider` forces one (it must be available). `gpu` prefers CoreML on macOS, then CUDA, ROCm,
    DirectML; with none of them it falls back to CPU and says so. Neither flag: CPU only.
    """
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    system = system or platform.system()
    options: dict[str, dict[str, Any]] = {}
    if provider:
        name = _canonical(provider, available)
        if name not in available:
            raise ProviderError(
                f"provider {provider!r} is not available here; onnxruntime offers: {', '.join(available)}"
            )
        if name == COREML:
            options[COREML] = coreml_options(coreml_cache)
        return ProviderChoice(_with_cpu(name), options)
    if not gpu:
        return ProviderChoice([CPU])
    if system == "Darwin" and COREML in available:
        return ProviderChoice(_with_cpu(COREML), {COREML: coreml_options(coreml_cache)})
    for name in GPU_ORDER:
        if name in available:
            return ProviderChoice(_with_cpu(name))
    return ProviderChoice(
        [CPU],
        warning=f"--gpu: no GPU execution provider available (onnxruntime offers {', '.join(available)}); running on CPU",
    )


def _canonical(name: str, available: list[str]) -> str:
    """Accept 'cuda', 'CoreML', 'CUDAExecutionProvider', ... case-insensitively."""
    want = name.lower().removesuffix("executionprovider")
    for cand in [*available, CPU, COREML, CUDA, ROCM, DIRECTML]:
        if cand.lower().removesuffix("executionprovider") == want:
            return cand
    return name
