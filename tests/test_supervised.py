"""The supervised CNN baseline really learns Fashion-MNIST (small subset, 1 epoch) and rejects bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from taskcodec.data import load_fashion_mnist  # noqa: E402
from taskcodec.training.supervised import accuracy, predict, train_cnn  # noqa: E402


@pytest.fixture(scope="module")
def data():
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    return x[:2000], y[:2000], xt[:500], yt[:500]


def test_trains_well_above_chance_and_is_deterministic(data):
    x, y, xt, yt = data
    model = train_cnn(x, y, epochs=1, seed=3, threads=1)
    acc = accuracy(model, xt, yt)
    assert 0.5 < acc <= 1.0  # chance is 0.1; 2000 images x 1 epoch reach ~0.7
    again = train_cnn(x, y, epochs=1, seed=3, threads=1)
    np.testing.assert_array_equal(predict(model, xt[:100]), predict(again, xt[:100]))
    assert torch.get_num_threads() >= 1  # train_cnn restores the caller's thread count


def test_bad_input_is_rejected(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="uint8"):
        train_cnn(x[:10].astype(np.float32), y[:10], epochs=1)
    with pytest.raises(ValueError, match="labels"):
        train_cnn(x[:10], y[:9], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_cnn(x[:10], y[:10], epochs=0)
