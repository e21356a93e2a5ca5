"""`taskcodec mqtt-capture` on the runtime's durable spool, with real processes: three nats-server nodes with their
MQTT listeners and JetStream (R3), PostgreSQL and a worker (taskcodec.server.cluster.local.LocalCluster), and the
camera as a `taskcodec mqtt-capture` subprocess.

1. SIGKILL of the camera mid-stream, then a restart on the same spool: every frame that was spooled is stored exactly
   once in PostgreSQL, under the spool's one epoch with seqs 0..n-1 without a gap (the frames not yet PUBACKed, or
   PUBACKed but still in the spool, are published again with the same (epoch, seq); the unique key keeps one copy).
2. The MQTT listener the camera points at is down when it starts, comes up, and goes down again mid-stream: the
   camera keeps capturing into its spool, says so on the console, reconnects, and every frame is stored once.
3. A wrong token: the workers' refusal (on the reply topic, after PUBACK) stops the camera with a clear error
   (exit 1) and nothing is stored; every captured frame stays in the spool (the refusal grace), and a run with the
   right token stores them all, once.
4. A broker refusing the MQTT connection as not authorized: a clear error (exit 1), not a retry loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from taskcodec.server.cluster.local import LocalCluster
from tiny_bundle import make_tiny_bundle

needs = [shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists(),
         any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]
pytestmark = pytest.mark.skipif(not all(needs), reason="needs the Debian packages nats-server and postgresql "
                                                        "(scripts/install.sh installs them)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def cluster(bundle):
    with LocalCluster([bundle.path], gateways=0, workers=1) as c:
        yield c


def _stored(dsn: str, camera: str) -> tuple[int, int, list[int], list[int]]:
    """(rows, distinct (epoch, seq), epochs, sorted seqs) stored for ``camera``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT epoch, seq FROM frames WHERE camera_id = %s", (camera,)).fetchall()
    return len(rows), len(set(rows)), sorted({e for e, _ in rows}), sorted(s for _, s in rows)


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mqtt-capture exited ({proc.returncode}) while waiting for {what}: "
                                 f"{log.read_text() if log else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _spool_state(folder: Path) -> tuple[int, int, int]:
    """(epoch, frames still in the spool, seqs ever handed out) read from the spool's SQLite file, read-only."""
    db = sqlite3.connect(f"file:{folder / 'spool.sqlite3'}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        epoch, floor = int(meta["epoch"]), int(meta["seq_floor"])
        left, top = db.execute("SELECT COUNT(*), MAX(seq) FROM frames WHERE epoch = ?", (epoch,)).fetchone()
    finally:
        db.close()
    return epoch, left, max(floor, 0 if top is None else top + 1)


def _capture(cluster, bundle, cam: str, token: bytes, spool: Path, node: int, frames: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "taskcodec.cli", "mqtt-capture", "--device",
            f"virtual://fashion-mnist?size=28x28&count={frames}", "--bundle", str(bundle.path),
            "--broker", cluster.mqtt_url(node), "--camera-id", cam, "--spool", str(spool), *extra]


def _env(token: bytes) -> dict:
    return dict(os.environ, TASKCODEC_TOKEN=token.decode())


def test_sigkill_mid_stream_then_restart_on_the_spool_stores_every_frame_once(cluster, bundle, tmp_path):
    cam = "kill-cam"
    token = cluster.add_camera(cam)
    spool, log = tmp_path / "spool", tmp_path / "run1.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_capture(cluster, bundle, cam, token, spool, 0, 1000, "--fps", "50",
                                         "--frames-per-message", "4", "--max-delay", "0.2",
                                         "--refusal-grace", "0.5"),
                                stdout=out, stderr=subprocess.STDOUT, env=_env(token))
    try:
        # past the spool's first deferred DELETE of acknowledged frames (Spool.ACK_DELAY), so that it holds only
        # part of what was captured
        def acked_and_deleted() -> bool:
            if not (spool / "spool.sqlite3").exists() or _stored(cluster.pg_dsn, cam)[0] < 100:
                return False
            try:
                _, left, spooled = _spool_state(spool)
            except sqlite3.Error:   # the camera is creating it
                return False
            return left < spooled

        _wait(acked_and_deleted, 40, "frames stored and deleted from the spool before the kill", proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    epoch, left, spooled = _spool_state(spool)
    stored_at_kill = _stored(cluster.pg_dsn, cam)[0]
    # frames still spooled at the kill (not PUBACKed yet, or PUBACKed with their DELETE deferred): the restart
    # publishes them again, so the test exercises the re-send and the deduplication
    assert 0 < left < spooled, (left, spooled, stored_at_kill)
    assert 100 <= stored_at_kill <= spooled < 1000

    report = tmp_path / "run2.json"
    out = subprocess.run(_capture(cluster, bundle, cam, token, spool, 0, 50, "--frames-per-message", "8",
                                  "--refusal-grace", "0.5", "--report", str(report)),
                         capture_output=True, text=True, timeout=120, env=_env(token))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{left} frame(s) not acknowledged by an earlier run" in out.stderr
    summary = json.loads(report.read_text())
    assert summary["epoch"] == epoch and summary["spool_depth"] == 0 and summary["captured"] == 50
    assert summary["next_seq"] == spooled + 50      # seqs continue across the restart, none reused
    total = spooled + 50
    _wait(lambda: _stored(cluster.pg_dsn, cam)[0] >= total, 30, f"{total} frames stored")
    time.sleep(0.5)
    rows, distinct, epochs, seqs = _stored(cluster.pg_dsn, cam)
    assert (rows, distinct, epochs) == (total, total, [epoch])
    assert seqs == list(range(total))               # every spooled frame, each once


def test_broker_down_at_start_and_mid_stream_loses_no_frame(cluster, bundle, tmp_path):
    cam, node, frames = "outage-cam", 1, 300
    token = cluster.add_camera(cam)
    spool, log = tmp_path / "spool", tmp_path / "capture.log"
    cluster.kill_nats(node)                         # the listener this camera points at is down when it starts
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(_capture(cluster, bundle, cam, token, spool, node, frames, "--fps", "30",
                                             "--frames-per-message", "3", "--max-delay", "0.2",
                                             "--backoff-max", "1", "--refusal-grace", "2"),
                                    stdout=out, stderr=subprocess.STDOUT, env=_env(token))
        _wait(lambda: "unreachable" in log.read_text(), 20, "the console saying the broker is unreachable", proc, log)
        time.sleep(1.5)
        assert proc.poll() is None, log.read_text()  # waits the outage out instead of dying
        assert _stored(cluster.pg_dsn, cam)[0] == 0
        assert _spool_state(spool)[1] > 0            # capture goes on into the spool meanwhile
        cluster.start_nats(node)
        _wait(lambda: _stored(cluster.pg_dsn, cam)[0] >= 30, 40, "frames stored after the listener came up", proc,
              log)
        # and down again mid-stream, for a few seconds (the 2 s refusal grace keeps the frames just PUBACKed in the
        # spool, so the camera cannot have finished yet: they are published again after the outage)
        cluster.kill_nats(node)
        time.sleep(2.5)
        assert proc.poll() is None, log.read_text()
        cluster.start_nats(node)
        proc.wait(90)
    finally:
        if cluster.nats[node] is None or cluster.nats[node].poll() is not None:
            cluster.start_nats(node)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count("connected again after") >= 2, text
    assert f"{frames} frames captured" in text and "0 left in the spool" in text, text
    _wait(lambda: _stored(cluster.pg_dsn, cam)[0] >= frames, 30, f"{frames} frames stored")
    time.sleep(0.5)
    rows, distinct, epochs, seqs = _stored(cluster.pg_dsn, cam)
    assert (rows, distinct, len(epochs)) == (frames, frames, 1)
    assert seqs == list(range(frames))


def test_a_refused_camera_stops_with_a_clear_error_and_keeps_its_frames(cluster, bundle, tmp_path):
    cam = "refused-cam"
    token = cluster.add_camera(cam)
    spool = tmp_path / "spool"
    out = subprocess.run(_capture(cluster, bundle, cam, b"not-the-token", spool, 2, 1000, "--fps", "100"),
                         capture_output=True, text=True, timeout=120, env=_env(b"not-the-token"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the cluster refused camera '{cam}' (unauthorized)" in out.stderr, out.stderr
    assert "acknowledged (PUBACK)" in out.stdout and "frame(s) stay in" in out.stderr
    epoch, left, spooled = _spool_state(spool)
    assert 0 < left == spooled < 1000               # stopped early, and every captured frame is still spooled
    assert _stored(cluster.pg_dsn, cam)[0] == 0

    out = subprocess.run(_capture(cluster, bundle, cam, token, spool, 2, 1, "--refusal-grace", "0.5"),
                         capture_output=True, text=True, timeout=120, env=_env(token))
    assert out.returncode == 0, out.stdout + out.stderr
    _wait(lambda: _stored(cluster.pg_dsn, cam)[0] >= spooled + 1, 30, "the refused run's frames stored")
    time.sleep(0.5)
    assert _stored(cluster.pg_dsn, cam) == (spooled + 1, spooled + 1, [epoch], list(range(spooled + 1)))


def test_a_broker_refusing_the_connection_as_not_authorized_is_a_clear_error_not_a_retry_loop(bundle, tmp_path):
    """CONNACK return code 5 (not authorized: MQTT-level credentials, which retrying cannot fix) from a one-shot
    listener: exit 1 with the broker's reason at once, and the frames captured until then stay spooled."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def refuse() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)                       # CONNECT
            conn.sendall(b"\x20\x02\x00\x05")    # CONNACK, return code 5
            time.sleep(1)

    threading.Thread(target=refuse, daemon=True).start()
    try:
        out = subprocess.run([sys.executable, "-m", "taskcodec.cli", "mqtt-capture", "--device",
                              "virtual://fashion-mnist?size=28x28&count=5", "--bundle", str(bundle.path),
                              "--broker", f"mqtt://127.0.0.1:{port}", "--camera-id", "cam-x",
                              "--spool", str(tmp_path / "spool")],
                             capture_output=True, text=True, timeout=60, env=_env(b"t"))
    finally:
        server.close()
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"broker mqtt://127.0.0.1:{port} refused the connection: Not authorized" in out.stderr, out.stderr
    _, left, spooled = _spool_state(tmp_path / "spool")
    assert 0 < left == spooled <= 5                 # capture stopped at the refusal; what it took stays spooled
