"""Fashion-MNIST reader: real data loads; missing, truncated, corrupt or foreign files give a clear error that says
how to get the data."""

import gzip
import shutil

import numpy as np
import pytest

from taskcodec.data import DEFAULT_DIR, DataError, load_fashion_mnist

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def folder(tmp_path):
    """A copy of the real dataset, test split only uncompressed, so both file forms are read."""
    for name in NAMES:
        if name.startswith("t10k"):
            with gzip.open(DEFAULT_DIR / f"{name}.gz") as f:
                (tmp_path / name).write_bytes(f.read())
        else:
            shutil.copy(DEFAULT_DIR / f"{name}.gz", tmp_path / f"{name}.gz")
    return tmp_path


def test_real_data_loads_from_gzip_and_plain_files(folder):
    x, y = load_fashion_mnist("train", folder)
    xt, yt = load_fashion_mnist("test", folder)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert xt.shape == (10000, 28, 28) and set(np.unique(yt)) == set(range(10))
    assert np.array_equal(xt, load_fashion_mnist("test")[0])


def test_missing_folder_and_missing_file(folder, tmp_path):
    with pytest.raises(DataError, match="does not exist.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*not found.*--data DIR"):
        load_fashion_mnist("test", folder)


def test_truncated_corrupt_and_foreign_files(folder):
    plain = folder / "t10k-images-idx3-ubyte"
    data = plain.read_bytes()
    plain.write_bytes(data[:-100])
    with pytest.raises(DataError, match="header promises"):
        load_fashion_mnist("test", folder)
    plain.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="not an idx file"):
        load_fashion_mnist("test", folder)
    plain.write_bytes(b"\x00\x00\x08\x01" + data[4:])  # a labels header on an images file
    with pytest.raises(DataError, match="not an idx file"):
        load_fashion_mnist("test", folder)
    gz = folder / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:500])  # cut mid-stream
    with pytest.raises(DataError, match="corrupt"):
        load_fashion_mnist("train", folder)
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        load_fashion_mnist("train", folder)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", folder)


# -- operator datasets (issue 16): image folders and CSVs --------------------------------------------------------
import cv2  # noqa: E402

from taskcodec.data import ImageSet, dataset_classes, detect_channels, load_frames, parse_data  # noqa: E402


def _img(path, shape, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def test_data_specs_parse():
    assert parse_data(None).is_fashion and parse_data("fashion-mnist").path is None
    assert str(parse_data("folder:/x/y")) == "folder:/x/y" and parse_data("csv:a.csv").kind == "csv"
    assert parse_data(str(DEFAULT_DIR)).is_fashion  # the old --data DIR of idx files still works
    with pytest.raises(DataError, match="unknown data kind 'zip'"):
        parse_data("zip:/x")
    with pytest.raises(DataError, match="names no path"):
        parse_data("folder:")


def test_image_folder_gray_and_rgb_any_size_resized_like_the_runtime(tmp_path):
    for i in range(5):
        _img(tmp_path / "cats" / f"{i}.png", (40 + i, 30, 3), 200)   # RGB, odd sizes
        _img(tmp_path / "dogs" / f"{i}.jpg", (17, 90), 50)           # gray JPEG
    (tmp_path / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    spec = parse_data(f"folder:{tmp_path}")
    assert detect_channels(spec) == 1  # the "RGB" cats are gray in all three channels
    _img(tmp_path / "cats" / "color.png", (20, 20, 3), 0)
    cv2.imwrite(str(tmp_path / "cats" / "color.png"), np.dstack([np.zeros((20, 20)), np.full((20, 20), 255),
                                                                  np.zeros((20, 20))]).astype(np.uint8))
    assert detect_channels(spec) == 3 and dataset_classes(spec) == ("cats", "dogs")
    tr, te = load_frames(spec, "train", 32, 48, 3), load_frames(spec, "test", 32, 48, 3)
    assert isinstance(tr, ImageSet) and tr.frames.shape[1:] == (32, 48, 3) and tr.frames.dtype == np.uint8
    assert len(tr) + len(te) == 11 and set(te.labels) == {0, 1}  # a fixed 20 % per class is the test split
    assert len(load_frames(spec, "train", 32, 48, 3)) == len(tr)  # deterministic
    gray = load_frames(spec, "test", 28, 28, 1)
    assert gray.frames.shape[1:] == (28, 28, 1)


def test_split_folders_and_csv(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _img(tmp_path / "tree" / split / c / f"{i}.png", (10, 10), 10 * i)
    tr = load_frames(f"folder:{tmp_path / 'tree'}", "train", 8, 8, 1)
    te = load_frames(f"folder:{tmp_path / 'tree'}", "test", 8, 8, 1)
    assert (len(tr), len(te)) == (6, 4) and tr.classes == ("a", "b")
    rows = ["path,label,split"] + [f"tree/train/{c}/{i}.png,{c},train" for c in "ab" for i in range(3)] + \
           [f"tree/test/{c}/0.png,{c},test" for c in "ab"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    s = load_frames(f"csv:{tmp_path / 'list.csv'}", "test", 8, 8, 1)
    assert len(s) == 2 and s.classes == ("a", "b") and s.labels.tolist() == [0, 1]
    (tmp_path / "bad.csv").write_text("tree/train/a/0.png,a\nmissing.png,b\n")
    with pytest.raises(DataError, match=r"bad.csv:2: image .*missing.png does not exist"):
        load_frames(f"csv:{tmp_path / 'bad.csv'}", "train")


def test_bad_trees_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_frames(f"folder:{tmp_path / 'nowhere'}", "train")
    with pytest.raises(DataError, match="holds no class folders"):
        load_frames(f"folder:{tmp_path}", "train")
    _img(tmp_path / "only" / "x.png", (5, 5))
    _img(tmp_path / "only" / "y.png", (5, 5))
    with pytest.raises(DataError, match="only one class folder"):
        load_frames(f"folder:{tmp_path}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'empty'} holds no images"):
        load_frames(f"folder:{tmp_path}", "train")
    _img(tmp_path / "empty" / "ok.png", (5, 5))
    (tmp_path / "empty" / "zz.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="zz.png is not a readable image"):
        for split in ("train", "test"):
            load_frames(f"folder:{tmp_path}", split, 8, 8, 1)


def test_placed_fashion_mnist_is_the_same_items_at_fixed_random_placements():
    from taskcodec.data import PLACED, load_frames, place_items

    plain, placed = load_frames("fashion-mnist", "test", limit=500), load_frames(PLACED, "test", limit=500)
    assert parse_data(PLACED).is_fashion and parse_data(f"{PLACED}:{DEFAULT_DIR}").kind == PLACED
    assert placed.frames.shape == plain.frames.shape and np.array_equal(placed.labels, plain.labels)
    assert placed.classes == plain.classes
    again = load_frames(PLACED, "test", limit=500)
    assert np.array_equal(placed.frames, again.frames)  # reproducible: one fixed placement per image
    moved = np.abs(placed.frames.astype(int) - plain.frames.astype(int)).mean(axis=(1, 2, 3))
    assert (moved > 5).mean() > 0.9  # nearly every item is visibly moved, rotated or resized
    # the item is moved, not destroyed: the placed image's ink is close to the original's (scale 0.8-1.2 changes it)
    ink = placed.frames.astype(float).sum(axis=(1, 2, 3)) / plain.frames.astype(float).sum(axis=(1, 2, 3)).clip(1)
    assert 0.6 < np.median(ink) < 1.4
    other = place_items(plain.frames[..., 0], seed=99)
    assert not np.array_equal(other, placed.frames[..., 0])  # train and test splits use different seeds
