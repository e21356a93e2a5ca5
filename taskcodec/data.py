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


# -- operator datasets: `--data fashion-mnist[:DIR] | folder:PATH | csv:FILE` -----------------------------------------
# An image-folder tree is torchvision's ImageFolder layout (ROOT/<class>/<image>; classes sorted by folder name), or
# ROOT/train/<class>/... and ROOT/test/<class>/... when the operator has split it. A CSV has rows `path,label` (an
# optional header row `path,label[,split]`; relative paths are relative to the CSV's folder; labels are class names or
# integers). Without an explicit split, a fixed 20 % of each class (seeded by the class name) is the test split.
# Images are decoded with OpenCV, converted to gray or RGB and resized with INTER_AREA, exactly as the edge runtime
# preprocesses camera frames (taskcodec.runtime.preprocess), so training and deployment see the same pixels.

import csv
import hashlib
import zlib
from dataclasses import dataclass

FASHION = "fashion-mnist"
PLACED = "fashion-mnist-placed"
KINDS = (FASHION, PLACED, "folder", "csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")
TEST_FRACTION = 0.2
SPEC_HELP = ("--data fashion-mnist[:DIR] (default), fashion-mnist-placed[:DIR] (each item at a random placement, the "
             "paper's augmented-MNIST protocol), folder:PATH (one sub-folder per class, ImageFolder layout) or "
             "csv:FILE (rows path,label)")


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset lives; ``str(spec)`` round-trips through :func:`parse_data`."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    @property
    def is_fashion(self) -> bool:
        """Fashion-MNIST's images and classes (plain or placed)."""
        return self.kind in (FASHION, PLACED)


@dataclass(frozen=True)
class ImageSet:
    """One split in a bundle's input layout: uint8 frames [N, H, W, C] (NHWC), int64 labels, the class names."""

    frames: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def parse_data(text: "str | Path | DataSpec | None") -> DataSpec:
    """``None``/"fashion-mnist" -> the system Fashion-MNIST; "fashion-mnist:DIR", "folder:PATH", "csv:FILE"; a bare
    path is read as what it holds (idx files -> Fashion-MNIST, a .csv file -> csv, another folder -> image folder)."""
    if isinstance(text, DataSpec):
        return text
    if text is None or str(text) in ("", FASHION):
        return DataSpec(FASHION)
    if str(text) == PLACED:
        return DataSpec(PLACED)
    s = str(text)
    kind, sep, rest = s.partition(":")
    if sep and kind in KINDS:
        if not rest:
            raise DataError(f"--data {s!r} names no path: {SPEC_HELP}")
        return DataSpec(kind, Path(rest).expanduser())
    if sep and kind and "/" not in kind and len(kind) > 1:
        raise DataError(f"unknown data kind {kind!r} in --data {s!r}: {SPEC_HELP}")
    p = Path(s).expanduser()
    if p.is_file() and p.suffix.lower() == ".csv":
        return DataSpec("csv", p)
    if p.is_dir() and not any(p.glob("*-idx?-ubyte*")) and any(c.is_dir() for c in p.iterdir()):
        return DataSpec("folder", p)
    return DataSpec(FASHION, p)  # old-style --data DIR with the four idx files


