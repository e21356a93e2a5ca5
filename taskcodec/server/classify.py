"""Batched classification of decoded symbols with the bundle's classifier ONNX (int32 [N, D] -> logits [N, C]).

One ORT call per micro-batch: the per-call overhead (tens of microseconds) dominates for the tiny classifiers we ship,
so classifying a whole batch at once is what keeps the per-frame CPU cost low. ORT runs with one intra-op thread:
the server is one event loop and the box has two cores.
"""

from __future__ import annotations

import numpy as np

from taskcodec.bundle import Bundle, BundleError
from taskcodec.providers import ort_session
from taskcodec.server.ood import UNKNOWN, UNKNOWN_NAME, OutOfDomain


class Classifier:
    def __init__(self, bundle: Bundle, threads: int = 1):
        path = bundle.file("classifier")
        try:
            self.session = ort_session(path, threads)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise BundleError(f"cannot load classifier {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.latent_dim = bundle.latent_dim
        self.classes = bundle.classes
        self.ood = OutOfDomain.from_bundle(bundle)  # None: the bundle sets no out-of-domain threshold

    def logits(self, symbols: np.ndarray) -> np.ndarray:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1, self.latent_dim)
        return self.session.run(None, {self.input_name: symbols})[0]

    def predict(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class index and its softmax probability per row."""
        if len(symbols) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        logits = self.logits(symbols).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        pred = p.argmax(axis=1)
        conf = p[np.arange(len(pred)), pred]
        if self.ood is not None:  # out-of-domain frames are stored as UNKNOWN (-1), not as a class
            pred = np.where(self.ood.flags(symbols), UNKNOWN, pred)
        return pred, conf

    def class_name(self, index: int) -> str | None:
        if index == UNKNOWN:
            return UNKNOWN_NAME
        return self.classes[index] if 0 <= index < len(self.classes) else None
