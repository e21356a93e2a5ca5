"""Classical codec baselines: real Pillow/OpenCV round trips on real Fashion-MNIST images, the bytes-at-accuracy
interpolation, and a tiny end-to-end run of the benchmark and its CLI (small subset, 1 epoch)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from taskcodec.bench.classical import (CodecError, available, bytes_at_accuracy, decode, encode, parse_qualities, payload_size,
                             round_trip)
from taskcodec.data import load_fashion_mnist


@pytest.fixture(scope="module")
def test_images():
    x, _ = load_fashion_mnist("test")
    return x[:100]


@pytest.mark.parametrize("codec,qualities", [("jpeg", (1, 10, 50, 90)), ("webp", (0, 5, 50, 90)),
                                             ("avif", (0, 30, 80))])
def test_sizes_grow_with_quality_and_error_shrinks(test_images, codec, qualities):
    if not available(codec):
        pytest.skip(f"{codec} not supported by this Pillow/OpenCV build")
    sizes, errors = [], []
    for q in qualities:
        rt = round_trip(test_images, codec, q)
        assert rt.decoded.shape == test_images.shape and rt.decoded.dtype == np.uint8
        assert (rt.payload_bytes > 0).all() and (rt.payload_bytes < rt.file_bytes).all()
        sizes.append(rt.file_bytes.mean())
        errors.append(np.abs(rt.decoded.astype(int) - test_images).mean())
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert errors[-1] < errors[0]


def test_png_is_lossless(test_images):
    rt = round_trip(test_images[:20], "png", None)
    np.testing.assert_array_equal(rt.decoded, test_images[:20])
    data = encode(test_images[0], "png", None)
    assert payload_size(data, "png") < len(data)
    np.testing.assert_array_equal(decode(data, "png"), test_images[0])


def test_bad_codec_and_quality_are_rejected(test_images):
    with pytest.raises(CodecError):
        encode(test_images[0], "gif", 5)
    with pytest.raises(CodecError):
        encode(test_images[0], "jpeg", 101)
    with pytest.raises(CodecError):
        encode(test_images[0], "png", 5)
    with pytest.raises(CodecError):
        parse_qualities(["jpeg=abc"])
    assert parse_qualities(["jpeg=1,5", "png=lossless"]) == {"jpeg": (1, 5), "png": (None,)}


def test_bytes_at_accuracy_interpolates_in_log_bytes():
    rows = [{"codec": "jpeg", "bytes_per_image": b, "accuracy": a}
            for b, a in [(100.0, 0.80), (400.0, 0.90), (800.0, 0.92)]]
    b, bound = bytes_at_accuracy(rows, "jpeg", 0.85)
    assert not bound and math.isclose(b, 200.0)  # halfway in accuracy = geometric mean of 100 and 400
    assert bytes_at_accuracy(rows, "jpeg", 0.90) == (400.0, False)
    assert bytes_at_accuracy(rows, "jpeg", 0.70) == (100.0, True)  # lowest quality already beats the target
    assert bytes_at_accuracy({"rows": rows}, "jpeg", 0.95) == (None, False)
    with pytest.raises(KeyError):
        bytes_at_accuracy(rows, "webp", 0.9)


def test_cli_runs_the_pipeline_and_writes_results(tmp_path):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from taskcodec.cli import app

    args = ["bench", "classical", "-q", "jpeg=5", "-q", "png", "--epochs", "1", "--baseline-epochs", "1",
            "--train-limit", "600", "--test-limit", "200",
            "--baseline-train-limit", "600", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "classical.json").read_text())
    rows = {(r["codec"], r["quality"]): r for r in data["rows"]}
    assert set(rows) == {("raw", None), ("jpeg", 5), ("png", None)}
    assert rows[("png", None)]["pixel_mae"] == 0.0
    assert rows[("jpeg", 5)]["bytes_per_image"] < rows[("png", None)]["bytes_per_image"] < 784
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_test"] == 200 and r["epochs"] == 1
    assert data["baseline"]["codec"] == "raw" and data["machine"]["cores"] >= 1
    md = (tmp_path / "classical.md").read_text()
    assert "| jpeg | 5 |" in md and "Machine:" in md
    assert (tmp_path / "classical.png").stat().st_size > 1000

    # resume: a second run reuses every row instead of retraining
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reusing") == 3

    (tmp_path / "classical.md").unlink()
    rebuilt = CliRunner().invoke(app, ["bench", "classical", "--report-only", "--out", str(tmp_path)])
    assert rebuilt.exit_code == 0 and "bytes per image at equal accuracy" in (tmp_path / "classical.md").read_text().lower()
    missing = CliRunner().invoke(app, ["bench", "classical", "--report-only", "--out", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not found" in missing.output

    bad = CliRunner().invoke(app, ["bench", "classical", "-q", "bmp=1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown codec" in bad.output
