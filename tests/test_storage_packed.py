"""Packed frames in the embedded server's SQLite store (issue 12 item 4): compaction moves closed camera-hours from the
frames table into compressed blocks atomically; every reader (query API, dashboard figures, per-camera frames, heads,
registry) sees both parts the same as before; deduplication stays exact for re-sent frames whose hour is packed;
retention by age removes exactly the old frames from both parts; the bytes on disk per 6-byte frame fall under 40;
the running server compacts in the background and `taskcodec db compact` does it on demand."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.server import storage as S
from taskcodec.testing import ServerProcess, wait_for
from tiny_bundle import make_tiny_bundle

H = S.HOUR_MS


def _rows(now: int, cameras: int = 3, per_camera: int = 1500, step_ms: int = 6000, epoch: int = 7, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for c in range(cameras):
        for i in range(per_camera):
            ts = now - 5 * H + i * step_ms + c
            conf = float(np.float32(rng.random())) if i % 5 else rng.random()  # float64-only values too
            rows.append((f"cam-{c}", epoch, i, ts, ts + 40 + rng.randrange(100), "m1" if i % 7 else "m2",
                         os.urandom(6), i % 10, conf))
    return rows


def _views(st: S.SQLiteStorage, now: int):
    conn = st._reader()
    everything = S.select_frames(conn, S.FrameFilter(), limit=10 ** 6, payload=True)
    return {
        "all": everything,
        "desc": S.select_frames(conn, S.FrameFilter(cameras=("cam-1",), predictions=(2, 3)), order="desc", limit=77),
        "conf": S.select_frames(conn, S.FrameFilter(min_confidence=0.5, models=("m2",)), limit=10 ** 6),
        "counts_min": S.count_frames(conn, S.FrameFilter(), 60_000, by_camera=True, with_bytes=True),
        "counts_hour": S.count_frames(conn, S.FrameFilter(since=now - 4 * H - 1234, until=now - H + 77), H,
                                      with_bytes=True),
        "counts_day": S.count_frames(conn, S.FrameFilter(predictions=(1, 4), models=("m1",)), 24 * H),
        "camera": st.frames("cam-2", since_seq=100, limit=50),
        "camera_ts": st.frames("cam-0", since_ts=now - 3 * H, limit=20),
        "frame_counts": st.frame_counts(),
        "keys": S.frames_by_keys(conn, [("cam-0", 7, 5), ("cam-1", 7, 1499), ("cam-1", 7, 99999)]),
        "model": sorted(S.frames_of_model(conn, "m2")),
        "has_model": (S.model_has_frames(conn, "m2"), S.model_has_frames(conn, "nope")),
    }


def _page_through(conn, f, order, limit):
    got, after = [], None
    while True:
        page = S.select_frames(conn, f, order=order, after=after, limit=limit)
        got += page
        if len(page) < limit:
            return got
        after = (page[-1][3], page[-1][0], page[-1][1], page[-1][2])


def test_compaction_keeps_every_reader_identical_and_packs_under_40_bytes(tmp_path):
    db = tmp_path / "s.db"
    st = S.SQLiteStorage(db)
    now = int(time.time() * 1000)
    rows = _rows(now)
    assert st.store_frames(rows) == len(rows)
    before = _views(st, now)
    assert len(before["all"]) == len(rows)
    r = st.compact()
    conn = st._reader()
    hot, = conn.execute("SELECT count(*) FROM frames").fetchone()
    packed, = conn.execute("SELECT sum(n) FROM frame_blocks").fetchone()
    assert r["frames"] == packed == len(rows) - 1 and hot == 1  # the newest row stays (its rowid is never reused)
    after = _views(st, now)
    for name in before:
        assert after[name] == before[name], name
    f = S.FrameFilter(cameras=("cam-0", "cam-2"), predictions=(3, 4, 5))
    expected = S.select_frames(conn, f, limit=10 ** 6)
    assert _page_through(conn, f, "asc", 37) == expected
    assert _page_through(conn, f, "desc", 41) == expected[::-1]
    # bytes on disk: after compaction and VACUUM (what a long-running store converges to: freed pages are reused)
    st.close()
    S.SQLiteStorage(tmp_path / "empty.db").close()

    def size(path):
        with sqlite3.connect(path) as c:
            c.execute("VACUUM")
            return c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0]

    per_frame = (size(db) - size(tmp_path / "empty.db")) / len(rows)  # less the empty schema's pages
    assert per_frame <= 40, per_frame


def test_dedup_stays_exact_for_packed_hours_and_late_frames_join_their_block(tmp_path):
    st = S.SQLiteStorage(tmp_path / "s.db")
    now = int(time.time() * 1000)
    rows = _rows(now, cameras=1, per_camera=600)
    st.store_frames(rows)
    st.compact()
    old, changed = rows[10], rows[11][:6] + (b"other!",) + rows[11][7:]
    late = ("cam-0", 7, 5000, rows[20][3] + 1, now, "m1", b"late!!", 3, 0.25)  # a packed hour, a new seq
    assert st.store_batches([S.BatchRows("cam-0", None, [old, changed, late])]) == [[S.DUPLICATE, S.CONFLICT, S.NEW]]
    assert st.store_frames([old, changed]) == 0
    st.add_camera("cam-0", "h")  # the token check and the block lookup share one statement
    assert st.store_batches([S.BatchRows("cam-0", "h", [old])]) == [[S.DUPLICATE]]
    assert st.store_batches([S.BatchRows("cam-0", "h", [late])]) == [[S.DUPLICATE]]  # now in the recent part
    assert st.frame_counts() == {"cam-0": 601}
    conn = st._reader()
    stored_payload = S.frames_by_keys(conn, [("cam-0", 7, 11)])[0][6]
    assert stored_payload == rows[11][6]  # the conflicting payload was not stored
    st.compact(settle_s=-2 * 3600)  # everything but the newest row: the late frame joins its hour's block
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 1
    assert S.frames_by_keys(conn, [("cam-0", 7, 5000)])[0][6] == b"late!!"
    total = sum(v[0] for v in S.count_frames(conn, S.FrameFilter(), H).values())
    assert total == 601 == len(S.select_frames(conn, S.FrameFilter(), limit=10 ** 6))

    # the writer caches each (camera, epoch)'s highest packed seq; a compaction by another process (here: another
    # SQLiteStorage on the same file) must still be seen by its next transaction
    fresh = [("cam-0", 7, 6000 + i, now - 2 * H + i, now - 2 * H + i, "m1", os.urandom(6), 1, 0.5) for i in range(5)]
    assert st.store_batches([S.BatchRows("cam-0", "h", fresh)]) == [[S.NEW] * 5]  # caches the bound
    other = S.SQLiteStorage(tmp_path / "s.db")
    other.compact(settle_s=-2 * 3600)
    other.close()
    assert conn.execute("SELECT count(*) FROM frames WHERE seq >= 6000").fetchone()[0] <= 1
    assert st.store_batches([S.BatchRows("cam-0", "h", fresh[:4])]) == [[S.DUPLICATE] * 4]  # all four packed
    assert st.frame_counts() == {"cam-0": 606}


def test_retention_removes_exactly_the_old_frames_from_both_parts(tmp_path):
    st = S.SQLiteStorage(tmp_path / "s.db")
    now = int(time.time() * 1000)
    rows = _rows(now, cameras=2, per_camera=2500)
    st.store_frames(rows)
    st.compact()
    cutoff = now - 3 * H - 1500  # inside a packed hour: its blocks are split
    old = sum(1 for r in rows if r[3] < cutoff)
    assert 0 < old < len(rows)
    assert st.delete_before(cutoff) == old
    conn = st._reader()
    left = S.select_frames(conn, S.FrameFilter(), limit=10 ** 6)
    assert len(left) == len(rows) - old and min(r[3] for r in left) >= cutoff
    for interval in (H, 60_000):
        counts = S.count_frames(conn, S.FrameFilter(), interval)
        assert sum(v[0] for v in counts.values()) == len(left)
    assert conn.execute("SELECT count(*) FROM frame_rollup WHERE hour < ?", (cutoff // H,)).fetchone()[0] == 0
    assert st.delete_before(cutoff) == 0


def test_migration_from_version_4_and_the_compact_command(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # a database of the previous schema, with frames stored three hours ago
        for step in S.MIGRATIONS[:4]:
            conn.executescript(step)
        conn.execute("PRAGMA user_version=4")
        now = int(time.time() * 1000)
        conn.executemany("INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [r[:4] + (now - 3 * H + r[2],) + r[5:] for r in _rows(now, cameras=2, per_camera=300)])
    out = subprocess.run([sys.executable, "-m", "taskcodec.server", "db", "compact", "--db", str(db)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"packed 599 frames of 2 cameras", out.stdout), out.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == S.SCHEMA_VERSION
        assert conn.execute("SELECT sum(n) FROM frame_blocks").fetchone()[0] == 599


def _metric(text, name, camera):
    m = re.search(rf'^{name}{{camera="{re.escape(camera)}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_server_compacts_in_the_background_and_answers_from_both_parts(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    db = tmp_path / "server.db"
    config = tmp_path / "server.yaml"
    # settle -2 h: this test's frames count as old at once (the default packs hours closed 10 minutes ago)
    config.write_text("storage:\n  checkpoint_interval_s: 0.5\n  compact_interval_s: 0.5\n  compact_settle_s: -7200\n")
    n = 120
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(0).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    t0 = 1_790_000_000_000
    frames = [wire.Frame(i, t0 + 1000 * i, compress(s, coder, bundle.model_tag)) for i, s in enumerate(symbols)]
    with ServerProcess(bundle.path, db, "--config", str(config)) as srv:
        token = srv.add_camera("cam-p")
        with srv.stream() as c:
            assert c.hello(wire.Hello(bundle.model_tag, "cam-p", token)) == wire.Welcome()
            for j in range(0, n, 40):
                assert c.send(wire.Batch(3, frames[j:j + 40])) == [wire.Ack(3, j, 40)]

        def packed():
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT coalesce(sum(n), 0) FROM frame_blocks").fetchone()[0]

        wait_for(lambda: packed() == n - 1, timeout=30, what="background compaction")
        with srv.stream() as c:  # re-sent frames of packed hours: acked again, not stored twice; another payload
            assert c.hello(wire.Hello(bundle.model_tag, "cam-p", token)) == wire.Welcome()
            assert c.send(wire.Batch(3, frames[:40])) == [wire.Ack(3, 0, 40)]
            other = wire.Frame(5, frames[5].ts_ms, frames[6].payload)
            reply = c.send(wire.Batch(3, [other]))
            assert isinstance(reply[0], wire.Reject) and reply[0].code == wire.Code.CONFLICT
        got = srv.get_json("/v1/query/frames?" + urllib.parse.urlencode({"camera": "cam-p", "limit": 1000}))
        assert [f["seq"] for f in got["frames"]] == list(range(n))
        assert [f["ts_capture_ms"] for f in got["frames"]] == [f.ts_ms for f in frames]
        counts = srv.get_json("/v1/query/counts?" + urllib.parse.urlencode({"interval": "1h", "camera": "cam-p"}))
        assert sum(b["total"] for b in counts["buckets"]) == n
        text = srv.get_text("/metrics")
        assert _metric(text, "taskcodec_server_camera_frames_stored_total", "cam-p") == n
        assert _metric(text, "taskcodec_server_camera_payload_bytes_total", "cam-p") == sum(len(f.payload)
                                                                                          for f in frames)
        page = srv.get_text("/dashboard/cameras/cam-p")
        assert f"{n}" in page
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] + packed() == n


def test_block_format_round_trips_extremes():
    rows = [("c", 1, (1 << 62) + 5, -5, 1 << 62, "a", b"", -1, 0.0),
            ("c", 1, -(1 << 62), 7, -(1 << 62), "b", b"x" * 300, 32000, 1e300),
            ("c", 1, 3, 1_790_000_000_000, 1_790_000_000_040, "a", os.urandom(6), 4, float(np.float32(0.7)))]
    for part in (rows, rows[:1], rows[2:]):
        data, models = S.encode_block(part)
        assert S.decode_block("c", 1, models, S.BLOCK_FORMAT, data).rows() == sorted(part, key=lambda r: r[2])
    with pytest.raises(S.StorageError, match="format"):
        S.decode_block("c", 1, models, S.BLOCK_FORMAT + 1, data)


def test_heads_and_registry_read_packed_frames(tmp_path):
    from taskcodec.server.heads import HeadStore
    from taskcodec.server.registry import Registry

    db = tmp_path / "s.db"
    st = S.SQLiteStorage(db)
    now = int(time.time() * 1000)
    rows = _rows(now, cameras=2, per_camera=400)
    st.store_frames(rows)
    heads = HeadStore(db)
    keys = [("cam-0", 7, 3), ("cam-1", 7, 13), ("cam-1", 7, 14), ("cam-0", 7, 999)]
    before = (heads.payloads("m2"), heads.payloads("m1", keys=keys), Registry(db).users("m2"))
    assert len(before[0]) == sum(1 for r in rows if r[5] == "m2") and len(before[1]) == 2
    assert before[2] == ["stored frames reference it"]
    st.compact()
    assert st._reader().execute("SELECT count(*) FROM frames").fetchone()[0] == 1
    assert (heads.payloads("m2"), heads.payloads("m1", keys=keys), Registry(db).users("m2")) == before
    assert Registry(db).users("no-such-model") == []
    heads.close()
    st.close()


def test_readers_see_each_frame_once_while_a_compaction_runs(tmp_path):
    import threading

    db = tmp_path / "s.db"
    st = S.SQLiteStorage(db)
    now = int(time.time() * 1000)
    rows = _rows(now, cameras=60, per_camera=150, step_ms=60_000)
    st.store_frames(rows)
    reader = S.SQLiteStorage(db)  # its own connections, as the query API's
    conn = reader._reader()
    done = threading.Event()
    seen = []

    def read():
        while not done.is_set():
            got = S.select_frames(conn, S.FrameFilter(), limit=10 ** 6)
            counts = S.count_frames(conn, S.FrameFilter(), H)
            seen.append((len(got), len({r[:3] for r in got}), sum(v[0] for v in counts.values())))

    t = threading.Thread(target=read)
    t.start()
    try:
        st.compact(chunk=40)  # many small transactions: many chances to fall between a reader's two reads
    finally:
        done.set()
        t.join()
    assert len(seen) >= 2
    assert all(s == (len(rows),) * 3 for s in seen), [s for s in seen if s != (len(rows),) * 3][:3]
    reader.close()
    st.close()


def test_step_7_drops_the_capture_time_index_and_one_camera_stays_in_time_order_across_a_clock_jump(tmp_path):
    """A version-6 file (with frames_by_capture_time, as every earlier file has) loses that index on open; one
    camera's listings, counts and compaction then go through the primary key and still follow capture time when the
    camera's clock jumped back (seq order and time order disagree)."""
    db = tmp_path / "v6.db"
    now = int(time.time() * 1000)
    rows = _rows(now, cameras=2, per_camera=600)
    # cam-0's clock jumps back 40 minutes at seq 300: its later seqs carry earlier capture times
    rows = [r[:3] + (r[3] - 40 * 60_000,) + r[4:] if r[0] == "cam-0" and r[2] >= 300 else r for r in rows]
    with sqlite3.connect(db) as conn:
        for step in S.MIGRATIONS[:6]:
            conn.executescript(step)
        conn.execute("CREATE INDEX frames_by_capture_time ON frames (camera_id, ts_capture_ms)")
        conn.execute("PRAGMA user_version=6")
    st = S.SQLiteStorage(db, auto_compact=False)
    assert st.store_frames(rows) == len(rows)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == S.SCHEMA_VERSION == 7
        assert "frames_by_capture_time" not in {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
    by_time = sorted((r for r in rows if r[0] == "cam-0"), key=lambda r: (r[3], r[0], r[1], r[2]))
    conn = st._reader()
    for before_compaction in (True, False):
        newest = S.select_frames(conn, S.FrameFilter(cameras=("cam-0",)), order="desc", limit=50)
        assert [r[2] for r in newest] == [r[2] for r in by_time[::-1][:50]]
        assert [r[2] for r in _page_through(conn, S.FrameFilter(cameras=("cam-0",)), "asc", 97)] == \
            [r[2] for r in by_time]
        counts = S.count_frames(conn, S.FrameFilter(cameras=("cam-0",)), H)
        assert sum(v[0] for v in counts.values()) == 600
        if before_compaction:
            # (the newest row stays: its rowid is never reused)
            assert st.compact(settle_s=0, align_hour=False)["frames"] == len(rows) - 1
            assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 1
    st.close()
