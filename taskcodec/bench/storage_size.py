"""`taskcodec bench storage-size`: bytes on disk per stored 6-byte frame in the embedded server's SQLite store, and
what other layouts of the same frames would take.

Frames: ``cameras`` one-fps cameras (random 62-bit epochs as real cameras draw them, sequential seqs, capture times one
second apart, the bundle's model id, 6-byte payloads, a class and a confidence), written in micro-batches of one frame
per camera (as the server commits them under load).

Layouts:
* ``current``: the server's schema (SQLiteStorage.store_batches, the real write path; its three B-trees: the primary
  key (camera_id, epoch, seq), frames_by_capture_time, frames_by_time);
* ``compact``: an integer camera key and an integer model key, the confidence as an integer in 1/10000, the stored
  time as a delta, a WITHOUT ROWID table keyed (cam, epoch, seq) and one index (ts, cam, prediction);
* ``packed``: one row per camera, epoch and hour of capture: the frames' seqs and capture times as delta-coded
  varint arrays, payload lengths + concatenated payloads, classes and confidences as byte arrays; plus a
  (hour, cam, class) -> count rollup for the class-count queries. The exact key of every frame is still recoverable
  (dedup stays exact: a re-sent frame is looked up in its packed row), the unit of compaction is one camera-hour.
Sizes are ``page_count * page_size`` of each file as written (what a running server has) and after VACUUM.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        v = (v << 1) ^ (v >> 63)  # zigzag: deltas may be negative
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _frames(cameras: int, seconds: int, model_id: str):
    """Yield one micro-batch (list of rows in FrameRow order) per second."""
    rng = random.Random(0)
    epochs = [rng.getrandbits(62) for _ in range(cameras)]
    t0 = int(time.time() * 1000) - seconds * 1000
    for s in range(seconds):
        rows = []
        for c in range(cameras):
            ts = t0 + s * 1000 + (c * 997) % 1000
            payload = bytes(rng.getrandbits(8) for _ in range(6))
            rows.append((f"cam-{c:06d}", epochs[c], s, ts, ts + 40 + rng.randrange(200), model_id, payload,
                         rng.randrange(10), round(rng.random(), 4)))
        yield rows


def _size(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    live = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("VACUUM")
    vac = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return live, vac


def _current(path: Path, batches) -> float:
    from taskcodec.server.storage import BatchRows, SQLiteStorage

    storage = SQLiteStorage(path)
    cpu = 0.0
    for rows in batches:
        t = time.process_time()
        storage.store_batches([BatchRows(r[0], None, [r]) for r in rows])
        cpu += time.process_time() - t
    storage.close()
    return cpu


COMPACT = """
CREATE TABLE cams (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE frames (cam INTEGER NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
    stored_after INTEGER NOT NULL, model INTEGER NOT NULL, payload BLOB NOT NULL, prediction INTEGER NOT NULL,
    confidence INTEGER NOT NULL, PRIMARY KEY (cam, epoch, seq)) WITHOUT ROWID;
CREATE INDEX frames_by_time ON frames (ts, cam, prediction);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _compact(path: Path, batches) -> float:
    conn = _connect(path)
    conn.executescript(COMPACT)
    cams: dict[str, int] = {}
    models: dict[str, int] = {}
    cpu = 0.0
    for rows in batches:
        t = time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        out = []
        for cam, epoch, seq, ts, stored, model, payload, pred, conf in rows:
            if cam not in cams:
                cams[cam] = conn.execute("INSERT INTO cams (name) VALUES (?)", (cam,)).lastrowid
            if model not in models:
                models[model] = conn.execute("INSERT INTO models (name) VALUES (?)", (model,)).lastrowid
            out.append((cams[cam], epoch, seq, ts, stored - ts, models[model], payload, pred, round(conf * 10000)))
        conn.executemany("INSERT OR IGNORE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", out)
        conn.execute("COMMIT")
        cpu += time.process_time() - t
    conn.close()
    return cpu


PACKED = """
CREATE TABLE cams (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE packs (cam INTEGER NOT NULL, hour INTEGER NOT NULL, epoch INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    n INTEGER NOT NULL, model INTEGER NOT NULL, seqs BLOB NOT NULL, ts BLOB NOT NULL, stored BLOB NOT NULL,
    lengths BLOB NOT NULL, payloads BLOB NOT NULL, predictions BLOB NOT NULL, confidences BLOB NOT NULL,
    PRIMARY KEY (cam, hour, epoch, first_seq)) WITHOUT ROWID;
CREATE TABLE class_counts (hour INTEGER NOT NULL, cam INTEGER NOT NULL, prediction INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (hour, cam, prediction)) WITHOUT ROWID;
"""


def _packed(path: Path, batches) -> float:
    """Pack the frames per camera, epoch and hour (what a periodic compaction job would write)."""
    conn = _connect(path)
    conn.executescript(PACKED)
    groups: dict[tuple[str, int, int], list] = {}
    for rows in batches:
        for r in rows:
            groups.setdefault((r[0], r[3] // 3_600_000, r[1]), []).append(r)
    t = time.process_time()
    cams: dict[str, int] = {}
    conn.execute("BEGIN IMMEDIATE")
    for (cam, hour, epoch), rows in groups.items():
        if cam not in cams:
            cams[cam] = conn.execute("INSERT INTO cams (name) VALUES (?)", (cam,)).lastrowid
        rows.sort(key=lambda r: r[2])
        seqs = [r[2] for r in rows]
        ts = [r[3] for r in rows]
        conn.execute("INSERT INTO packs VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)", (
            cams[cam], hour, epoch, seqs[0], len(rows),
            _varints([b - a for a, b in zip(seqs, seqs[1:])]), _varints([ts[0]] + [b - a for a, b in zip(ts, ts[1:])]),
            _varints([r[4] - r[3] for r in rows]), bytes(len(r[6]) for r in rows), b"".join(r[6] for r in rows),
            bytes(r[7] & 0xFF for r in rows), bytes(min(255, round(r[8] * 255)) for r in rows)))
        counts: dict[int, int] = {}
        for r in rows:
            counts[r[7]] = counts.get(r[7], 0) + 1
        conn.executemany("INSERT INTO class_counts VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                         [(hour, cams[cam], p, n) for p, n in counts.items()])
    conn.execute("COMMIT")
    cpu = time.process_time() - t
    conn.close()
    return cpu


def run(frames: int, cameras: int, out: Path, log=print) -> dict[str, Any]:
    seconds = max(1, frames // cameras)
    n = seconds * cameras
    model_id = "6f0d113794f9346d"
    rows = []
    with tempfile.TemporaryDirectory(prefix="taskcodec-storage-size-", dir=os.environ.get("TMPDIR")) as tmp:
        for name, fn in (("current", _current), ("compact", _compact), ("packed", _packed)):
            path = Path(tmp) / f"{name}.db"
            cpu = fn(path, _frames(cameras, seconds, model_id))
            live, vac = _size(path)
            row = {"layout": name, "frames": n, "bytes_per_frame": live / n, "bytes_per_frame_vacuumed": vac / n,
                   "write_cpu_us_per_frame": 1e6 * cpu / n}
            rows.append(row)
            log(f"{name}: {row['bytes_per_frame']:.1f} B/frame ({row['bytes_per_frame_vacuumed']:.1f} after VACUUM), "
                f"write CPU {row['write_cpu_us_per_frame']:.1f} µs/frame")
            path.unlink()
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "frames": n,
              "load_avg_1min": os.getloadavg()[0], "payload_bytes": 6, "rows": rows,
              "note": "6-byte payloads; micro-batches of one frame per camera (current, compact); packed = what a "
                      "periodic per-camera-hour compaction writes (its CPU is the compaction's, once per frame)"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "storage_size.json", result)
    write_text(out / "storage_size.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    cols = [("layout", "layout"), ("frames", "frames"), ("bytes_per_frame", "B/frame on disk"),
            ("bytes_per_frame_vacuumed", "B/frame after VACUUM"), ("write_cpu_us_per_frame", "write CPU µs/frame")]
    return (f"# SQLite bytes on disk per 6-byte frame\n\n{machine_line(result['machine'])}; {result['time']}; "
            f"{result['cameras']} one-fps cameras, {result['frames']:,} frames; load average "
            f"{result['load_avg_1min']:.1f} (shared box). {result['note']}.\n\n"
            + markdown_table(result["rows"], cols, {"frames": ",d", "bytes_per_frame": ".1f",
                                                    "bytes_per_frame_vacuumed": ".1f",
                                                    "write_cpu_us_per_frame": ".1f"}))


def run_pg(frames: int, cameras: int, out: Path, log=print) -> dict[str, Any]:
    """PostgreSQL (the scale-out store): the cluster bench's fill of ``frames`` 6-byte frames through the real schema
    (daily partitions, unique key, class_counts rollup), then the same frames packed per camera, epoch and hour into
    a table of the ``packed`` layout above; bytes = pg_total_relation_size (heap + indexes + TOAST)."""
    import psycopg

    from taskcodec.bench.cluster import query_latencies, storage_bytes
    from taskcodec.server.cluster.local import LocalCluster

    with LocalCluster([], gateways=0, workers=0, nats_nodes=0) as c:
        q = query_latencies(c.pg_dsn, frames, cameras=cameras, log=log)
        current = storage_bytes(c.pg_dsn)
        with psycopg.connect(c.pg_dsn, autocommit=True) as conn:
            conn.execute("""CREATE TABLE packs (camera INT NOT NULL, hour INT NOT NULL, epoch BIGINT NOT NULL,
                first_seq BIGINT NOT NULL, n INT NOT NULL, model SMALLINT NOT NULL, seqs BYTEA NOT NULL,
                ts BYTEA NOT NULL, stored BYTEA NOT NULL, lengths BYTEA NOT NULL, payloads BYTEA NOT NULL,
                predictions BYTEA NOT NULL, confidences BYTEA NOT NULL,
                PRIMARY KEY (camera, hour, epoch, first_seq))""")
            rows = conn.execute("SELECT camera_id, epoch, seq, (extract(epoch FROM ts_capture) * 1000)::bigint, "
                                "stored_ms_after, payload, prediction, confidence FROM frames "
                                "ORDER BY camera_id, epoch, seq").fetchall()
            groups: dict[tuple, list] = {}
            ids: dict[str, int] = {}
            for r in rows:
                groups.setdefault((ids.setdefault(r[0], len(ids)), r[3] // 3_600_000, r[1]), []).append(r)
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO packs VALUES (%s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s)", [
                    (cam, hour, epoch, g[0][2], len(g), _varints([b[2] - a[2] for a, b in zip(g, g[1:])]),
                     _varints([g[0][3]] + [b[3] - a[3] for a, b in zip(g, g[1:])]), _varints([r[4] for r in g]),
                     bytes(len(r[5]) for r in g), b"".join(bytes(r[5]) for r in g), bytes(r[6] & 0xFF for r in g),
                     _varints([r[7] for r in g])) for (cam, hour, epoch), g in groups.items()])
            conn.execute("VACUUM ANALYZE packs")
            packed = conn.execute("SELECT pg_total_relation_size('packs') + pg_total_relation_size('class_counts')"
                                  ).fetchone()[0]
    n = q["frames"]
    result = {"machine": machine_info(), "time": utc_now(), "frames": n, "cameras": cameras,
              "load_avg_1min": os.getloadavg()[0],
              "rows": [{"layout": "current (partitioned frames + unique key + class_counts)", "frames": n,
                        "bytes_per_frame": current / n},
                       {"layout": "packed per camera-hour (+ class_counts)", "frames": n,
                        "bytes_per_frame": packed / n}],
              "queries_current": q["queries"]}
    write_json(out / "storage_size_pg.json", result)
    write_text(out / "storage_size_pg.md", (
        f"# PostgreSQL bytes on disk per 6-byte frame\n\n{machine_line(result['machine'])}; {result['time']}; "
        f"{n:,} frames of {cameras} cameras (the cluster bench's fill); load average {result['load_avg_1min']:.1f} "
        f"(shared box). pg_total_relation_size: heap + indexes + TOAST.\n\n"
        + markdown_table(result["rows"], [("layout", "layout"), ("frames", "frames"),
                                          ("bytes_per_frame", "B/frame on disk")],
                         {"frames": ",d", "bytes_per_frame": ".1f"})))
    log(f"PostgreSQL: current {current / n:.1f} B/frame, packed {packed / n:.1f} B/frame")
    return result
