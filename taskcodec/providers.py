"""ONNX Runtime execution-provider choice, shared by the edge runtime and calibration.

By default the fastest provider this onnxruntime build has is used (TensorRT, then CUDA, then CPU); a provider the
user asked for by name but that the build lacks is an error rather than a silent CPU fallback, so a Jetson that lost
its GPU build is noticed instead of running ten times slower.
"""

from __future__ import annotations

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


class ProviderError(RuntimeError):
    """A requested execution provider is unknown or not in this onnxruntime build."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def canonical(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full provider names pass through."""
    name = name.strip()
    return ALIASES.get(name.lower(), name)


def choose_providers(requested: list[str] | str | None = None) -> list[str]:
    """Providers for ``onnxruntime.InferenceSession(providers=...)``, best first; CPU is always last as a fallback
    for operators the accelerator cannot run."""
    available = available_providers()
    if requested is None or requested == [] or requested == "auto":
        chosen = [p for p in PREFERENCE if p in available]
    else:
        names = requested.split(",") if isinstance(requested, str) else list(requested)
        chosen = []
        for raw in names:
            if not raw.strip():
                continue
            if raw.strip().lower() == "auto":
                chosen += [p for p in PREFERENCE if p in available and p not in chosen]
                continue
            name = canonical(raw)
            if name not in available:
                raise ProviderError(
                    f"execution provider {raw!r} ({name}) is not available in this onnxruntime build; "
                    f"available: {', '.join(available)}")
            if name not in chosen:
                chosen.append(name)
    if "CPUExecutionProvider" in available and "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if not chosen:
        raise ProviderError(f"no usable execution provider; this onnxruntime has: {', '.join(available)}")
    return chosen
