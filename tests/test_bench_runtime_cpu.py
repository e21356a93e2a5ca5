"""`taskcodec bench runtime --cpu`: a real `runtime capture` child process (pre-rendered virtual camera, paced) against
the real server; the report's CPU figures are consistent with each other and every frame is acked."""

import json

from typer.testing import CliRunner

from taskcodec.bench.cli import bench_app
from tiny_bundle import make_tiny_bundle

runner = CliRunner()


def test_cpu_bench_measures_the_paced_runtime_process(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    result = runner.invoke(bench_app, ["runtime", "--bundle", str(bundle.path), "--no-stages", "--cpu", "--fps", "60",
                                       "--cpu-frames", "150", "--capture-args", "--max-delay 0.1",
                                       "--out", str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "prof" / "runtime_cpu.json").read_text())
    run = data["runs"][0]
    assert run["precision"] == "fp32" and run["frames"] == run["acked"] == 150 and run["frames_measured"] == 90
    assert 40 < run["fps"] <= 61  # paced by --fps
    assert run["process_cpu_ms_per_frame"] > 0 and sum(run["threads_ms_per_frame"].values()) > 0
    assert any(k.startswith("uplink thread") for k in run["threads_ms_per_frame"])
    assert "--max-delay 0.1" in data["command"]
    assert data["coding_cpu"]["backends"] and data["pacing_probe"]["best_round"]
    assert {"back_to_back", "paced_60fps", "paced_60fps_windows_of_6"} == set(data["pacing_probe"]["best_round"])
    assert data["capture_defaults"]["batch_window"] > 0 and "batch-window" in data["command"]
    assert "| fp32 | full | 90 |" in (tmp_path / "prof" / "runtime_cpu.md").read_text()
