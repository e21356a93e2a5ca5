"""Temporal coding end to end (issue 15) with the real server subprocess (taskcodec.testing.ServerProcess) and the
default bundle (which ships residual tables): a runtime with --temporal streaming virtual://dwell; the server's
predictions and stored payloads equal offline temporal decoding of the same symbols; and with the server killed
(SIGKILL) twice mid-stream and restarted on the same port and database, every frame is stored exactly once, none is
refused, and every stored frame is within the SAME threshold of the camera's own symbols (a frame decoded against a
reference the server did not have would be far off)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import numpy as np
import pytest

from taskcodec import testing
from taskcodec.bundle import load_bundle
from taskcodec.coding import RangeCoder, compress, decompress
from taskcodec.coding.temporal import KIND_NAMES, TemporalDecoder, TemporalEncoder
from taskcodec.runtime.capture import CaptureConfig, CaptureRuntime, run_capture
from taskcodec.runtime.dwell import DwellCamera
from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.server.classify import Classifier

TIMEOUT = 60
DWELL = "seed={seed}&count={n}&rate=5&dwell=1-3"


@pytest.fixture(scope="module")
def bundle():
    b = load_bundle(None)
    assert b.residual_tables is not None, "the default bundle ships residual tables"
    return b


def camera_symbols(bundle, seed: int, n: int) -> np.ndarray:
    cam = DwellCamera({k: v for k, v in (p.split("=") for p in DWELL.format(seed=seed, n=n).split("&"))})
    pre, enc = Preprocessor(bundle.input), FrameEncoder(bundle, threads=1)
    x = np.concatenate([pre(cam.render(k)[0]) for k in range(n)])
    return enc.symbols(x)


def stored_frames(db, camera: str) -> dict[int, tuple[bytes, int]]:
    con = sqlite3.connect(str(db))
    try:
        return {seq: (bytes(p), pred) for seq, p, pred in con.execute(
            "SELECT seq, payload, prediction FROM frames WHERE camera_id = ?", (camera,))}
    finally:
        con.close()


def test_server_predictions_equal_offline_temporal_decoding(tmp_path, bundle):
    n = 200
    with testing.ServerProcess(None, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-t").decode()
        report = run_capture(CaptureConfig(
            device="virtual://dwell?" + DWELL.format(seed=3, n=n), server=srv.url, camera_id="cam-t", token=token,
            spool=str(tmp_path / "spool"), quiet=True, temporal=True, threads=1, drain_timeout=TIMEOUT))
        assert "RESYNC" not in srv.log()
    assert report.acked == n and report.dropped == 0
    t = report.temporal
    assert t["temporal"] and t["connections"] == 1 and t["frames_sent"] == n
    # offline: the same symbols through the same policy, decoded as the server does
    sym = camera_symbols(bundle, 3, n)
    key, res = RangeCoder(bundle.tables), RangeCoder(bundle.residual_tables)
    tag, rtag = bundle.model_tag, bundle.residual_tag
    enc = TemporalEncoder(key, res, tag, t["key_interval"], t["same_l1"], rtag)
    dec = TemporalDecoder(key, res, tag, rtag)
    decoded, kinds, bits = [], {"key": 0, "cond": 0, "same": 0}, 0
    for s in sym:
        kind, payload = enc.encode(s)
        decoded.append(dec.decode(kind, payload))
        kinds[KIND_NAMES[kind]] += 1
        bits += 8 * len(payload)
    decoded = np.stack(decoded)
    assert {k: t["kinds"][k] for k in kinds} == kinds
    assert t["payload_bits_per_frame"] == pytest.approx(bits / n)
    stored = stored_frames(tmp_path / "server.db", "cam-t")
    assert sorted(stored) == list(range(n))
    for i in range(n):  # the stored payload is the KEY-equivalent of what the server decoded
        np.testing.assert_array_equal(decompress(stored[i][0], key, tag), decoded[i])
        assert stored[i][0] == compress(decoded[i], key, tag)
    offline_pred = Classifier(bundle).predict(decoded)[0]
    assert [stored[i][1] for i in range(n)] == offline_pred.tolist()
    independent = np.mean([8 * len(compress(s, key, tag)) for s in sym])
    assert t["payload_bits_per_frame"] < 0.5 * independent and t["same_share"] > 0.5


def test_server_killed_twice_mid_stream_leaves_no_undecodable_frame(tmp_path, bundle):
    n, same_l1 = 240, 10
    db = tmp_path / "server.db"
    rng = np.random.default_rng(15)
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(testing.ServerProcess(None, db))
        port = srv.port
        token = srv.add_camera("cam-k").decode()
        rt = CaptureRuntime(CaptureConfig(
            device="virtual://dwell?" + DWELL.format(seed=5, n=n), server=srv.url, camera_id="cam-k", token=token,
            spool=str(tmp_path / "spool"), fps=20, quiet=True, temporal=True, same_l1=same_l1, threads=1,
            drain_timeout=2 * TIMEOUT, max_delay=0.02))
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", rt.run()))
        thread.start()
        logs = []
        kill_at = 0
        for _ in range(2):
            kill_at = max(kill_at, rt.stats.acked) + int(rng.integers(10, 40))  # a random point after the last one
            deadline = time.monotonic() + TIMEOUT
            while rt.stats.acked < kill_at and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.01)
            srv.kill()  # SIGKILL: the session's reference is gone with the process
            assert rt.stats.captured < n and thread.is_alive(), "the kill must land mid-stream"
            logs.append(srv.log())
            srv = stack.enter_context(testing.ServerProcess(None, db, "--port", str(port)))
        thread.join(3 * TIMEOUT)
        assert not thread.is_alive()
        logs.append(srv.log())
    report = result["r"]
    assert report.acked == n and report.spool_depth == 0 and report.dropped == 0 and report.rejected == 0
    assert report.reconnects >= 2 and report.temporal["connections"] >= 3
    assert report.temporal["kinds"]["cond"] > 0 and report.temporal["kinds"]["same"] > 0
    assert not any("CONFLICT" in log.upper() and "conflict:" in log for log in logs)
    stored = stored_frames(db, "cam-k")
    assert sorted(stored) == list(range(n))  # each frame exactly once (the key is the primary key)
    sym = camera_symbols(bundle, 5, n)
    key = RangeCoder(bundle.tables)
    dist = np.array([np.abs(decompress(stored[i][0], key, bundle.model_tag) - sym[i]).sum() for i in range(n)])
    assert dist.max() <= same_l1, np.nonzero(dist > same_l1)
