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
