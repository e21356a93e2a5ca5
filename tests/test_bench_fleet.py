"""`taskcodec bench fleet` on a tiny real fleet: the real server subprocess, real runtime spools and uplinks, the real
veth counters when a network namespace can be made (root) and application counts when not. No timing assertions."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("fleet-bundle"))


@pytest.fixture(scope="module")
def pool():
    from taskcodec.bench.fleet_client import FramePool

    return FramePool(12)


def test_fleet_run_stores_and_accounts_every_frame(tiny, pool):
    from taskcodec.bench.fleet import RunConfig, run_taskcodec
    from taskcodec.bench.fleet_servers import Network

    network = Network()
    try:
        r = run_taskcodec(RunConfig(cameras=3, fps=4, duration=2, max_delay=0.3, drain_timeout=90), network, tiny,
                          pool, log=lambda _: None)
    finally:
        network.close()
    assert r["frames_expected"] == 3 * 8
    assert r["frames_captured"] == r["frames_expected"]
    assert r["frames_stored"] == r["frames_captured"] and r["frames_lost"] == 0 and r["drained"]
    assert r["spool_pending_at_end"] == 0
    assert r["payload_bytes_per_frame"] > 2  # 2 check bytes + the range-coded bytes
    # WebSocket message bytes carry every payload plus the BATCH framing.
    assert r["app_bytes_up"] >= r["client"]["payload_bytes"] + r["frames_captured"]
    assert r["framing_bytes_per_frame"] > 0
    assert 0 <= r["latency_ms_p50"] <= r["latency_ms_p99"] <= r["latency_ms_max"]
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["server_cpu_s"] >= 0
    if r["network"] == "ip":
        assert r["ip_bytes_up"] > r["app_bytes_up"]  # TCP/IP headers and WebSocket framing on top
        assert r["ip_bytes_down"] > 0 and r["packets_up"] > 0  # acks come back
        assert r["ip_bytes_per_frame"] == pytest.approx(r["ip_bytes_up_per_frame"] + r["ip_bytes_down_per_frame"])
    else:
        assert "ip_bytes" not in r


def test_cli_writes_report_with_baselines(tiny, tmp_path):
    from taskcodec.cli import app

    out = tmp_path / "results"
    res = CliRunner().invoke(app, ["bench", "fleet", "--bundle", str(tiny.path), "--cameras", "2", "--fps", "2",
                                   "--duration", "1.5", "--max-delay", "0", "--no-h264", "--pool", "8",
                                   "--no-netns", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "fleet.json").read_text())
    assert data["network"]["mode"] == "app" and "IP-level bytes NOT measured" in data["network"]["how"]
    run = data["run"]
    assert run["frames_stored"] == run["frames_captured"] == 2 * 3
    base = data["baselines"]
    assert base["jpeg_quality"] == 90  # no classical.json in this folder
    for kind in ("jpeg_roi", "jpeg_frame"):
        b = base[kind]
        assert b["frames"] == run["frames_captured"]
        assert b["payload_bytes_per_frame"] > run["payload_bytes_per_frame"]
        assert 0 <= b["probe_accuracy"] <= 1
    assert base["jpeg_frame"]["payload_bytes_per_frame"] > base["jpeg_roi"]["payload_bytes_per_frame"]
    md = (out / "fleet.md").read_text()
    assert "## Targets" in md and "jpeg_roi" in md and "not measured" in md


def test_jpeg_quality_comes_from_classical_results(tmp_path):
    from taskcodec.bench.fleet_baselines import jpeg_quality

    assert jpeg_quality(tmp_path / "missing.json", 0.9)[0] == 90
    path = tmp_path / "classical.json"
    path.write_text(json.dumps({"rows": [{"codec": "jpeg", "quality": q, "accuracy": a} for q, a in
                                         ((5, 0.80), (20, 0.88), (50, 0.90), (90, 0.905))]
                                        + [{"codec": "webp", "quality": 1, "accuracy": 0.95}]}))
    assert jpeg_quality(path, 0.87)[0] == 20
    q, why = jpeg_quality(path, 0.99)
    assert q == 90 and "NOT matched" in why
    path.write_text("{not json")
    assert jpeg_quality(path, 0.9)[0] == 90


def test_cli_refuses_bad_input_clearly(tmp_path):
    from taskcodec.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "fleet", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not a taskcodec bundle" in res.output
    res = runner.invoke(app, ["bench", "fleet", "--camera-work", "sometimes", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "live or cached" in res.output
    assert not (tmp_path / "fleet.json").exists()