def _split_of(name: str, files: list, split: str) -> list:
    """A fixed TEST_FRACTION of one class's (sorted) files is the test split, the rest the train split."""
    files = sorted(files)
    if len(files) < 2:
        return files if split == "train" else []
    n_test = max(1, int(round(TEST_FRACTION * len(files))))
    order = np.random.default_rng(zlib.crc32(name.encode())).permutation(len(files))
    chosen = set(order[:n_test].tolist()) if split == "test" else set(order[n_test:].tolist())
    return [f for i, f in enumerate(files) if i in chosen]


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} holds no class folders: an image folder needs one sub-folder per class "
                        f"(ROOT/<class>/<image>); {SPEC_HELP}")
    return dirs


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_items(root: Path, split: str) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {SPEC_HELP}")
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    if "train" in split_dirs and ("test" in split_dirs or "val" in split_dirs):
        train_classes = [d.name for d in _class_dirs(split_dirs["train"])]
        folder = split_dirs["train"] if split == "train" else split_dirs.get("test", split_dirs.get("val"))
        classes = tuple(train_classes)
        items = []
        for d in _class_dirs(folder):
            if d.name not in classes:
                raise DataError(f"{d}: class folder {d.name!r} is not among the train split's classes {list(classes)}")
            items += [(p, classes.index(d.name)) for p in _images_in(d)]
        for c in classes:
            if not _images_in(split_dirs["train"] / c):
                raise DataError(f"class folder {split_dirs['train'] / c} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return items, classes
    dirs = _class_dirs(root)
    items = []
    for label, d in enumerate(dirs):
        files = _images_in(d)
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        items += [(p, label) for p in _split_of(d.name, files, split)]
    if len(dirs) < 2:
        raise DataError(f"{root} has only one class folder ({dirs[0].name}); a classifier needs at least two")
    return items, tuple(d.name for d in dirs)


def _csv_items(path: Path, split: str) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist; {SPEC_HELP}")
    rows = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) not in (2, 3):
                raise DataError(f"{path}:{n}: expected `path,label` or `path,label,split`, got {row!r}")
            rows.append((n, row[0].strip(), row[1].strip(), row[2].strip().lower() if len(row) == 3 else None))
    if not rows:
        raise DataError(f"{path} holds no `path,label` rows")
    labels = sorted({r[2] for r in rows}, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    classes = tuple(labels)
    if len(classes) < 2:
        raise DataError(f"{path}: only one label ({classes[0]!r}); a classifier needs at least two")
    by_class: dict[int, list] = {}
    explicit = any(r[3] for r in rows)
    items = []
    for n, p, label, s in rows:
        file = Path(p) if Path(p).is_absolute() else path.parent / p
        if not file.is_file():
            raise DataError(f"{path}:{n}: image {file} does not exist")
        if explicit:
            if s not in ("train", "test", "val"):
                raise DataError(f"{path}:{n}: split must be train, test or val, got {s!r}")
            if (s == "train") == (split == "train"):
                items.append((file, classes.index(label)))
        else:
            by_class.setdefault(classes.index(label), []).append(file)
    for c, files in by_class.items():
        items += [(f, c) for f in _split_of(classes[c], files, split)]
    return items, classes


def _items(spec: DataSpec, split: str) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if spec.kind == "folder":
        return _folder_items(spec.path, split)
    if spec.kind == "csv":
        return _csv_items(spec.path, split)
    raise ValueError(f"{spec} is not a file dataset")


def _decode(path: Path) -> np.ndarray:
    """An image file -> uint8 gray [H, W] or BGR [H, W, 3]; DataError naming the file if it is not one."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    import cv2

    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise DataError(f"{path} is not a readable image (OpenCV cannot decode it)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {img.dtype} (8- or 16-bit gray/colour images only)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        raise DataError(f"{path}: unsupported image shape {img.shape}")
    if min(img.shape[:2]) < 1:
        raise DataError(f"{path} is empty")
    return img


def to_input(img: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """uint8 gray [H, W] or BGR [H, W, 3] -> [height, width, channels] (gray or RGB), as the runtime preprocesses."""
    import cv2

    if channels == 1:
        img = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[:2] != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return img.reshape(height, width, channels)


def detect_channels(spec: "str | Path | DataSpec | None") -> int:
    """3 if any training image of the dataset is in colour, else 1 (Fashion-MNIST: 1)."""
    spec = parse_data(spec)
    if spec.is_fashion:
        return 1
    items, _ = _items(spec, "train")
    for path, _ in items:
        img = _decode(path)
        if img.ndim == 3 and not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])):
            return 3
    return 1


def dataset_classes(spec: "str | Path | DataSpec | None") -> tuple[str, ...]:
    spec = parse_data(spec)
    return CLASSES if spec.is_fashion else _items(spec, "train")[1]


def load_frames(spec: "str | Path | DataSpec | None", split: str, height: int = 28, width: int = 28,
                channels: int = 1, limit: int | None = None) -> ImageSet:
    """One split of any dataset as the frames a bundle with this input takes (uint8 NHWC) and its labels."""
    spec = parse_data(spec)
    if spec.is_fashion:
        images, labels = load_fashion_mnist(split, spec.path)
        if limit:
            images, labels = images[:limit], labels[:limit]
        if spec.kind == PLACED:
            images = place_items(images, PLACEMENT_SEEDS[split])
        if (height, width, channels) == (28, 28, 1):
            return ImageSet(np.ascontiguousarray(images[..., None]), labels, CLASSES)
        frames = np.stack([to_input(im, height, width, channels) for im in images]) if len(images) else \
            np.zeros((0, height, width, channels), np.uint8)
        return ImageSet(frames, labels, CLASSES)
    items, classes = _items(spec, split)
    if not items:
        where = spec.path
        raise DataError(f"{where}: the {split} split is empty (each class needs >= 2 images, or add a {split}/ folder)")
    if limit:
        items = items[:limit]
    frames = np.empty((len(items), height, width, channels), np.uint8)
    for i, (path, _) in enumerate(items):
        frames[i] = to_input(_decode(path), height, width, channels)
    return ImageSet(frames, np.array([c for _, c in items], np.int64), classes)


def data_key(spec: "str | Path | DataSpec | None") -> str:
    """A file-name-safe key of a dataset and its current content (names, sizes, mtimes), for caches."""
    spec = parse_data(spec)
    if spec.is_fashion and spec.path is None:
        return "fashion_mnist" if spec.kind == FASHION else "fashion_mnist_placed"
    h = hashlib.sha256(str(spec).encode())
    if not spec.is_fashion:
        for split in ("train", "test"):
            for path, label in _items(spec, split)[0]:
                st = path.stat()
                h.update(f"{split}|{path}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return f"{spec.kind}-{h.hexdigest()[:12]}"


# -- placed Fashion-MNIST: the paper's augmented-data protocol ----------------------------------------------------------
# Dubois et al. measure their 130 -> 48 bits on *augmented* MNIST: train and test images are drawn at random
# placements (their lossyless code: rotation +-30 deg, x/y shift +-10 %, scale 0.8-1.2, shear +-10 deg, validation and
# test augmented too), so a codec that must reproduce its input pays for the placement and an invariant one does not.
# Camera frames are like that: items are never centred. Each image is placed once, with a fixed seed per split, so
# every codec, probe and baseline sees the same pixels.
PLACEMENT = {"rotate_deg": 30.0, "shift": 0.1, "scale": (0.8, 1.2), "shear_deg": 10.0}
PLACEMENT_SEEDS = {"train": 1, "test": 2}


def place_items(images: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, H, W] -> each image rotated, scaled, sheared and shifted about its centre at a random PLACEMENT
    (bilinear, black outside), reproducible from ``seed``."""
    import cv2

    rng = np.random.default_rng(seed)
    n, h, w = images.shape[:3]
    angle = np.deg2rad(rng.uniform(-PLACEMENT["rotate_deg"], PLACEMENT["rotate_deg"], n))
    zoom = rng.uniform(*PLACEMENT["scale"], n)
    shear = np.tan(np.deg2rad(rng.uniform(-PLACEMENT["shear_deg"], PLACEMENT["shear_deg"], n)))
    shift = rng.uniform(-PLACEMENT["shift"], PLACEMENT["shift"], (n, 2)) * (w, h)
    out = np.empty_like(images)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    for i in range(n):
        c, s = np.cos(angle[i]), np.sin(angle[i])
        a = zoom[i] * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear[i]], [0.0, 1.0]])
        m = np.hstack([a, (centre + shift[i] - a @ centre)[:, None]])
        out[i] = cv2.warpAffine(images[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
    return out
