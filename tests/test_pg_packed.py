"""Packed frames in the scale-out PostgreSQL store (issue 12 item 4), on a real PostgreSQL (initdb/pg_ctl): compaction
moves closed camera-hours into blocks (rows deleted and block written in one transaction), readers see both parts,
deduplication stays exact (also while a compaction runs concurrently with re-deliveries), late frames join their
block, retention drops partitions and blocks, `taskcodec cluster compact` runs it, and the bytes per frame fall."""

from __future__ import annotations

import datetime
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from taskcodec.server.cluster.local import LocalCluster
from taskcodec.server.cluster.pgstore import PgStore

pytestmark = pytest.mark.skipif(not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not shutil.which("initdb"),
                                reason="needs the Debian package postgresql (scripts/install.sh installs it)")

H = 3_600_000


def _rows(now, cameras=4, per_camera=900, step_ms=8000, seed=0):
    """Two hours of frames per camera, all in capture hours that closed more than the compaction's 10 minutes of
    settling ago at any time of day (from now - 3 h they would leave the last hour unpacked in minutes 0-9)."""
    rng = random.Random(seed)
    start = ((now - 11 * 60_000) // H) * H - 2 * H
    return [(f"cam-{c}", 11, i, start + i * step_ms + c, now, "m1" if i % 9 else "m2", os.urandom(6), i % 10,
             round(rng.random(), 4)) for c in range(cameras) for i in range(per_camera)]


def _relation_bytes(dsn):
    """Bytes on disk (heap + indexes + TOAST) of the frame tables, day partitions included, after VACUUM."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM FULL")
        return int(conn.execute("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c WHERE c.relkind "
                            "= 'r' AND (c.relname IN ('class_counts', 'frame_blocks') OR c.relname LIKE 'frames_2%')"
                            ).fetchone()[0])


def test_pg_compaction_readers_dedup_retention_and_size():
    from typer.testing import CliRunner

    from taskcodec.server.cluster.cli import cluster_app

    now = int(time.time() * 1000)
    rows = _rows(now)
    with LocalCluster([], gateways=0, workers=0, nats_nodes=0) as cluster:
        store = PgStore(cluster.pg_dsn)
        assert store.store_frames(rows) == len(rows)
        keys = sorted(store.frame_keys())
        counts = store.class_counts("cam-1", now - 10 * H, now + H)
        window = (now - 2 * H - 600_000, now - H + 1234)
        frames = store.camera_frames("cam-2", *window, limit=5000)
        newest = store.camera_frames("cam-2", now - 10 * H, now + H, limit=25, newest=True)
        before = _relation_bytes(cluster.pg_dsn)

        result = CliRunner().invoke(cluster_app, ["compact", "--pg", cluster.pg_dsn])
        assert result.exit_code == 0, result.output
        closed = sum(1 for r in rows if r[3] < (now - 600_000) // H * H)
        assert f"packed {closed} frames" in result.output
        assert store.conn.execute("SELECT sum(n) FROM frame_blocks").fetchone()[0] == closed
        store.conn.commit()
        assert sorted(store.frame_keys()) == keys
        assert store.class_counts("cam-1", now - 10 * H, now + H) == counts
        assert store.camera_frames("cam-2", *window, limit=5000) == frames
        assert store.camera_frames("cam-2", now - 10 * H, now + H, limit=25, newest=True) == newest

        # re-deliveries of packed frames: duplicates; another payload: a conflict; a late frame: stored once
        assert store.store_frames(rows[:50]) == 0 and store.conflicts == 0
        assert store.store_frames([rows[7][:6] + (b"other!",) + rows[7][7:]]) == 0 and store.conflicts == 1
        late = ("cam-0", 11, 10_000, rows[5][3] + 1, now, "m1", b"late!!", 1, 0.5)
        assert store.store_frames([late]) == 1 and store.store_frames([late]) == 0
        store.compact()
        assert store.conn.execute("SELECT count(*) FROM frames WHERE camera_id = 'cam-0' AND seq = 10000"
                                  ).fetchone()[0] == 0
        store.conn.commit()
        assert sorted(store.frame_keys()) == sorted(keys + [late[:3]])

        # a compaction racing with re-deliveries of the same frames stores nothing twice
        more = _rows(now, cameras=2, per_camera=600, seed=1)
        more = [(r[0].replace("cam", "race"),) + r[1:] for r in more]
        store.store_frames(more)
        stop = threading.Event()

        def redeliver():
            other = PgStore(cluster.pg_dsn)
            while not stop.is_set():
                assert other.store_frames(more) == 0
            other.close()

        t = threading.Thread(target=redeliver)
        t.start()
        PgStore(cluster.pg_dsn).compact()
        stop.set()
        t.join()
        all_keys = store.frame_keys()
        assert len(all_keys) == len(set(all_keys)) == len(keys) + 1 + len(more)

        # emptied day partitions give their index pages back (the next compaction does it for past days)
        assert store.reclaim_partitions() and sorted(store.frame_keys()) == sorted(all_keys)
        after = _relation_bytes(cluster.pg_dsn)
        late2 = ("cam-1", 11, 10_001, rows[900][3] + 1, now, "m1", b"late2!", 1, 0.5)  # its partition still exists
        assert store.store_frames([late2]) == 1 and store.store_frames([late2]) == 0
        packed_share = (closed + len(more)) / (len(rows) + 1 + len(more))
        per_frame_before, per_frame_after = before / len(rows), after / (len(rows) + 1 + len(more))
        print(f"bytes per frame before {per_frame_before:.1f}, after {per_frame_after:.1f} "
              f"({packed_share:.0%} of the frames packed)")
        assert per_frame_after < per_frame_before * (1 - packed_share * 0.6), (per_frame_before, per_frame_after)

        # retention: whole days of partitions and blocks
        store.drop_partitions_before(datetime.datetime.fromtimestamp(now / 1000, datetime.timezone.utc).date()
                                     + datetime.timedelta(days=2))
        assert store.frame_keys() == []
        assert store.conn.execute("SELECT count(*) FROM frame_blocks").fetchone()[0] == 0
        store.close()


def test_pg_compaction_of_many_hours_runs_in_steps():
    now = int(time.time() * 1000)
    rows = [("cam-long", 3, i, now - 20 * H + i * 60_000, now, "m1", os.urandom(6), i % 4, 0.5) for i in range(1100)]
    with LocalCluster([], gateways=0, workers=0, nats_nodes=0) as cluster:
        store = PgStore(cluster.pg_dsn)
        assert store.store_frames(rows) == len(rows)
        result = store.compact(settle_s=-2 * 3600)  # everything, the current hour included
        assert result["frames"] == len(rows) and result["cameras"] == 1
        assert result["blocks_written"] == len({r[3] // H for r in rows})  # 6-hour steps end on hour boundaries
        hours = {(r[3] // H) for r in rows}
        assert store.conn.execute("SELECT count(*), sum(n) FROM frame_blocks").fetchone() == (len(hours), len(rows))
        store.conn.commit()
        assert sorted(store.frame_keys()) == sorted(r[:3] for r in rows)
        assert store.store_frames(rows) == 0 and store.conflicts == 0
        store.close()
