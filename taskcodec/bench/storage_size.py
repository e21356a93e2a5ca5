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

``product``: the server's own store (SQLiteStorage) after its compaction (``compact``, what `serve` runs in the
background and `taskcodec db compact` on demand) packed every frame but the newest into blocks; sizes as written
(the file keeps the freed pages of the moved rows: new frames reuse them), in use (pages not on the freelist) and
after VACUUM; the query latencies of the query API / dashboard reader API on the store before and after compaction.
``--pg``: the same for the cluster's PostgreSQL store (PgStore.compact, the workers' background step).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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


QUERY_REPEAT = 7


def _time(fn, repeat: int = QUERY_REPEAT) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(1000 * (time.perf_counter() - t))
    runs.sort()
    return {"median_ms": runs[len(runs) // 2], "max_ms": runs[-1]}


def _sqlite_queries(storage, cameras: int, end_ms: int) -> dict[str, dict[str, float]]:
    """The query API's and dashboard's questions through the storage reader API (both parts)."""
    from taskcodec.server.storage import HOUR_MS, FrameFilter, count_frames, select_frames

    conn = storage._reader()
    cam = f"cam-{cameras // 2:06d}"
    hour = (end_ms // HOUR_MS) * HOUR_MS
    queries = {
        "newest 100 frames of one camera (dashboard)":
            lambda: select_frames(conn, FrameFilter(cameras=(cam,)), order="desc", limit=100),
        "one camera's frames in a 10-minute range (query API)":
            lambda: select_frames(conn, FrameFilter(cameras=(cam,), since=end_ms - 900_000, until=end_ms - 300_000),
                                  limit=1000),
        "one camera's frames after a seq (GET /v1/cameras/ID/frames)":
            lambda: storage.frames(cam, since_seq=100, limit=100),
        "counts by class, one camera, per minute, last hour (dashboard chart)":
            lambda: count_frames(conn, FrameFilter(cameras=(cam,), since=end_ms - HOUR_MS, until=end_ms), 60_000,
                                 with_bytes=True),
        "counts by class per hour, all cameras, whole store (rollup)":
            lambda: count_frames(conn, FrameFilter(until=hour), HOUR_MS),
        "counts by class per minute, all cameras, last 10 minutes":
            lambda: count_frames(conn, FrameFilter(since=end_ms - 600_000, until=end_ms), 60_000),
        "100 frames of all cameras from a time on (query API page)":
            lambda: select_frames(conn, FrameFilter(since=end_ms - 1_200_000), limit=100),
    }
    return {name: _time(fn) for name, fn in queries.items()}


def _sizes(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    return {"file": pages * page, "in_use": (pages - free) * page}


def _product(path: Path, batches, cameras: int, log=print) -> list[dict[str, Any]]:
    """The server's store: written by store_batches, then compacted by the product's own compaction."""
    from taskcodec.server.storage import BatchRows, SQLiteStorage

    storage = SQLiteStorage(path)
    cpu = 0.0
    n = 0
    end_ms = 0
    for rows in batches:
        t = time.process_time()
        storage.store_batches([BatchRows(r[0], None, [r]) for r in rows])
        cpu += time.process_time() - t
        n += len(rows)
        end_ms = max(end_ms, max(r[3] for r in rows) + 1)
    before_q = _sqlite_queries(storage, cameras, end_ms)
    before = _sizes(path)
    t = time.process_time()
    result = storage.compact(settle_s=0, align_hour=False)
    compact_cpu = time.process_time() - t
    log(f"product: compaction packed {result['frames']:,} frames into {result['blocks_written']:,} blocks, "
        f"{1e6 * compact_cpu / max(result['frames'], 1):.1f} µs CPU/frame")
    after_q = _sqlite_queries(storage, cameras, end_ms)
    storage.close()
    after = _sizes(path)
    conn = sqlite3.connect(path)
    conn.execute("VACUUM")
    vac = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return [{"layout": "product before compaction (= current)", "frames": n, "bytes_per_frame": before["file"] / n,
             "bytes_per_frame_in_use": before["in_use"] / n, "write_cpu_us_per_frame": 1e6 * cpu / n,
             "queries": before_q},
            {"layout": "product after compaction (packed blocks)", "frames": n, "bytes_per_frame": after["file"] / n,
             "bytes_per_frame_in_use": after["in_use"] / n, "bytes_per_frame_vacuumed": vac / n,
             "packed_frames": result["frames"], "blocks": result["blocks_written"],
             "compaction_cpu_us_per_frame": 1e6 * compact_cpu / max(result["frames"], 1), "queries": after_q}]


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
        path = Path(tmp) / "product.db"
        product = _product(path, _frames(cameras, seconds, model_id), cameras, log)
        path.unlink()
        for row in product:
            log(f"{row['layout']}: {row['bytes_per_frame']:.1f} B/frame as written, "
                f"{row['bytes_per_frame_in_use']:.1f} in use" + (f", {row['bytes_per_frame_vacuumed']:.1f} after "
                                                                 f"VACUUM" if "bytes_per_frame_vacuumed" in row else ""))
        for name, fn in (("compact", _compact), ("packed", _packed)):
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
              "load_avg_1min": os.getloadavg()[0], "payload_bytes": 6, "product": product, "rows": rows,
              "note": "6-byte payloads, confidences as float64 (not compressible); micro-batches of one frame per "
                      "camera (product, compact); product = the server's SQLiteStorage written by store_batches, "
                      "then its compaction; compact / packed = the design layouts measured before packing was built "
                      "(packed: varint columns, no zlib, confidences quantised to 1/255)"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "storage_size.json", result)
    write_text(out / "storage_size.md", markdown(result))
    return result


def _queries_table(before: dict, after: dict, labels=("rows (before compaction)", "packed")) -> str:
    lines = [f"| query | {labels[0]} median ms | {labels[1]} median ms | {labels[1]} max ms |", "|---|---|---|---|"]
    for name, b in before.items():
        a = after[name]
        lines.append(f"| {name} | {b['median_ms']:.2f} | {a['median_ms']:.2f} | {a['max_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    cols = [("layout", "layout"), ("frames", "frames"), ("bytes_per_frame", "B/frame on disk"),
            ("bytes_per_frame_vacuumed", "B/frame after VACUUM"), ("write_cpu_us_per_frame", "write CPU µs/frame")]
    before, after = result["product"]
    product = [{"layout": r["layout"], "frames": r["frames"], "bytes_per_frame": r["bytes_per_frame"],
                "bytes_per_frame_in_use": r["bytes_per_frame_in_use"],
                "bytes_per_frame_vacuumed": r.get("bytes_per_frame_vacuumed"),
                "cpu": r.get("write_cpu_us_per_frame", r.get("compaction_cpu_us_per_frame"))} for r in (before, after)]
    pcols = [("layout", "the product's store"), ("frames", "frames"), ("bytes_per_frame", "B/frame as written"),
             ("bytes_per_frame_in_use", "B/frame in use (not free pages)"),
             ("bytes_per_frame_vacuumed", "B/frame after VACUUM"),
             ("cpu", "CPU µs/frame (write; compaction)")]
    return (f"# SQLite bytes on disk per 6-byte frame\n\n{machine_line(result['machine'])}; {result['time']}; "
            f"{result['cameras']} one-fps cameras, {result['frames']:,} frames; load average "
            f"{result['load_avg_1min']:.1f} (shared box). {result['note']}.\n\n"
            "## The product: SQLiteStorage, then its compaction\n\n"
            + markdown_table(product, pcols, {"frames": ",d", "bytes_per_frame": ".1f",
                                              "bytes_per_frame_in_use": ".1f", "bytes_per_frame_vacuumed": ".1f",
                                              "cpu": ".1f"})
            + f"\n{after['packed_frames']:,} frames packed into {after['blocks']:,} blocks (the newest frame stays a "
              "row). \"As written\" keeps the pages the moved rows freed (SQLite reuses them for new frames, so a "
              "running store settles near \"in use\").\n\n"
            "Query latencies through the storage reader API (what the query API and dashboard call):\n\n"
            + _queries_table(before["queries"], after["queries"])
            + "\n## Design layouts (measured before packing was built)\n\n"
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
            conn.execute("DROP TABLE packs")
        product = _pg_product(c.pg_dsn, frames, cameras, log)
    n = q["frames"]
    result = {"machine": machine_info(), "time": utc_now(), "frames": n, "cameras": cameras,
              "load_avg_1min": os.getloadavg()[0],
              "rows": [{"layout": "current (partitioned frames + unique key + class_counts)", "frames": n,
                        "bytes_per_frame": current / n},
                       {"layout": "design layout: packed per camera-hour (+ class_counts)", "frames": n,
                        "bytes_per_frame": packed / n},
                       {"layout": "product, rows (PgStore.store_frames; random payloads and classes)",
                        "frames": product["frames"], "bytes_per_frame": product["bytes_per_frame_before"]},
                       {"layout": "product after compaction (frame_blocks + class_counts + reclaimed partitions)",
                        "frames": product["frames"], "bytes_per_frame": product["bytes_per_frame_after"]}],
              "product": product, "queries_current": q["queries"]}
    write_json(out / "storage_size_pg.json", result)
    write_text(out / "storage_size_pg.md", (
        f"# PostgreSQL bytes on disk per 6-byte frame\n\n{machine_line(result['machine'])}; {result['time']}; "
        f"{n:,} frames of {cameras} cameras (the cluster bench's fill); load average {result['load_avg_1min']:.1f} "
        f"(shared box). pg_total_relation_size: heap + indexes + TOAST.\n\n"
        + markdown_table(result["rows"], [("layout", "layout"), ("frames", "frames"),
                                          ("bytes_per_frame", "B/frame on disk")],
                         {"frames": ",d", "bytes_per_frame": ".1f"})
        + f"\nThe first two rows are the cluster bench's fill (constant payloads, one class per frame pattern), "
          "the product rows the same frames as the SQLite bench (random payloads, classes, confidences). Product: "
          f"PgStore.compact (what a worker runs every 5 minutes; `taskcodec cluster compact`) packed "
          f"{product['packed_frames']:,} frames into {product['blocks']:,} blocks in {product['compact_s']:.1f} s "
          f"({1e6 * product['compact_s'] / max(product['packed_frames'], 1):.0f} µs/frame wall, PostgreSQL "
          f"included); then the emptied day partitions were truncated (reclaim_partitions: the next compaction does "
          f"it for past days); sizes after VACUUM (autovacuum's job in a running cluster): frame_blocks "
          f"{product['bytes_after']['frame_blocks'] / product['frames']:.1f} B/frame, class_counts "
          f"{product['bytes_after']['class_counts'] / product['frames']:.1f} (each batch's counter updates leave "
          f"dead row versions that VACUUM only makes reusable; after VACUUM FULL "
          f"{product['class_counts_after_vacuum_full'] / product['frames']:.1f}), the day partitions "
          f"{product['bytes_after']['partitions'] / product['frames']:.1f}. Query latencies through PgStore's readers "
          "(both parts):\n\n"
        + _queries_table(product["queries_before"], product["queries_after"])))
    log(f"PostgreSQL: current {current / n:.1f} B/frame, design packed {packed / n:.1f} B/frame, product "
        f"{product['bytes_per_frame_before']:.1f} -> {product['bytes_per_frame_after']:.1f} B/frame after compaction")
    return result


def _pg_queries(store, cameras: int, end_ms: int, prefix: str) -> dict[str, dict[str, float]]:
    cam = f"{prefix}{cameras // 2:06d}"
    queries = {
        "newest 100 frames of one camera": lambda: store.camera_frames(cam, 0, end_ms, limit=100, newest=True),
        "one camera's frames in a 10-minute range": lambda: store.camera_frames(cam, end_ms - 900_000,
                                                                                 end_ms - 300_000, limit=1000),
        "counts by class, one camera, last hour (rollup)": lambda: store.class_counts(cam, end_ms - 3_600_000,
                                                                                      end_ms),
    }
    return {name: _time(fn) for name, fn in queries.items()}


def _pg_bytes(dsn: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        one = lambda sql: int(conn.execute(sql).fetchone()[0])  # noqa: E731
        parts = one("SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                    "WHERE inhparent = 'frames'::regclass")
        return {"partitions": parts, "class_counts": one("SELECT pg_total_relation_size('class_counts')"),
                "frame_blocks": one("SELECT pg_total_relation_size('frame_blocks')")}


def _pg_product(dsn: str, frames: int, cameras: int, log=print) -> dict[str, Any]:
    """The product's PostgreSQL store in a database of its own: the same frames as the SQLite product (random 6-byte
    payloads, random classes and confidences) written by PgStore.store_frames (the workers' write path), then
    compacted by its own compaction (everything: the current hour too) and the emptied day partitions reclaimed (what
    the next compaction run does for past days)."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from taskcodec.server.cluster.pgstore import PgStore, migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE product")
    pdsn = make_conninfo(dsn, dbname="product")
    migrate(pdsn)
    store = PgStore(pdsn)
    seconds = max(1, frames // cameras)
    n, end_ms, t = 0, 0, time.perf_counter()
    chunk: list = []
    for rows in _frames(cameras, seconds, "6f0d113794f9346d"):
        chunk += rows
        end_ms = max(end_ms, max(r[3] for r in rows) + 1)
        if len(chunk) >= 20_000:
            n += store.store_frames(chunk)
            chunk = []
    n += store.store_frames(chunk) if chunk else 0
    write_s = time.perf_counter() - t
    before_bytes = _pg_bytes(pdsn)
    before_q = _pg_queries(store, cameras, end_ms, "cam-")
    t = time.perf_counter()
    result = store.compact(settle_s=-2 * 3600)
    compact_s = time.perf_counter() - t
    reclaimed = store.reclaim_partitions()
    log(f"PostgreSQL product: {result['frames']:,} frames into {result['blocks_written']:,} blocks in "
        f"{compact_s:.1f} s; reclaimed {', '.join(reclaimed) or '-'}")
    after_bytes = _pg_bytes(pdsn)
    after_q = _pg_queries(store, cameras, end_ms, "cam-")
    store.close()
    with psycopg.connect(pdsn, autocommit=True) as conn:  # the rollup without the dead versions of its counters
        conn.execute("VACUUM FULL class_counts")
        rollup_live = int(conn.execute("SELECT pg_total_relation_size('class_counts')").fetchone()[0])
    return {"frames": n, "write_s": write_s, "packed_frames": result["frames"], "blocks": result["blocks_written"],
            "compact_s": compact_s, "bytes_before": before_bytes, "bytes_after": after_bytes,
            "bytes_per_frame_before": sum(before_bytes.values()) / n,
            "bytes_per_frame_after": sum(after_bytes.values()) / n, "class_counts_after_vacuum_full": rollup_live,
            "queries_before": before_q, "queries_after": after_q}


def _prefill_blocks(storage, cameras: int, model_id: str, hours: int = 24) -> None:
    from taskcodec.server.storage import HOUR_MS, encode_block

    rng = random.Random(0)
    epochs = [rng.getrandbits(62) for _ in range(cameras)]  # as _frames draws them
    data, models = encode_block([("x", 0, 0, 0, 0, model_id, b"123456", 0, 0.5)])
    t0 = int(time.time() * 1000) // HOUR_MS - hours
    with storage._transaction() as w:
        w.executemany("INSERT INTO frame_blocks VALUES (?, ?, ?, ?, ?, 3600, 0, 0, 21600, ?, 1, ?)",
                      [(f"cam-{c:06d}", epochs[c], t0 + h, -3600 * (hours - h), -3600 * (hours - h) + 3599,
                        json.dumps(models), data) for c in range(cameras) for h in range(hours)])


def write_ab(old_storage: Path, out: Path, cameras: int = 500, seconds: int = 60, rounds: int = 12,
             log=print) -> dict[str, Any]:
    """The per-frame write cost of the server's write path (store_batches with the camera token checked, one-frame
    batches, one micro-batch of ``cameras`` batches per second) with this storage module and with ``old_storage``
    (a copy of storage.py from before packing), interleaved A/B/A/B on fresh databases."""
    import importlib.util
    import sys

    from taskcodec.server import storage as new

    spec = importlib.util.spec_from_file_location("taskcodec_old_storage", old_storage)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    variants = {"before packing": old, "with packing": new}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    model_id = "6f0d113794f9346d"
    for r in range(rounds):
        for name, mod in (variants.items() if r % 2 == 0 else reversed(list(variants.items()))):
            with tempfile.TemporaryDirectory(prefix="taskcodec-write-ab-", dir=os.environ.get("TMPDIR")) as tmp:
                storage = mod.SQLiteStorage(Path(tmp) / "w.db")
                for c in range(cameras):
                    storage.add_camera(f"cam-{c:06d}", "h")
                if hasattr(mod, "encode_block"):  # a day of packed hours per camera already (same epochs, lower seqs)
                    _prefill_blocks(storage, cameras, model_id)
                cpu = 0.0
                n = 0
                for rows in _frames(cameras, seconds, model_id):
                    t = time.process_time()
                    storage.store_batches([mod.BatchRows(row[0], "h", [row]) for row in rows])
                    cpu += time.process_time() - t
                    n += len(rows)
                storage.close()
            runs[name].append(1e6 * cpu / n)
            log(f"round {r}: {name}: {runs[name][-1]:.1f} µs/frame")
    return _write_ab(out / "storage_size_write_ab", "SQLite write path", runs, cameras, seconds, rounds, (
        f"store_batches as the server calls it (token checked in the transaction; with packing the writer also "
        f"compares each batch's seqs with the highest packed seq of its camera and epoch, cached per compaction "
        f"generation), {cameras} one-frame batches per micro-batch, {seconds} micro-batches, {rounds} interleaved "
        f"rounds on fresh databases (with packing: 24 packed hours per camera in frame_blocks already)"))


def write_ab_pg(old_pgstore: Path, out: Path, cameras: int = 256, seconds: int = 120, rounds: int = 8,
                log=print) -> dict[str, Any]:
    """The workers' write path (PgStore.store_frames with one fetched batch of ``cameras`` one-frame messages)
    with this pgstore and with ``old_pgstore`` (a copy from before packing), interleaved on fresh databases of one
    local PostgreSQL; CPU seconds of the client and of PostgreSQL's processes per frame (with packing: a day of
    packed hours per camera in frame_blocks already)."""
    import importlib.util
    import sys

    import psycopg
    from psycopg.conninfo import make_conninfo

    from taskcodec.bench.cluster import _cpu_seconds, _postgres_pids
    from taskcodec.server.cluster import pgstore as new
    from taskcodec.server.cluster.local import LocalCluster
    from taskcodec.server.storage import HOUR_MS, encode_block

    spec = importlib.util.spec_from_file_location("taskcodec_old_pgstore", old_pgstore)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)
    variants = {"before packing": old, "with packing": new}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    model_id = "6f0d113794f9346d"
    with LocalCluster([], gateways=0, workers=0, nats_nodes=0) as c:
        k = 0
        for r in range(rounds):
            for name, mod in (variants.items() if r % 2 == 0 else reversed(list(variants.items()))):
                k += 1
                with psycopg.connect(c.pg_dsn, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE ab{k}")
                dsn = make_conninfo(c.pg_dsn, dbname=f"ab{k}")
                mod.migrate(dsn)
                store = mod.PgStore(dsn)
                if mod is new:
                    rng = random.Random(0)
                    epochs = [rng.getrandbits(62) for _ in range(cameras)]
                    data, models = encode_block([("x", 0, 0, 0, 0, model_id, b"123456", 0, 0.5)])
                    h0 = int(time.time() * 1000) // HOUR_MS - 24
                    with store.conn.transaction():
                        store.conn.cursor().executemany(
                            "INSERT INTO frame_blocks VALUES (%s, %s, to_timestamp(%s), %s, %s, 3600, 0, 0, %s, 1, %s)",
                            [(f"cam-{i:06d}", epochs[i], (h0 + h) * 3600, -3600 * (24 - h), -3600 * (24 - h) + 3599,
                              json.dumps(models), data) for i in range(cameras) for h in range(24)])
                with psycopg.connect(dsn, autocommit=True) as conn:  # no autovacuum of the set-up inside the window
                    conn.execute("VACUUM ANALYZE")
                pids = _postgres_pids(c)
                cpu0, t0 = _cpu_seconds(pids), time.process_time()
                n = 0
                for rows in _frames(cameras, seconds, model_id):
                    n += store.store_frames(rows)
                cpu = time.process_time() - t0 + _cpu_seconds(pids) - cpu0
                store.close()
                runs[name].append(1e6 * cpu / n)
                log(f"round {r}: {name}: {runs[name][-1]:.1f} µs/frame (client + PostgreSQL)")
    return _write_ab(out / "storage_size_write_ab_pg", "PostgreSQL write path", runs, cameras, seconds, rounds, (
        f"PgStore.store_frames as a worker calls it (one fetched batch: {cameras} one-frame messages of {cameras} "
        f"cameras), {seconds} batches per run, {rounds} interleaved rounds on fresh databases (VACUUM ANALYZE after "
        f"the set-up); CPU of the client and of PostgreSQL's processes (with packing: the read of the compaction "
        f"generation and the highest packed seq per camera and epoch, cached per generation; 24 packed hours per "
        f"camera in frame_blocks already)"))


def _write_ab(stem: Path, title: str, runs: dict[str, list[float]], cameras: int, seconds: int, rounds: int,
              how: str) -> dict:
    """JSON + markdown of a before/with-packing A/B of µs per frame (interleaved rounds: the per-round ratio is
    what a shared box measures best)."""
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "seconds": seconds,
              "rounds": rounds, "load_avg_1min": os.getloadavg()[0], "us_per_frame": runs,
              "median_us_per_frame": {k: float(np.median(v)) for k, v in runs.items()},
              "median_ratio_with_to_before": float(np.median(np.array(runs["with packing"]) /
                                                             np.array(runs["before packing"])))}
    write_json(stem.with_suffix(".json"), result)
    med = result["median_us_per_frame"]
    write_text(stem.with_suffix(".md"), (
        f"# {title}: CPU per frame before and with packing\n\n{machine_line(result['machine'])}; {result['time']}; "
        f"load average {result['load_avg_1min']:.1f} (shared box). {how}.\n\n"
        "| variant | median µs/frame | runs |\n|---|---|---|\n"
        + "".join(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |\n" for k, v in runs.items())
        + f"\nMedian of the per-round ratios (with / before): {result['median_ratio_with_to_before']:.3f}.\n"))
    return result


if __name__ == "__main__":  # python3 -m taskcodec.bench.storage_size write-ab|write-ab-pg OLD_MODULE.py [OUT]
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] in ("write-ab", "write-ab-pg"):
        (write_ab if sys.argv[1] == "write-ab" else write_ab_pg)(
            Path(sys.argv[2]), Path(sys.argv[3] if len(sys.argv) > 3 else "bench/results"))
    else:
        sys.exit("usage: python3 -m taskcodec.bench.storage_size write-ab OLD_STORAGE.py [OUT_DIR]\n"
                 "       python3 -m taskcodec.bench.storage_size write-ab-pg OLD_PGSTORE.py [OUT_DIR]")
