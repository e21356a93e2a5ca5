"""What does the embedded store's steady-state write cost per frame, by SQLite page size and by layout? (issue 12
item 5)

``python3 -m taskcodec.bench.sqlite_page_size OUT [cameras per_commit seconds prefill_s rounds] [--layouts]``: for each
page size (4096, 2048, 1024; with ``--layouts`` instead: the current schema, and the same with schema ≤ 6's second
per-camera index, frames_by_capture_time, created before the prefill so that it grows as it did in a server) one
template store (a new file with that page size, then SQLiteStorage) with ``prefill_s`` seconds of
rows of every one-fps camera (store_frames, one second of all cameras per call); then ``rounds`` interleaved rounds
(order rotated each round): a copy of the template is opened, 5 s of frames go through store_batches untimed (cache
warm-up), then ``seconds`` s of frames through store_batches (tokens checked, one-frame batches, ``per_commit`` per
durable commit, as the server commits them at 1000 cameras), process CPU per frame (checkpoints included). Then per page
size on the last copy: the reader API's query timers (storage_size._sqlite_queries) on rows, the product's compaction,
the same queries on packed blocks, and bytes per frame (file, in use, after VACUUM).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskcodec.bench.storage_counters import _seconds_of_frames, _store_as_server
from taskcodec.bench.storage_size import _sizes, _sqlite_queries
from taskcodec.report import machine_info, machine_line, utc_now, write_json, write_text

PAGE_SIZES = (4096, 2048, 1024)
# --layouts: name -> (page size, SQL run on the new store before its prefill)
LAYOUTS = {"schema 7 (one per-camera index)": (4096, None),
           "schema 6 (+ frames_by_capture_time)": (
               4096, "CREATE INDEX frames_by_capture_time ON frames (camera_id, ts_capture_ms)")}


def _new_file(path: Path, page_size: int) -> None:
    """An empty database file with that page size (in WAL mode, which writes its header): SQLiteStorage then creates
    its schema in it (storage.py has no page-size option: SQLite's default, 4096, for a new file)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size={int(page_size)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def _io() -> dict[str, int]:
    """This process's write()/pwrite() calls and bytes so far (/proc/self/io: syscw, wchar)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


WARMUP_S = 5


def run(out: Path, cameras: int = 1000, per_commit: int = 57, seconds: int = 30, prefill_s: int = 1200,
        rounds: int = 4, log=print, layouts: bool = False) -> dict[str, Any]:
    from taskcodec.server import storage as st_mod

    variants = LAYOUTS if layouts else {str(p): (p, None) for p in PAGE_SIZES}
    base_name = next(iter(variants))

    rng0 = np.random.default_rng(0)
    epochs = [int(x) for x in rng0.integers(0, 1 << 62, cameras, dtype=np.int64)]
    start_ms = int(time.time() * 1000) - (prefill_s + WARMUP_S + seconds) * 1000
    frames_rng = np.random.default_rng(2)
    warm = [r for rows in _seconds_of_frames(cameras, prefill_s, prefill_s + WARMUP_S, start_ms, epochs, frames_rng)
            for r in rows]
    timed = [r for rows in _seconds_of_frames(cameras, prefill_s + WARMUP_S, prefill_s + WARMUP_S + seconds,
                                              start_ms, epochs, frames_rng) for r in rows]
    end_ms = max(r[3] for r in timed) + 1
    res: dict[str, Any] = {"machine": machine_info(), "time": utc_now(), "cameras": cameras,
                           "frames_per_commit": per_commit, "seconds": seconds, "warmup_s": WARMUP_S,
                           "prefill_s": prefill_s, "rounds": rounds, "page_sizes": list(variants),
                           "variant_sql": {k: v[1] for k, v in variants.items() if v[1]},
                           "prefill_us_per_frame": {}, "us_per_frame": {k: [] for k in variants},
                           "load_avg_1min": [], "template_bytes_per_frame": {}}
    with tempfile.TemporaryDirectory(prefix="taskcodec-pagesize-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        for k, (name, (p, sql)) in enumerate(variants.items()):
            _new_file(tmp / f"t{k}.db", p)
            st = st_mod.SQLiteStorage(tmp / f"t{k}.db", auto_compact=False)
            assert st._writer.execute("PRAGMA page_size").fetchone()[0] == p
            if sql:
                st._writer.execute(sql)
            for c in range(cameras):
                st.add_camera(f"cam-{c:06d}", "h")
            rng = np.random.default_rng(1)
            cpu = 0.0
            for rows in _seconds_of_frames(cameras, 0, prefill_s, start_ms, epochs, rng):
                t = time.process_time()
                st.store_frames(rows)
                cpu += time.process_time() - t
            st.checkpoint("TRUNCATE")
            st.close()
            res["prefill_us_per_frame"][name] = 1e6 * cpu / (cameras * prefill_s)
            sz = _sizes(tmp / f"t{k}.db")
            res["template_bytes_per_frame"][name] = sz["file"] / (cameras * prefill_s)
            log(f"template {name}: prefill {res['prefill_us_per_frame'][name]:.1f} µs CPU/frame, "
                f"{res['template_bytes_per_frame'][name]:.1f} B/frame (rows)")
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order.reverse()
            for name in order:
                p = variants[name][0]
                db = tmp / "r.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                shutil.copyfile(tmp / f"t{names.index(name)}.db", db)
                os.chmod(db, 0o600)
                st = st_mod.SQLiteStorage(db, auto_compact=False)
                _store_as_server(st, warm, per_commit, st_mod.BatchRows)
                t_wall, io0 = time.perf_counter(), _io()
                cpu = _store_as_server(st, timed, per_commit, st_mod.BatchRows)
                wall = time.perf_counter() - t_wall
                io1 = _io()
                res.setdefault("write_calls_per_frame", {}).setdefault(name, []).append(
                    (io1["syscw"] - io0["syscw"]) / len(timed))
                res.setdefault("write_bytes_per_frame", {}).setdefault(name, []).append(
                    (io1["wchar"] - io0["wchar"]) / len(timed))
                if r == rounds - 1:
                    res.setdefault("queries_rows", {})[name] = _sqlite_queries(st, cameras, end_ms)
                    t = time.process_time()
                    c = st.compact(settle_s=0, align_hour=False)
                    res.setdefault("compact_us_per_frame", {})[name] = (1e6 * (time.process_time() - t)
                                                                          / max(c["frames"], 1))
                    res.setdefault("queries_packed", {})[name] = _sqlite_queries(st, cameras, end_ms)
                st.close()
                res["us_per_frame"][name].append(1e6 * cpu / len(timed))
                res["load_avg_1min"].append(os.getloadavg()[0])
                log(f"round {r}: {name}: {res['us_per_frame'][name][-1]:.1f} µs CPU/frame ({wall:.1f} s wall, "
                    f"load {os.getloadavg()[0]:.1f}), {res['write_calls_per_frame'][name][-1]:.1f} write calls, "
                    f"{res['write_bytes_per_frame'][name][-1]:.0f} B written per frame")
                if r == rounds - 1:
                    n = cameras * (prefill_s + WARMUP_S + seconds)
                    sz = _sizes(db)
                    conn = sqlite3.connect(db)
                    conn.execute("VACUUM")
                    vac = conn.execute("PRAGMA page_count").fetchone()[0] * p
                    conn.close()
                    res.setdefault("packed_bytes_per_frame", {})[name] = {
                        "file": sz["file"] / n, "in_use": sz["in_use"] / n, "vacuumed": vac / n}
    res["median_us_per_frame"] = {k: float(np.median(v)) for k, v in res["us_per_frame"].items()}
    base = np.array(res["us_per_frame"][base_name])
    res["base"] = base_name
    res["median_difference_vs_base"] = {k: float(np.median(np.array(v) - base)) for k, v in res["us_per_frame"].items()}
    res["layouts"] = layouts
    stem = out / ("sqlite_layout" if layouts else "sqlite_page_size")
    write_json(stem.with_suffix(".json"), res)
    write_text(stem.with_suffix(".md"), markdown(res))
    return res


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def markdown(res: dict[str, Any]) -> str:
    ps = list(res["page_sizes"])  # the variants (page sizes, or layouts with --layouts)
    base = res.get("base", ps[0])
    diff = res.get("median_difference_vs_base") or res["median_difference_vs_4096"]
    q_names = list(res["queries_rows"][ps[0]])
    qs = [p for p in ps if p in res["queries_rows"]]
    layouts = res.get("layouts", False)
    what = "layout" if layouts else "page size"
    lines = [
        ("# Embedded store layout vs its steady-state write CPU (issue 12 item 5)\n" if layouts else
         "# SQLite page size vs the embedded store's steady-state write CPU (issue 12 item 5)\n"),
        f"{machine_line(res['machine'])}; {res['time']}; load average {min(res['load_avg_1min']):.1f}–"
        f"{max(res['load_avg_1min']):.1f} (shared 2-core box).\n",
        f"`flock /tmp/bench.lock nice -n 5 python3 -m taskcodec.bench.sqlite_page_size bench/results "
        f"{res['cameras']} {res['frames_per_commit']} {res['seconds']} {res['prefill_s']} {res['rounds']}"
        f"{' --layouts' if layouts else ''}`: per {what} "
        f"one store (a new file created with PRAGMA page_size=N, then SQLiteStorage) with {res['prefill_s']} s "
        f"of rows of each of "
        f"{res['cameras']} one-fps cameras; {res['rounds']} interleaved rounds (order rotated): a copy of it opened, "
        f"{res['warmup_s']} s of frames untimed, then {res['seconds']} s of frames through store_batches (tokens "
        f"checked, one-frame batches, {res['frames_per_commit']} per durable commit, synchronous=FULL); process CPU "
        f"per frame, checkpoints included (wal_autocheckpoint is in pages: the same pages per checkpoint at every "
        f"page size).\n",
        *([f"Layouts (SQL run on the new store before its prefill): "
           + "; ".join(f"{k}: `{v}`" for k, v in res["variant_sql"].items()) + ".\n"] if layouts else []),
        f"| {what} | µs CPU/frame per round | median | median difference vs {base} (per round) | write calls / frame "
        "| bytes written / frame (WAL + checkpoint) | prefill store_frames µs/frame |",
        "|---|---|---|---|---|---|---|"]
    for p in ps:
        lines.append(f"| {p} | {', '.join(f'{x:.1f}' for x in res['us_per_frame'][p])} | "
                     f"**{res['median_us_per_frame'][p]:.1f}** | {diff[p]:+.1f} | "
                     f"{np.median(res['write_calls_per_frame'][p]):.1f} | "
                     f"{np.median(res['write_bytes_per_frame'][p]):.0f} | {_num(res['prefill_us_per_frame'].get(p))} |")
    lines += ["", "Bytes on disk per frame (all frames of the store: prefill + warm-up + timed):", "",
              f"| {what} | rows (template, before compaction) | packed: file | packed: in use | packed: after VACUUM "
              "| compaction µs CPU/frame |", "|---|---|---|---|---|---|"]
    for p in [p for p in ps if p in res["packed_bytes_per_frame"]]:
        b = res["packed_bytes_per_frame"][p]
        lines.append(f"| {p} | {res['template_bytes_per_frame'][p]:.1f} | {b['file']:.1f} | {b['in_use']:.1f} | "
                     f"{b['vacuumed']:.1f} | {res['compact_us_per_frame'][p]:.1f} |")
    lines += ["", "Read queries (storage_size._sqlite_queries, median of 7, ms; rows = before compaction, packed = "
              "after), one run each, last round's store:", "",
              "| query | " + " | ".join(f"{p} rows" for p in qs) + " | " + " | ".join(f"{p} packed" for p in qs)
              + " |", "|---" * (1 + 2 * len(qs)) + "|"]
    for q in q_names:
        lines.append(f"| {q} | " + " | ".join(f"{res['queries_rows'][p][q]['median_ms']:.2f}" for p in qs) + " | "
                     + " | ".join(f"{res['queries_packed'][p][q]['median_ms']:.2f}" for p in qs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--layouts"]
    if not args:
        sys.exit(__doc__)
    run(Path(args[0]), *[int(x) for x in args[1:]], layouts="--layouts" in sys.argv)
