"""What the query API's index costs and buys: query latency of each query shape on a large SQLite database with and
without ``frames_by_time``, and the ingest cost of maintaining it (store_frames in the server's durable transactions).

    python -m taskcodec.bench.query_api [--cameras 20] [--frames-per-camera 50000] [--out bench/results/query_api]

Rows are synthetic (capture times 1 s apart per camera, 10 classes, 6-byte payloads) but go through the server's
real schema (storage.SQLiteStorage) and the query module's real SQL (server.query).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from taskcodec.bench.ab import abba
from taskcodec.report import machine_info
from taskcodec.server.query import CountQuery, FleetStats, FrameQuery, Reader, query_counts, query_frames
from taskcodec.server.storage import SQLiteStorage

T0 = 1_790_000_000_000
CLASSES = [f"class-{i}" for i in range(10)]


def _rows(cameras: int, per_camera: int, start: int, seed: int):
    rng = np.random.default_rng(seed)
    for cam in range(cameras):
        preds = rng.integers(0, 10, per_camera)
        conf = rng.uniform(0.3, 1.0, per_camera)
        yield [(f"cam-{cam:03d}", 1, start + i, T0 + 1000 * (start + i), T0 + 1000 * (start + i), "m0",
                rng.bytes(6), int(preds[i]), float(conf[i])) for i in range(per_camera)]


def _fill(db: Path, cameras: int, per_camera: int, chunk: int = 5000) -> float:
    storage = SQLiteStorage(db)
    t0 = time.perf_counter()
    for rows in _rows(cameras, per_camera, 0, 0):
        for i in range(0, len(rows), chunk):
            storage.store_frames(rows[i:i + chunk])
    storage.close()
    return time.perf_counter() - t0


def _ingest_seconds(db: Path, cameras: int, per_camera: int, batch: int, seed: int) -> float:
    """Time to store per_camera more frames per camera in transactions of ``batch`` rows (one fsync each)."""
    storage = SQLiteStorage(db)
    t0 = time.perf_counter()
    for rows in _rows(cameras, per_camera, 10_000_000 * seed, seed):
        for i in range(0, len(rows), batch):
            storage.store_frames(rows[i:i + batch])
    elapsed = time.perf_counter() - t0
    storage.close()
    return elapsed


def _time(fn, repeat: int) -> dict:
    fn()  # warm the page cache and the statement cache
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        samples.append(time.perf_counter() - t0)
    return {"median_ms": round(1000 * statistics.median(samples), 3), "min_ms": round(1000 * min(samples), 3),
            "rows": n}


def _shapes(reader: Reader, cameras: int, per_camera: int) -> dict:
    hour = 3_600_000
    end = T0 + 1000 * per_camera
    mid = T0 + 1000 * (per_camera // 2)
    return {
        "one camera, 1 h, limit 1000": lambda: len(query_frames(FrameQuery(
            camera=["cam-000"], since=str(mid), until=str(mid + hour), limit=1000), reader)),
        "all cameras, 1 min, limit 1000": lambda: len(query_frames(FrameQuery(
            since=str(mid), until=str(mid + 60_000), limit=1000), reader)),
        "one class, all cameras, newest 100": lambda: len(query_frames(FrameQuery(
            class_name=["class-3"], order="desc", limit=100), reader)),
        "counts per 5 min, all cameras, 1 h": lambda: len(query_counts(CountQuery(
            since=str(mid), until=str(mid + hour), interval="5m"), reader)["buckets"]),
        "counts per 1 h by camera, whole table": lambda: len(query_counts(CountQuery(
            interval="1h", by_camera=True), reader)["buckets"]),
        "counts per 1 min, one camera, 1 h": lambda: len(query_counts(CountQuery(
            camera=["cam-001"], since=str(end - hour), until=str(end), interval="1m"), reader)["buckets"]),
    }


def run(cameras: int, per_camera: int, repeat: int, out: Path, batch: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="taskcodec-query-bench-"))
    try:
        db = tmp / "frames.db"
        fill_s = _fill(db, cameras, per_camera)
        total = cameras * per_camera
        results: dict = {"machine": machine_info(), "frames": total, "cameras": cameras, "repeat": repeat,
                         "fill_seconds": round(fill_s, 2), "db_bytes": db.stat().st_size, "queries": {}}
        copies = {}
        for label, drop in (("with frames_by_time", False), ("without frames_by_time", True)):
            copy = copies[label] = tmp / f"copy-{int(drop)}.db"
            with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
                src.backup(dst)
            if drop:
                with sqlite3.connect(copy) as conn:
                    conn.execute("DROP INDEX frames_by_time")
            reader = Reader(copy, CLASSES)
            results["queries"][label] = {name: _time(fn, repeat)
                                         for name, fn in _shapes(reader, cameras, per_camera).items()}
            stats = FleetStats(reader)
            t0 = time.perf_counter()
            stats.refresh()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats.refresh()
            again = time.perf_counter() - t0
            results["queries"][label]["fleet figures, first refresh (all rows)"] = {"median_ms": round(first * 1000, 3)}
            results["queries"][label]["fleet figures, next refresh (no new rows)"] = {"median_ms": round(again * 1000, 3)}
        # ingest: rounds alternate the order (ABBA...) so that load from other jobs hits both alike
        per, rounds = 1000, 4
        samples: dict[str, list[float]] = {label: [] for label in copies}
        for r in range(rounds):
            for label in abba(copies, r):
                samples[label].append(_ingest_seconds(copies[label], cameras, per, batch, seed=10 + r))
        results["ingest"] = {label: {"frames": cameras * per, "rows_per_transaction": batch, "rounds": rounds,
                                     "seconds": round(statistics.median(v), 3), "all_seconds": [round(x, 3) for x in v]}
                             for label, v in samples.items()}
        for label, r in results["ingest"].items():
            r["frames_per_s"] = round(r["frames"] / r["seconds"], 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(_markdown(results, cameras, per_camera, repeat, batch))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _markdown(r: dict, cameras: int, per_camera: int, repeat: int, batch: int) -> str:
    m = r["machine"]
    lines = [f"# Query API: latency per query shape and the ingest cost of `frames_by_time`", "",
             f"`python -m taskcodec.bench.query_api --cameras {cameras} --frames-per-camera {per_camera} "
             f"--repeat {repeat} --batch {batch}` on {m.get('cpu')} ({m.get('usable_cores')} usable cores, shared "
             f"with other jobs), SQLite {sqlite3.sqlite_version}. Database: {r['frames']:,} frames, "
             f"{r['db_bytes'] / 1e6:.0f} MB. Median of {repeat} runs after one warm-up (page cache warm).", "",
             "| query | with index (ms) | without (ms) | rows/buckets |", "|---|---:|---:|---:|"]
    with_, without = r["queries"]["with frames_by_time"], r["queries"]["without frames_by_time"]
    for name in with_:
        lines.append(f"| {name} | {with_[name]['median_ms']} | {without[name]['median_ms']} | "
                     f"{with_[name].get('rows', '')} |")
    lines += ["", "Ingest into the same databases (server transactions, synchronous=FULL, one fsync each; median of "
              "rounds alternating the order):", "",
              "| | frames per round | rows/transaction | median seconds | frames/s | all rounds (s) |",
              "|---|---:|---:|---:|---:|---|"]
    for label, i in r["ingest"].items():
        lines.append(f"| {label} | {i['frames']} | {i['rows_per_transaction']} | {i['seconds']} | {i['frames_per_s']} | "
                     f"{', '.join(map(str, i['all_seconds']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, default=20)
    p.add_argument("--frames-per-camera", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--batch", type=int, default=64, help="rows per transaction in the ingest measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results/query_api"))
    a = p.parse_args()
    r = run(a.cameras, a.frames_per_camera, a.repeat, a.out, a.batch)
    print(a.out.with_suffix(".md").read_text())
    del r


if __name__ == "__main__":
    main()
