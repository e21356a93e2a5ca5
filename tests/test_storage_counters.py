"""Insert-time counters of the embedded SQLite store (issue 12 item 4): frame_rollup (per camera and hour) and
fleet_counts (all cameras per minute and per hour) are updated in the insert's own transaction, count only rows
actually inserted, are left alone by compaction, follow retention, and are backfilled by the schema migration;
count_frames answers from them where the range allows and must give exactly what counting every stored frame (rows
and blocks) gives, for every interval, range, filter and grouping."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections import defaultdict

import numpy as np
import pytest

from taskcodec.server import storage as S

H, M = S.HOUR_MS, S.MINUTE_MS


def _row(cam, seq, ts, rng, epoch=7):
    return (cam, epoch, seq, ts, ts + 40, "m1" if seq % 7 else "m2", os.urandom(1 + seq % 6), (seq * 7 + ts) % 5,
            round(rng.random(), 3))


def _rows(t0, cameras=4, per_camera=700, step_ms=7_000, seed=0):
    rng = random.Random(seed)
    return [_row(f"cam-{c}", i, t0 + i * step_ms + c * 311, rng) for c in range(cameras) for i in range(per_camera)]


def _all_frames(st):
    return S.select_frames(st._reader(), S.FrameFilter(), limit=10 ** 7)


def _brute(frames, f, interval, by_camera, with_bytes):
    out = defaultdict(lambda: [0, 0])
    for cam, epoch, seq, ts, stored, model, nbytes, pred, conf in frames:
        if (f.cameras and cam not in f.cameras) or (f.predictions and pred not in f.predictions) or \
                (f.models and model not in f.models) or (f.since is not None and ts < f.since) or \
                (f.until is not None and ts >= f.until) or (f.min_confidence is not None and conf < f.min_confidence):
            continue
        acc = out[(ts // interval * interval, cam if by_camera else None, pred)]
        acc[0] += 1
        acc[1] += nbytes if with_bytes else 0
    return dict(out)


def _check_counters(st):
    """The counter tables hold exactly the counts (and bounds) of the stored frames."""
    frames = _all_frames(st)
    conn = st._reader()
    per_camera, fleet = S._aggregate((r[0], r[3], r[7], r[5], r[6]) for r in frames)
    got = {r[:4]: list(r[4:6]) for r in conn.execute(
        "SELECT camera_id, hour, prediction, model_id, frames, payload_bytes FROM frame_rollup")}
    assert got == {k: v[:2] for k, v in per_camera.items()}
    got = {r[:4]: list(r[4:6]) for r in conn.execute(
        "SELECT unit_ms, cell, prediction, model_id, frames, payload_bytes FROM fleet_counts")}
    assert got == {k: v[:2] for k, v in fleet.items()}
    for table, cols, acc in (("frame_rollup", "camera_id, hour, prediction, model_id", per_camera),
                             ("fleet_counts", "unit_ms, cell, prediction, model_id", fleet)):
        for *key, t0, t1 in conn.execute(f"SELECT {cols}, ts_min, ts_max FROM {table}"):
            v = acc[tuple(key)]
            assert t0 <= v[2] and v[3] <= t1, (table, key)  # bounds (wider after deletions)
    return frames


def _check_queries(st, t0, t1, rng):
    """count_frames (counters where possible) == a count of every stored frame, over many shapes."""
    frames = _check_counters(st)
    conn = st._reader()
    ts = sorted(r[3] for r in frames)
    inner = [ts[len(ts) // 3], ts[2 * len(ts) // 3]]  # frames on both sides: partial cells
    ranges = [(None, None), (t0 - 5 * H, None), (None, t1 + H), (t0 - 3 * H, t1 + 3 * H),
              (t0 // H * H, t1 // H * H), (inner[0], inner[1]), (inner[0] + 1, t1 + 1),
              (t0 - 1, inner[1] - 1), (inner[0] // M * M + 17_000, inner[0] // M * M + 45_000),
              (inner[1], inner[1] + 1), (inner[1], inner[1]), (inner[1] + 5, inner[0])]
    ranges += [tuple(sorted(rng.sample(range(t0 - H, t1 + H), 2))) for _ in range(6)]
    filters = [{}, {"predictions": (1, 3)}, {"models": ("m2",)}, {"cameras": ("cam-1",)},
               {"cameras": ("cam-0", "cam-2"), "predictions": (0,)}, {"min_confidence": 0.5}]
    checked = 0
    for since, until in ranges:
        for kw in filters:
            f = S.FrameFilter(since=since, until=until, **kw)
            for interval in (H, M, 5 * M, 24 * H, 30_000, 2 * H):
                for by_camera in (False, True):
                    with_bytes = (checked % 3 == 0)
                    got = S.count_frames(conn, f, interval, by_camera=by_camera, with_bytes=with_bytes)
                    got = {k: v for k, v in got.items() if v[0]}
                    assert got == _brute(frames, f, interval, by_camera, with_bytes), (f, interval, by_camera)
                    checked += 1
    return checked


def test_counters_equal_a_count_of_every_frame_through_duplicates_compaction_and_retention(tmp_path):
    rng = random.Random(1)
    st = S.SQLiteStorage(tmp_path / "c.db", auto_compact=False)
    now = int(time.time() * 1000)
    t0 = now - 6 * H
    rows = _rows(t0)
    t1 = max(r[3] for r in rows)
    # server path: one-frame batches of all cameras per micro-batch; some re-sent (duplicate) and conflicting
    by_cam = defaultdict(list)
    for r in rows:
        by_cam[r[0]].append(r)
    for i in range(0, 700, 50):
        batches = [S.BatchRows(cam, None, rs[i:i + 50]) for cam, rs in by_cam.items()]
        if i:
            batches.append(S.BatchRows("cam-0", None, by_cam["cam-0"][i - 5:i + 3]))  # 5 duplicates, 3 new
            bad = by_cam["cam-1"][i - 1]
            batches.append(S.BatchRows("cam-1", None, [bad[:6] + (b"other",) + bad[7:]]))  # conflict
        st.store_batches(batches)
    assert sum(st.frame_counts().values()) == len(rows)
    n = _check_queries(st, t0, t1, rng)
    assert n > 1000
    # store_frames with duplicates inside the list and against stored rows
    extra = [_row("cam-9", i, t0 + 1000 * i, rng) for i in range(300)]
    assert st.store_frames(extra + extra[:50] + rows[:20]) == 300
    # compaction (closed hours, then everything): counts unchanged, nothing counted twice
    before = {k: v for k, v in S.count_frames(st._reader(), S.FrameFilter(), M, by_camera=True).items()}
    assert st.compact(settle_s=0)["frames"] > 0
    assert S.count_frames(st._reader(), S.FrameFilter(), M, by_camera=True) == before
    _check_queries(st, t0, t1, rng)
    # late frames into packed hours, re-sent packed frames (duplicates: not counted), new frames
    late = [_row("cam-2", 10_000 + i, t0 + 2 * H + 999 * i, rng) for i in range(40)]
    resent = by_cam["cam-3"][10:30]
    st.store_batches([S.BatchRows("cam-2", None, late), S.BatchRows("cam-3", None, resent)])
    assert st.store_frames(resent + late[:5]) == 0
    st.store_frames([_row("cam-4", i, now + 1000 * i, rng) for i in range(90)])
    _check_queries(st, t0, now + 90_000, rng)
    st.compact(settle_s=-3 * 3600, align_hour=False)  # everything (the late frames join their packed blocks)
    _check_queries(st, t0, now + 90_000, rng)
    # retention at a time inside an hour and a minute: rows and blocks before it leave the counters
    cutoff = t0 + 3 * H + 25 * M + 13_456
    st.store_frames([_row("cam-5", i, cutoff - 200_000 + 3000 * i, rng) for i in range(100)])  # rows around it
    assert st.delete_before(cutoff) > 0
    assert min(r[3] for r in _all_frames(st)) >= cutoff
    _check_queries(st, cutoff, now + 90_000, rng)
    st.close()


def test_counters_plan_reads_the_counters_not_the_frames(tmp_path):
    """The counts of all cameras per hour for a day and per minute for ten minutes (from a minute boundary), on
    ranges that end after the newest frame, read no frame row or block (the partial cells at the ends are answered
    from the counters' bounds); a start inside a minute with frames on both sides counts that piece itself."""
    st = S.SQLiteStorage(tmp_path / "p.db", auto_compact=False)
    now = int(time.time() * 1000)
    rows = _rows(now - 2 * H, cameras=3, per_camera=1000, step_ms=7_000)
    st.store_frames(rows)
    end = max(r[3] for r in rows) + 1
    conn = st._reader()
    statements = []
    conn.set_trace_callback(statements.append)
    try:
        S.count_frames(conn, S.FrameFilter(since=end - 24 * H, until=end), H)
        S.count_frames(conn, S.FrameFilter(since=(end - 10 * M) // M * M, until=end), M)
        S.count_frames(conn, S.FrameFilter(until=end // H * H), H, by_camera=True)
    finally:
        conn.set_trace_callback(None)
    assert statements and not [s for s in statements if "FROM frames" in s or "frame_blocks" in s], statements
    for s in statements:
        if s.startswith("SELECT") and ("fleet_counts" in s or "frame_rollup" in s):
            plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + s)]
            assert all(p.startswith("SEARCH") for p in plan if "fleet_counts" in p), plan
    # a range whose end cuts through counted frames: the piece is counted from the rows, and still right
    mid = rows[len(rows) // 2][3]
    got = S.count_frames(conn, S.FrameFilter(since=mid - 10 * M, until=mid), M)
    assert {k: v for k, v in got.items() if v[0]} == _brute(_all_frames(st), S.FrameFilter(since=mid - 10 * M,
                                                                                           until=mid), M, False, False)
    st.close()


# frame_rollup as schema step 4 created it until step 6 existed (the storage.py of commit bb0b1ff)
V5_ROLLUP = """
    CREATE TABLE frame_rollup (
        camera_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        prediction INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        frames INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        PRIMARY KEY (camera_id, hour, prediction, model_id)
    ) WITHOUT ROWID;
    CREATE INDEX frame_rollup_by_hour ON frame_rollup (hour, camera_id, prediction);
"""


def _make_version_5(path, rows, compact_settle_s):
    """A database as the previous storage code left it: frame_rollup counted the packed hours only, no ts bounds,
    no fleet_counts, user_version 5."""
    st = S.SQLiteStorage(path, auto_compact=False)
    st.store_frames(rows)
    st.compact(settle_s=compact_settle_s)
    st.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE fleet_counts")
    conn.execute("DROP TABLE frame_rollup")
    conn.executescript(V5_ROLLUP)
    for cam, epoch, models, fmt, data in conn.execute("SELECT camera_id, epoch, models, format, data "
                                                      "FROM frame_blocks").fetchall():
        b = S.decode_block(cam, epoch, models, fmt, data)
        acc = defaultdict(lambda: [0, 0])
        for r in b.rows():
            a = acc[(cam, r[3] // H, r[7], r[5])]
            a[0] += 1
            a[1] += len(r[6])
        conn.executemany("INSERT INTO frame_rollup VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                         "frames = frames + excluded.frames, payload_bytes = payload_bytes + excluded.payload_bytes",
                         [(*k, *v) for k, v in acc.items()])
    conn.execute("PRAGMA user_version=5")
    conn.commit()
    conn.close()


def test_migration_backfills_the_counters_from_rows_and_blocks(tmp_path):
    rng = random.Random(2)
    now = int(time.time() * 1000)
    t0 = now - 6 * H
    rows = _rows(t0, cameras=3, per_camera=900, step_ms=20_000)
    db = tmp_path / "v5.db"
    _make_version_5(db, rows, compact_settle_s=3 * 3600)  # some hours packed, the rest rows
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM frame_blocks").fetchone()[0] > 0
    st = S.SQLiteStorage(db, auto_compact=False)
    assert st.schema_version() == S.SCHEMA_VERSION
    sql = st._reader().execute("SELECT sql FROM sqlite_master WHERE name = 'frame_rollup'").fetchone()[0]
    assert "PRIMARY KEY (hour, camera_id" in sql and "ts_min" in sql
    _check_queries(st, t0, max(r[3] for r in rows), rng)
    st.store_frames([_row("cam-0", 5000 + i, now + 1000 * i, rng) for i in range(30)])
    st.compact(settle_s=0)
    _check_counters(st)
    st.close()


def test_a_frame_dropped_by_compaction_as_already_packed_leaves_the_counters(tmp_path):
    """Writers never let a packed frame's key into the rows; if one got there (an older writer), compaction keeps the
    block's copy and takes the row out of the counters."""
    rng = random.Random(3)
    st = S.SQLiteStorage(tmp_path / "d.db", auto_compact=False)
    now = int(time.time() * 1000)
    rows = _rows(now - 4 * H, cameras=1, per_camera=100, step_ms=60_000)
    st.store_frames(rows)
    st.compact(settle_s=0, align_hour=False)
    with st._transaction() as w:  # the same key again as a row, counted like an insert would
        mark = S._rowid_mark(w)
        w.execute(st._INSERT, rows[5])
        S._count_new_rows(w, mark)
    st.store_frames([_row("cam-0", 1000, now, rng)])  # compaction never takes the newest row
    assert sum(v[0] for v in S.count_frames(st._reader(), S.FrameFilter(), H).values()) == len(rows) + 2
    assert st.compact(settle_s=0, align_hour=False)["frames"] == 2  # the row left last time, the copy
    _check_counters(st)
    assert sum(v[0] for v in S.count_frames(st._reader(), S.FrameFilter(), H).values()) == len(rows) + 1
    st.close()


def _key(r):
    return (r[3], r[0], r[1], r[2])


def test_listings_across_cameras_skip_the_blocks_a_page_of_rows_already_beats(tmp_path, monkeypatch):
    """select_frames (the query API's listing) equals a sort of every frame for orders, filters, limits and cursors
    across both parts; a page that the recent rows fill (the newest frames, newest of one class) decodes no block."""
    rng = random.Random(4)
    st = S.SQLiteStorage(tmp_path / "l.db", auto_compact=False)
    now = int(time.time() * 1000)
    rows = sorted(_rows(now - 3 * H, cameras=4, per_camera=1200, step_ms=9_000), key=lambda r: r[4])
    st.store_frames(rows)  # in stored-time order, as a server appends them
    # the hours closed 40-100 minutes before the newest frame packed, the rest as rows (whatever the time of day)
    boundary = (rows[-1][4] - 40 * 60_000) // H * H
    st.compact(settle_s=0, now=boundary)
    conn = st._reader()
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] > 200
    every = sorted(_all_frames(st), key=_key)
    ts = [r[3] for r in every]
    for kw in ({}, {"predictions": (2,)}, {"cameras": ("cam-1", "cam-3")}, {"since": ts[len(ts) // 4]},
               {"since": ts[100] + 1, "until": ts[-300]}, {"models": ("m2",), "min_confidence": 0.3}):
        f = S.FrameFilter(**kw)
        match = [r for r in every if r in _brute_rows(every, f)]
        for order in ("asc", "desc"):
            expect = match if order == "asc" else match[::-1]
            for limit in (1, 37, 100):
                got, after = [], None
                while len(got) < 3 * limit + 5:
                    page = S.select_frames(conn, f, order=order, after=after, limit=limit)
                    got += page
                    if len(page) < limit:
                        break
                    after = _key(page[-1])
                assert got == expect[:len(got)] and (len(got) >= 3 * limit + 5 or len(got) == len(expect)), \
                    (kw, order, limit)
    decoded = []
    for name in ("decode_keys", "decode_block"):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _real=real, _name=name: decoded.append(_name) or _real(*a))
    newest = S.select_frames(conn, S.FrameFilter(), order="desc", limit=100)
    one_class = S.select_frames(conn, S.FrameFilter(predictions=(3,)), order="desc", limit=20)
    assert decoded == []
    assert newest == every[::-1][:100] and one_class == [r for r in every[::-1] if r[7] == 3][:20]
    st.close()


def _brute_rows(every, f):
    return {r for r in every if not ((f.cameras and r[0] not in f.cameras) or
                                     (f.predictions and r[7] not in f.predictions) or
                                     (f.models and r[5] not in f.models) or
                                     (f.since is not None and r[3] < f.since) or
                                     (f.until is not None and r[3] >= f.until) or
                                     (f.min_confidence is not None and r[8] < f.min_confidence))}
