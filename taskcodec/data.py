"""Fashion-MNIST reader (idx files, gzip or plain) with errors that say how to get the data."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = ("install the Debian package (apt-get install dataset-fashion-mnist, data in /usr/share/datasets/"
              "fashion-mnist) or pass --data DIR with the four standard idx files (optionally .gz)")


class DataError(RuntimeError):
    """The data folder is missing, incomplete or corrupt."""


def data_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("TASKCODEC_DATA") or DEFAULT_DIR)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{stem}[.gz] not found in {folder}: {HOW_TO_GET}")


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is corrupt ({exc}): {HOW_TO_GET}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(f"{path} is not an idx file of unsigned bytes with {expected_dims} dimensions: {HOW_TO_GET}")
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header): {HOW_TO_GET}")
    shape = struct.unpack(">" + "I" * expected_dims, raw[4:header])
    count = int(np.prod(shape))
    if len(raw) != header + count:
        raise DataError(f"{path} holds {len(raw) - header} data bytes, its header promises {count}: {HOW_TO_GET}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of one split ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = data_dir(path)
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist: {HOW_TO_GET}")
    images = _read_idx(_find(folder, _FILES[split][0]), 3)
    labels = _read_idx(_find(folder, _FILES[split][1]), 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels ({split})")
    return images, labels
