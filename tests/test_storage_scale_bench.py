"""`taskcodec bench storage-size --queries-at-scale` on a small fill: the product's own write and compaction paths
leave every written frame readable at every stage, packed hours grow, and the report is written."""

import json
import shutil
from pathlib import Path

import pytest

from taskcodec.bench.storage_size import run_scale


def _check(stages, frames):
    assert "holds it" in stages[-2]["stage"] and stages[-1]["stage"].endswith("fully compacted")
    assert all(s["stored"] == s["frames"] for s in stages)  # nothing lost or doubled by any compaction
    assert stages[-1]["frames"] == frames and stages[-1]["rows"] < stages[-2]["rows"]
    assert all(q["median_ms"] > 0 for s in stages for q in s["queries"].values())


def test_scale_fill_sqlite_keeps_every_frame_through_hourly_compaction(tmp_path):
    result = run_scale(30_000, 4, tmp_path, sqlite=True, pg=False, log=lambda m: None)
    _check(result["sqlite"]["stages"], 30_000)
    assert json.loads((tmp_path / "storage_size_queries.json").read_text())["sqlite"]["frames"] == 30_000
    assert (tmp_path / "storage_size_queries.md").is_file()


@pytest.mark.skipif(not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not shutil.which("initdb"),
                    reason="needs the Debian package postgresql (scripts/install.sh installs it)")
def test_scale_fill_postgresql_keeps_every_frame_through_hourly_compaction(tmp_path):
    result = run_scale(30_000, 4, tmp_path, sqlite=False, pg=True, log=lambda m: None)
    _check(result["pg"]["stages"], 30_000)
