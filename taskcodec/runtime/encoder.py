"""The on-device encoder: ONNX Runtime (uint8 frames -> int32 symbols), then range coding to per-frame payloads.

Times for inference and coding are kept separately so benchmarks can report the range-coding share of a frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from taskcodec.bundle import Bundle, BundleError
from taskcodec.coding import RangeCoder, compress
from taskcodec.providers import choose_providers, ort_session


class EncoderError(RuntimeError):
    """The encoder model does not fit the bundle or cannot be run."""


@dataclass
class EncodeStats:
    frames: int = 0
    payload_bytes: int = 0
    inference_s: float = 0.0
    coding_s: float = 0.0

    @property
    def coding_share(self) -> float:
        """Fraction of encode time spent range coding (the rest is the neural encoder)."""
        total = self.inference_s + self.coding_s
        return self.coding_s / total if total else 0.0

    def to_dict(self) -> dict:
        n = max(self.frames, 1)
        return {"frames": self.frames, "payload_bytes": self.payload_bytes,
                "bits_per_frame": 8 * self.payload_bytes / n,
                "inference_ms_per_frame": 1000 * self.inference_s / n,
                "coding_ms_per_frame": 1000 * self.coding_s / n,
                "coding_share": self.coding_share}


class FrameEncoder:
    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int | None = None,
                 providers: list[str] | str | None = None):
        path = bundle.encoder_path(precision)  # BundleError for a missing int8 encoder
        if threads is not None and threads < 1:
            raise EncoderError(f"threads must be at least 1, got {threads}")
        self.providers = choose_providers(providers)
        try:
            self.session = ort_session(path, threads, self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for broken models
            raise EncoderError(f"cannot load encoder {path}: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise EncoderError(f"{path} is not a taskcodec encoder (one uint8 input, symbols output)")
        self.input_name = inputs[0].name
        spec = bundle.input
        want = [spec.height, spec.width, spec.channels]
        shape = inputs[0].shape
        if inputs[0].type != "tensor(uint8)" or len(shape) != 4 or any(
                isinstance(s, int) and s != w for s, w in zip(shape[1:], want)):
            raise EncoderError(f"encoder input {inputs[0].type} {shape} does not match the bundle's uint8 "
                               f"[N, {spec.height}, {spec.width}, {spec.channels}]")
        self.bundle = bundle
        self.precision = precision
        self.model_tag = bundle.model_tag
        self.coder = RangeCoder(bundle.tables)
        self.stats = EncodeStats()

    def symbols(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] -> int32 [N, D]."""
        out = self.session.run(None, {self.input_name: frames})[0]
        if out.ndim != 2 or out.shape[1] != self.bundle.latent_dim:
            raise EncoderError(f"encoder produced {out.shape}, the bundle expects [N, {self.bundle.latent_dim}]")
        return out.astype(np.int32, copy=False)

    def encode(self, frames: np.ndarray) -> list[bytes]:
        """uint8 [N, H, W, C] -> one self-checking payload per frame (taskcodec.coding.stream format)."""
        t0 = time.perf_counter()
        symbols = self.symbols(frames)
        t1 = time.perf_counter()
        payloads = [compress(s, self.coder, self.model_tag) for s in symbols]
        t2 = time.perf_counter()
        self.stats.frames += len(payloads)
        self.stats.payload_bytes += sum(len(p) for p in payloads)
        self.stats.inference_s += t1 - t0
        self.stats.coding_s += t2 - t1
        self.last_inference_s, self.last_coding_s = t1 - t0, t2 - t1
        return payloads


__all__ = ["BundleError", "EncodeStats", "EncoderError", "FrameEncoder"]
