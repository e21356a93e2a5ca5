"""ONNX Runtime: execution-provider choice, and the one session helper (``ort_session``, ``run_batched``) that the
edge runtime, the server's classifier, export, calibration and the benches open their models with.

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


def ort_session(model, threads: int | None = 1, providers: list[str] | None = None, **settings):
    """The one way taskcodec opens an ONNX Runtime session.

    ``model``: a path or the serialized model bytes. ``threads``: intra-op threads with one inter-op thread (the
    measured setting everywhere: one camera core, one server event loop); ``None`` keeps ONNX Runtime's defaults.
    ``providers``: the execution providers in order (``choose_providers`` picks them for the edge runtime); by
    default CPU only, so offline measurements do not depend on what accelerator a machine has. ``settings``: other
    ``onnxruntime.SessionOptions`` attributes by name (``graph_optimization_level``, ``optimized_model_filepath``,
    ``log_severity_level`` ...); an unknown name is refused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for name, value in settings.items():
        if not hasattr(options, name):
            raise ValueError(f"onnxruntime.SessionOptions has no setting {name!r}")
        setattr(options, name, value)
    source = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))


def run_batched(session, inputs, batch: int = 256, output: int = 0):
    """Run a one-input model over ``inputs`` (an array, batch first) ``batch`` rows at a time; returns output number
    ``output`` of every batch, concatenated."""
    import numpy as np

    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i: i + batch]})[output]
                           for i in range(0, len(inputs), batch)])
