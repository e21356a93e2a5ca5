"""`taskcodec bench coder` writes coder.{json,md} with the size bound over real test images and the C coder's
timings next to the other implementations (a small run; the committed results come from the full command)."""

import json

import pytest

from taskcodec.bench.coder import run
from taskcodec.data import DataError, load_fashion_mnist


def test_bench_coder_writes_size_bound_and_timings(tmp_path):
    try:
        load_fashion_mnist("test")
    except (DataError, FileNotFoundError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    result = run(None, None, 300, 50, 1, tmp_path, log=lambda *_: None)
    saved = json.loads((tmp_path / "coder.json").read_text())
    size = saved["size"]
    assert size["images"] == 300 and size["roundtrip_failures"] == 0
    assert size["bound_violations"] == 0 and size["bound_worst_slack_bits"] <= 0
    assert size["coded_bits_mean"] < size["estimate_bits_mean"] + 8
    names = [row["coder"] for row in saved["timing"]["rows"]]
    assert any(n.startswith("C library") for n in names) and any(n.startswith("numpy/Python") for n in names)
    assert all(row["encode_us"] > 0 and row["decode_us"] > 0 for row in saved["timing"]["rows"])
    assert "bound" in (tmp_path / "coder.md").read_text() and result["bundle"]["coder"] == "taskcodec-range56"
