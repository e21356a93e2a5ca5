"""The scale-out mode with real processes: three nats-server nodes (JetStream R3), PostgreSQL (initdb/pg_ctl in a
temp folder), a gateway and two workers, and a real `runtime capture` streaming through them while one JetStream
node, the gateway and a worker are killed with SIGKILL and PostgreSQL is restarted. Every frame the camera saw acked
must be stored exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from taskcodec.server.cluster.local import LocalCluster
from tiny_bundle import make_tiny_bundle

FRAMES = 400

needs = [shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists(),
         any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]
pytestmark = pytest.mark.skipif(not all(needs), reason="needs the Debian packages nats-server and postgresql "
                                                        "(scripts/install.sh installs them)")


def _counts(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT (camera_id, epoch, seq)) FROM frames").fetchone()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except psycopg.OperationalError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_kills_of_a_jetstream_node_gateway_worker_and_a_postgres_restart_lose_and_duplicate_nothing(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    with LocalCluster([bundle.path], gateways=1, workers=2) as cluster:
        token = cluster.add_camera("cam-1").decode()
        report = tmp_path / "report.json"
        cmd = [sys.executable, "-m", "taskcodec.runtime.cli", "capture",
               "--device", f"virtual://fashion-mnist?size=64x64&count={FRAMES}", "--fps", "40",
               "--bundle", str(bundle.path), "--server", cluster.gateway_url(0), "--camera-id", "cam-1",
               "--spool", str(tmp_path / "spool"), "--max-delay", "0.1", "--quiet",
               "--drain-timeout", "120", "--report", str(report)]
        camera = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, TASKCODEC_TOKEN=token))
        try:
            _wait(lambda: _counts(cluster.pg_dsn)[0] > 20, 60, "the first frames stored")
            cluster.kill_nats(1)                      # a JetStream node dies: R3 keeps a quorum
            time.sleep(1.5)
            cluster.kill_gateway(0)                   # the camera reconnects and re-sends what was not acked
            cluster.start_gateway(0)
            cluster.kill_worker(0)                    # its un-acked messages are redelivered to the other worker
            time.sleep(1.0)
            cluster.stop_pg("immediate")              # crash-like stop; workers retry, nothing is acked meanwhile
            time.sleep(1.0)
            cluster.start_pg()
            cluster.start_nats(1)
            cluster.start_worker(0)
            out, _ = camera.communicate(timeout=240)
        finally:
            if camera.poll() is None:
                camera.kill()
        assert camera.returncode == 0, out[-3000:]
        acked = json.loads(report.read_text())["acked"]
        assert acked == FRAMES, out[-2000:]
        _wait(lambda: _counts(cluster.pg_dsn)[0] >= acked, 120, "every acked frame stored")
        total, distinct = _counts(cluster.pg_dsn)
        assert total == distinct == acked, (total, distinct, acked)
        with psycopg.connect(cluster.pg_dsn) as conn:
            rolled_up = conn.execute("SELECT sum(n) FROM class_counts WHERE camera_id = 'cam-1'").fetchone()[0]
            seqs = [r[0] for r in conn.execute("SELECT seq FROM frames ORDER BY seq")]
        assert rolled_up == acked  # the rollup counts each frame once, redeliveries included
        assert seqs == list(range(seqs[0], seqs[0] + acked))
        # the gateway grants no temporal coding: a TBATCH is refused with a reason, not published
        from taskcodec import wire
        from taskcodec.server.client import StreamClient
        c = StreamClient(cluster.gateway_url(0))
        try:
            assert c.hello(wire.Hello(bundle.model_tag, "cam-1", token.encode())) == wire.Welcome()
            replies = c.send(wire.TemporalBatch(7, [wire.Frame(0, 1_700_000_000_000, b"", wire.SAME)]))
        finally:
            c.close()
        assert isinstance(replies[-1], wire.Error) and "temporal" in replies[-1].reason, replies


def test_store_is_idempotent_partitioned_by_day_and_retention_drops_old_days(tmp_path):
    from typer.testing import CliRunner

    from taskcodec.server.cluster.cli import cluster_app
    from taskcodec.server.cluster.pgstore import PgStore

    day_ms = 86_400_000
    now = int(time.time() * 1000)
    rows = [("cam-a", 7, seq, now - (5 - seq) * day_ms, now, "m", bytes([seq]), seq % 3, 0.5) for seq in range(6)]
    with LocalCluster([], gateways=0, workers=0, nats_nodes=0) as cluster:
        store = PgStore(cluster.pg_dsn)
        assert store.store_frames(rows) == 6
        assert store.store_frames(rows[2:]) == 0                      # a re-delivery stores nothing twice
        changed = [rows[3][:6] + (b"other",) + rows[3][7:]]
        assert store.store_frames(changed) == 0 and store.conflicts == 1  # same key, other payload: counted
        with psycopg.connect(cluster.pg_dsn) as conn:  # stored days after capture: the stored time kept exactly
            after = dict(conn.execute("SELECT seq, stored_ms_after FROM frames").fetchall())
        assert after == {seq: (5 - seq) * day_ms for seq in range(6)}
        counts = store.class_counts("cam-a", now - 10 * day_ms, now + 1)
        assert counts == {0: 2, 1: 2, 2: 2}
        result = CliRunner().invoke(cluster_app, ["retention", "--days", "2", "--pg", cluster.pg_dsn])
        assert result.exit_code == 0, result.output
        assert "dropped 3 partition(s)" in result.output
        assert sorted(k[2] for k in store.frame_keys()) == [3, 4, 5]
        store.close()
