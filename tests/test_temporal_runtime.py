"""Temporal coding with real processes (issue 15), part 2: the runtime itself killed with SIGKILL mid-stream and
restarted on its spool: frames that were in flight, possibly stored as lossy SAME frames, are re-sent as exactly
what the server may hold: no CONFLICT, no refused frame, nothing lost (the budget: tests/test_temporal_budget.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np

from taskcodec import testing
from taskcodec.bundle import load_bundle
from taskcodec.coding import RangeCoder, decompress
from test_temporal_e2e import DWELL, camera_symbols

TIMEOUT = 60


def capture_cmd(srv, spool, frames: int, report) -> list[str]:
    return [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device",
            "virtual://dwell?" + DWELL.format(seed=9, n=400), "--server", srv.url, "--camera-id", "cam-r",
            "--spool", str(spool), "--frames", str(frames), "--fps", "20", "--temporal", "--threads", "1",
            "--quiet", "--max-delay", "0.02", "--report", str(report), "--drain-timeout", str(TIMEOUT)]


def test_runtime_killed_and_restarted_on_its_spool(tmp_path):
    bundle = load_bundle(None)
    db = tmp_path / "server.db"
    with testing.ServerProcess(None, db) as srv:
        env = dict(os.environ, TASKCODEC_TOKEN=srv.add_camera("cam-r").decode())
        first = subprocess.Popen(capture_cmd(srv, tmp_path / "spool", 200, tmp_path / "r1.json"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + TIMEOUT
        stored = 0
        while stored < 40 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
            stored = srv.get_json("/v1/cameras/cam-r/frames?limit=1000").get("count") or len(
                srv.get_json("/v1/cameras/cam-r/frames?limit=1000")["frames"])
        assert first.poll() is None and stored >= 40, "the kill must land mid-stream"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = subprocess.run(capture_cmd(srv, tmp_path / "spool", 40, tmp_path / "r2.json"), env=env,
                                capture_output=True, text=True, timeout=3 * TIMEOUT)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "conflict" not in srv.log().lower().replace("conflicts", "")
    import json

    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["rejected"] == 0 and report["dropped"] == 0 and report["spool_depth"] == 0
    assert report["temporal"]["temporal"] and report["temporal"]["kinds"]["same"] > 0
    con = sqlite3.connect(str(db))
    rows = dict(con.execute("SELECT seq, payload FROM frames WHERE camera_id = 'cam-r'").fetchall())
    con.close()
    m = max(rows) + 1
    assert sorted(rows) == list(range(m)) and m >= 40 + 40  # nothing lost, each frame once
    first_run = m - 40                      # the first run captured seqs 0..first_run-1; the second 40 more
    sym = camera_symbols(bundle, 9, max(first_run, 40))
    truth = np.concatenate([sym[:first_run], sym[:40]])
    key = RangeCoder(bundle.tables)
    dist = [np.abs(decompress(bytes(rows[i]), key, bundle.model_tag) - truth[i]).sum() for i in range(m)]
    assert max(dist) <= report["temporal"]["same_l1"]


def test_lossy_frames_are_resent_as_what_the_server_may_hold(tmp_path):
    """The mechanism behind 'no CONFLICT after a runtime kill -9': frames sent as lossy SAME are re-sent by a new
    process (same spool) as exactly their reconstruction; without the reconstruction file they would differ."""
    from taskcodec import wire
    from taskcodec.coding import compress
    from taskcodec.coding.temporal import TemporalDecoder
    from taskcodec.runtime.spool import Spool
    from taskcodec.runtime.temporal_uplink import RECON_NAME, TemporalSettings, TemporalTranscoder

    bundle = load_bundle(None)
    key, res = RangeCoder(bundle.tables), RangeCoder(bundle.residual_tables)
    sym = camera_symbols(bundle, 9, 60)
    spool = Spool(tmp_path / "spool", camera_id="cam", model_id=bundle.model_id)
    first = TemporalTranscoder(bundle, TemporalSettings(same_l1=12), spool)  # the process that gets killed
    for i, s in enumerate(sym):  # frames it captures
        spool.append(1000 + 200 * i, compress(s, key, bundle.model_tag))

    def send(transcoder) -> np.ndarray:
        transcoder.start_connection(wire.Welcome(3, wire.CAP_TEMPORAL))
        batch, bad = transcoder.batch(spool.pending(len(sym)))
        assert not bad
        dec = TemporalDecoder(key, res, bundle.model_tag, bundle.residual_tag)
        return np.stack([dec.decode(f.kind, f.payload) for f in wire.decode(batch.encode()).frames])

    stored = send(first)
    assert first.lossy > 0 and (np.abs(stored - sym).sum(1) > 0).any()
    spool.close()
    spool = Spool(tmp_path / "spool", camera_id="cam", model_id=bundle.model_id)  # the restarted process
    again = send(TemporalTranscoder(bundle, TemporalSettings(same_l1=12), spool))
    np.testing.assert_array_equal(again, stored)  # every KEY-equivalent payload the same: duplicates, not conflicts
    # negative control: without the reconstructions, the lossy frames go as their true symbols (would conflict)
    (tmp_path / "spool" / RECON_NAME).unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / "spool" / (RECON_NAME + suffix)).unlink(missing_ok=True)
    forgetful = send(TemporalTranscoder(bundle, TemporalSettings(same_l1=12), spool))
    assert (np.abs(forgetful - stored).sum(1) > 0).any()
    np.testing.assert_array_equal(forgetful, sym)  # frames maybe sent before are re-sent exactly
    spool.close()
