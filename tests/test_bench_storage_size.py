"""`taskcodec bench storage-size` on a small fill: it measures the product's own store before and after its
compaction (bytes, CPU, query latencies through the reader API) and writes JSON + markdown."""

import json

from taskcodec.bench.storage_size import run


def test_storage_size_bench_measures_the_product_after_compaction(tmp_path):
    result = run(4000, 20, tmp_path, log=lambda *_: None)
    before, after = result["product"]
    assert after["packed_frames"] == before["frames"] - 1 == 3999
    assert after["bytes_per_frame_in_use"] < before["bytes_per_frame_in_use"] / 3
    assert set(after["queries"]) == set(before["queries"]) and all(q["median_ms"] >= 0 for q in after["queries"].values())
    assert json.loads((tmp_path / "storage_size.json").read_text())["product"][1]["blocks"] == after["blocks"]
    assert "after compaction" in (tmp_path / "storage_size.md").read_text()
