"""The frames of the int8 pipeline: which real frames calibrate, which evaluate, and the reader ONNX Runtime
calibrates from — one of each for every bundle.

Frames are Fashion-MNIST images in the bundle's input layout (:func:`to_input`: bilinear resize to the input size,
gray replicated to every channel when the encoder takes colour — the pixels ``training.transfer_datasets.render``
gives the frozen-backbone bundles). Calibration frames come from the training split only, evaluation frames from the
test split only (the first ``n``, all 10000 by default).

Which training frames calibrate is each command's measured default, kept so the published numbers stay valid:
``taskcodec calibrate`` draws ``n`` at random (seed 0) from the whole training split (``pool=None``); the frozen
bundles calibrate on the first ``n`` of the fixed 5000-frame subset their head was trained on (``pool=5000``,
``transfer_datasets.load_fashion_mnist_train``). Measured on the default bundle, calibrating minmax-u8 on the other
rule's 512 frames moves symbol agreement 98.96 -> 99.03 % and accuracy 90.30 -> 90.20 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

FROZEN_POOL = 5000  # the frozen head's training subset (transfer_datasets.load_fashion_mnist_train)
SEED = 0


def to_input(images: np.ndarray, spec) -> np.ndarray:
    """uint8 gray images [N, h, w] -> uint8 frames [N, H, W, C] in the bundle's input layout (``spec``: height,
    width, channels)."""
    import cv2

    if images.shape[1:3] != (spec.height, spec.width):
        images = np.stack([cv2.resize(im, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR) for im in images])
    frames = images[..., None] if spec.channels == 1 else np.repeat(images[..., None], spec.channels, axis=-1)
    return np.ascontiguousarray(frames)


def _split(split: str, data: Path | None) -> tuple[np.ndarray, np.ndarray]:
    from taskcodec.data import load_fashion_mnist

    return load_fashion_mnist(split, data)


def calibration_indices(total: int, n: int, pool: int | None = None) -> np.ndarray:
    """Indices into the training split of ``n`` calibration frames (module doc: ``pool`` None or 5000)."""
    if pool is None:
        if n > total:
            raise ValueError(f"{n} calibration frames asked for; the training split has {total}")
        return np.random.default_rng(SEED).choice(total, n, replace=False)
    subset = np.sort(np.random.default_rng(SEED).permutation(total)[:pool])
    if n > len(subset):
        raise ValueError(f"{n} calibration frames asked for; only {len(subset)} calibration frames available")
    return subset[:n]


def calibration_frames(spec, n: int, data: Path | None = None, pool: int | None = None) -> np.ndarray:
    """``n`` Fashion-MNIST training frames in the bundle's layout (never the evaluation split)."""
    if n < 1:
        raise ValueError("at least one calibration frame is needed")
    images, _ = _split("train", data)
    return to_input(images[calibration_indices(len(images), n, pool)], spec)


def eval_frames(spec, n: int | None = None, data: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default: all) Fashion-MNIST test frames in the bundle's layout, and their labels."""
    images, labels = _split("test", data)
    return to_input(images[:n], spec), labels[:n]


class FrameReader(CalibrationDataReader):
    """Calibration batches of uint8 frames for ONNX Runtime; ``set_range`` lets it calibrate a few batches at a
    time (bounded memory for any number of frames)."""

    def __init__(self, input_name: str, frames: np.ndarray, batch: int = 32):
        self._items = [{input_name: frames[i: i + batch]} for i in range(0, len(frames), batch)]
        self.set_range(0, len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._items[start_index:end_index])

    def get_next(self):
        return next(self._it, None)
