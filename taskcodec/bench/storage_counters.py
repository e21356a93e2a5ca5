"""The cost and the gain of the SQLite store's insert-time counters (issue 12 item 4; storage.py frame_rollup and
fleet_counts, updated in the insert's transaction).

``write-ab OLD_STORAGE.py OUT``: CPU per frame of the server's write path (SQLiteStorage.store_batches with the
camera tokens checked in the transaction, one-frame batches of distinct one-fps cameras, ``per_commit`` of them per
micro-batch as the server commits them at 1000 cameras), with this storage.py and with ``OLD_STORAGE.py`` (a copy
from before the counters), interleaved A B / B A on fresh databases that already hold ``prefill_s`` seconds of rows of
every camera (a running server's steady state between compactions).

``queries OUT BEFORE.json AFTER.json``: the side-by-side table of two `taskcodec bench storage-size
--queries-at-scale` runs (one from a tree before the counters, one after).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskcodec.bench.ab import abba, load_module_copy
from taskcodec.report import machine_info, machine_line, utc_now, write_json, write_text

MODEL_ID = "6f0d113794f9346d"


def _seconds_of_frames(cameras: int, s0: int, s1: int, start_ms: int, epochs: list[int], rng) -> list[list[tuple]]:
    """Seconds [s0, s1) of ``cameras`` one-fps cameras: one list of rows per second, cameras in order."""
    out = []
    for s in range(s0, s1):
        pay = rng.bytes(6 * cameras)
        pred = rng.integers(0, 10, cameras).tolist()
        conf = np.round(rng.random(cameras), 4).tolist()
        out.append([(f"cam-{c:06d}", epochs[c], s, start_ms + s * 1000 + (c * 997) % 1000,
                     start_ms + s * 1000 + (c * 997) % 1000 + 60, MODEL_ID, pay[6 * c:6 * c + 6], pred[c], conf[c])
                    for c in range(cameras)])
    return out


def _store_as_server(st, frames: list[tuple], per_commit: int, batch_rows) -> float:
    """Store ``frames`` as the server does under many one-fps cameras (one-frame batches of ``batch_rows``, the
    storage module's BatchRows, tokens checked, ``per_commit`` per durable transaction); process CPU seconds spent in
    store_batches."""
    cpu = 0.0
    for i in range(0, len(frames), per_commit):
        batches = [batch_rows(row[0], "h", [row]) for row in frames[i:i + per_commit]]
        t = time.process_time()
        st.store_batches(batches)
        cpu += time.process_time() - t
    return cpu


def write_ab(old_storage: Path, out: Path, cameras: int = 1000, per_commit: int = 57, seconds: int = 30,
             prefill_s: int = 300, rounds: int = 6, log=print) -> dict[str, Any]:
    from taskcodec.server import storage as new

    old = load_module_copy("taskcodec_storage_before_counters", old_storage)
    variants = {"before counters": old, "with counters": new}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    rng0 = np.random.default_rng(0)
    epochs = [int(x) for x in rng0.integers(0, 1 << 62, cameras, dtype=np.int64)]
    start_ms = int(time.time() * 1000) - (prefill_s + seconds) * 1000
    for r in range(rounds):
        for name, mod in abba(variants.items(), r):
            with tempfile.TemporaryDirectory(prefix="taskcodec-counters-ab-", dir=os.environ.get("TMPDIR")) as tmp:
                st = mod.SQLiteStorage(Path(tmp) / "w.db", auto_compact=False)
                for c in range(cameras):
                    st.add_camera(f"cam-{c:06d}", "h")
                rng = np.random.default_rng(1)
                for rows in _seconds_of_frames(cameras, 0, prefill_s, start_ms, epochs, rng):
                    st.store_frames(rows)
                frames = [row for rows in _seconds_of_frames(cameras, prefill_s, prefill_s + seconds, start_ms,
                                                             epochs, rng) for row in rows]
                t_wall = time.perf_counter()
                cpu = _store_as_server(st, frames, per_commit, mod.BatchRows)
                wall = time.perf_counter() - t_wall
                st.close()
            runs[name].append(1e6 * cpu / len(frames))
            log(f"round {r}: {name}: {runs[name][-1]:.1f} µs CPU/frame ({wall:.1f} s wall)")
    ratios = np.array(runs["with counters"]) - np.array(runs["before counters"])
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "frames_per_commit": per_commit,
              "seconds": seconds, "prefill_s": prefill_s, "rounds": rounds, "load_avg_1min": os.getloadavg()[0],
              "us_per_frame": runs, "median_us_per_frame": {k: float(np.median(v)) for k, v in runs.items()},
              "median_difference_us_per_frame": float(np.median(ratios)),
              "per_round_difference_us_per_frame": ratios.tolist()}
    stem = out / f"storage_counters_write_ab_{per_commit}"
    write_json(stem.with_suffix(".json"), result)
    med = result["median_us_per_frame"]
    write_text(stem.with_suffix(".md"), (
        f"# SQLite write path: CPU per frame before and with the insert-time counters ({per_commit} frames per "
        f"commit)\n\n{machine_line(result['machine'])}; {result['time']}; load average "
        f"{result['load_avg_1min']:.1f} (shared box). `python3 -m taskcodec.bench.storage_counters write-ab "
        f"OLD_STORAGE.py OUT {cameras} {per_commit} {seconds} {prefill_s} {rounds}` under /tmp/bench.lock: "
        f"SQLiteStorage.store_batches as the server calls it (camera tokens checked in the transaction), "
        f"{cameras} one-fps cameras, one-frame batches, {per_commit} per micro-batch (one durable commit each), "
        f"{seconds} s of frames timed (process CPU time of the calls) after {prefill_s} s of rows of every camera "
        f"stored untimed, {rounds} interleaved rounds (A B, B A, ...) on fresh databases; before = storage.py of "
        "the commit before the counters.\n\n"
        "| variant | median µs CPU/frame | runs |\n|---|---|---|\n"
        + "".join(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |\n" for k, v in runs.items())
        + f"\nMedian per-round difference (with - before): {result['median_difference_us_per_frame']:+.1f} µs per "
          f"frame (rounds: {', '.join(f'{x:+.1f}' for x in ratios)}).\n"))
    return result


def write_toggle(out: Path, cameras: int = 1000, per_commit: int = 57, seconds: int = 240, prefill_s: int = 120,
                 history_h: int = 0, log=print) -> dict[str, Any]:
    """The counters' CPU per frame on one store: store_batches micro-batches alternating, commit by commit, between
    no counter statements, all of them, the fleet ones only and the per-camera one only (the counters end up wrong:
    a cost measurement only), so that every variant sees the same file, cache and load. ``history_h``: counter rows
    of that many earlier hours (10 classes per camera-hour, and the fleet's minutes and hours) written first, as a
    store that has run that long holds them (their frames are not stored: the counters' pages are what matters)."""
    from taskcodec.server import storage as st_mod

    sqls = list(st_mod._COUNT_ROWS_SQL)
    variants = {"none": [], "all (this storage.py)": sqls, "fleet only (minute + hour)": sqls[1:],
                "per camera only": sqls[:1]}
    rng = np.random.default_rng(0)
    epochs = [int(x) for x in rng.integers(0, 1 << 62, cameras, dtype=np.int64)]
    start_ms = int(time.time() * 1000) - (prefill_s + seconds) * 1000
    per: dict[str, list[float]] = {k: [] for k in variants}
    try:
        with tempfile.TemporaryDirectory(prefix="taskcodec-counters-toggle-", dir=os.environ.get("TMPDIR")) as tmp:
            st = st_mod.SQLiteStorage(Path(tmp) / "t.db", auto_compact=False)
            for c in range(cameras):
                st.add_camera(f"cam-{c:06d}", "h")
            h0 = start_ms // 3_600_000
            with st._transaction() as w:
                w.executemany("INSERT INTO frame_rollup (camera_id, hour, prediction, model_id, frames, payload_bytes, "
                              "ts_min, ts_max) VALUES (?, ?, ?, ?, 360, 2160, ?, ?)",
                              [(f"cam-{c:06d}", h, p, MODEL_ID, h * 3_600_000, h * 3_600_000 + 3_599_999)
                               for h in range(h0 - history_h, h0) for c in range(cameras) for p in range(10)])
                w.executemany("INSERT INTO fleet_counts VALUES (?, ?, ?, ?, 6000, 36000, ?, ?)",
                              [(unit, cell, p, MODEL_ID, cell * unit, cell * unit + unit - 1)
                               for unit, per_h in ((60_000, 60), (3_600_000, 1))
                               for cell in range((h0 - history_h) * per_h, h0 * per_h) for p in range(10)])
            for rows in _seconds_of_frames(cameras, 0, prefill_s, start_ms, epochs, rng):
                st.store_frames(rows)
            frames = [r for rows in _seconds_of_frames(cameras, prefill_s, prefill_s + seconds, start_ms, epochs,
                                                        rng) for r in rows]
            names = list(variants)
            for j, i in enumerate(range(0, len(frames), per_commit)):
                name = names[j % len(names)]
                st_mod._COUNT_ROWS_SQL[:] = variants[name]
                batches = [st_mod.BatchRows(r[0], "h", [r]) for r in frames[i:i + per_commit]]
                t = time.process_time()
                st.store_batches(batches)
                per[name].append(1e6 * (time.process_time() - t) / len(batches))
            sql = st._reader().execute("SELECT sql FROM sqlite_master WHERE name = 'frame_rollup'").fetchone()[0]
            rollup_key = sql.split("PRIMARY KEY")[-1].split(")")[0].strip(" (")
            st.close()
    finally:
        st_mod._COUNT_ROWS_SQL[:] = sqls
    med = {k: float(np.median(v)) for k, v in per.items()}
    mean = {k: float(np.mean(v)) for k, v in per.items()}
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "frames_per_commit": per_commit,
              "seconds": seconds, "prefill_s": prefill_s, "history_h": history_h,
              "rollup_key": rollup_key,
              "load_avg_1min": os.getloadavg()[0],
              "median_us_per_frame": med, "mean_us_per_frame": mean, "commits_per_variant": len(per["none"])}
    stem = out / (f"storage_counters_write_toggle_{per_commit}" + (f"_{history_h}h" if history_h else ""))
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".md"), (
        f"# SQLite write path: the counters' CPU per frame, commit by commit ({per_commit} frames per commit)\n\n"
        f"{machine_line(result['machine'])}; {result['time']}; load average {result['load_avg_1min']:.1f}. "
        f"`python3 -m taskcodec.bench.storage_counters write-toggle OUT {cameras} {per_commit} {seconds} "
        f"{prefill_s} {history_h}` under /tmp/bench.lock: one store ({history_h} earlier hours of counter rows, "
        f"frame_rollup keyed ({result['rollup_key']}); {prefill_s} s of rows of {cameras} one-fps cameras "
        f"stored first), then {seconds} s of frames through store_batches (tokens checked, one-frame batches, "
        f"{per_commit} per durable commit), the counter statements switched commit by commit between the four "
        f"variants below ({result['commits_per_variant']} commits each); process CPU time of each call.\n\n"
        "| counter statements | median µs CPU/frame | mean (checkpoints included) | median - none |\n"
        "|---|---|---|---|\n"
        + "".join(f"| {k} | {med[k]:.1f} | {mean[k]:.1f} | {med[k] - med['none']:+.1f} |\n" for k in variants)))
    log(", ".join(f"{k}: {med[k]:.1f}" for k in variants))
    return result


def queries(out: Path, before_json: Path, after_json: Path) -> dict[str, Any]:
    """One table of the SQLite query latencies of two --queries-at-scale runs, stage by stage."""
    before = json.loads(before_json.read_text())["sqlite"]
    after = json.loads(after_json.read_text())["sqlite"]
    result = {"machine": machine_info(), "time": utc_now(), "before": before, "after": after,
              "before_file": str(before_json), "after_file": str(after_json)}
    write_json(out / "storage_counters_queries.json", result)
    lines = []
    for sb, sa in zip(before["stages"], after["stages"]):
        lines.append(f"\n### {sa['stage']} ({sa['packed']:,} packed, {sa['rows']:,} rows; B/frame in use "
                     f"{sb['bytes_per_frame_in_use']:.1f} before, {sa['bytes_per_frame_in_use']:.1f} after)\n\n"
                     "| query | before median ms (max) | after median ms (max) |\n|---|---|---|\n")
        for name, qb in sb["queries"].items():
            qa = sa["queries"][name]
            lines.append(f"| {name} | {qb['median_ms']:.2f} ({qb['max_ms']:.1f}) | **{qa['median_ms']:.2f}** "
                         f"({qa['max_ms']:.1f}) |\n")
    write_text(out / "storage_counters_queries.md", (
        f"# Query latencies before and after the insert-time counters ({after['frames']:,} frames, "
        f"{after['cameras']} one-fps cameras)\n\n{machine_line(result['machine'])}; {result['time']}. Both runs: "
        f"`taskcodec bench storage-size --queries-at-scale --frames {after['frames']} --cameras {after['cameras']} "
        "--out DIR`, run from `git archive` trees of the commit before the counters and of the one with them, "
        "at the same time (fills at nice 10; each stage's queries timed at nice 0 under /tmp/bench.lock, so the "
        "two runs' timings never overlapped). Fill CPU µs/frame (store_frames, 60 s of all cameras per "
        f"transaction): before {before['fill_cpu_us_per_frame']:.1f}, after {after['fill_cpu_us_per_frame']:.1f}; "
        f"compaction CPU µs/frame: before {before['compaction_cpu_us_per_frame']:.1f}, after "
        f"{after['compaction_cpu_us_per_frame']:.1f}. Method of each run and the query definitions: "
        "storage_size_10m/storage_size_queries.md.\n" + "".join(lines)))
    return result


def reads_ab(old_storage: Path, out: Path, cameras: int = 1000, seconds: int = 5400, rounds: int = 7,
             log=print) -> dict[str, Any]:
    """The readers that did not change their answer's source (one camera's counts and listings, pages across all
    cameras) timed with this storage.py and with ``OLD_STORAGE.py`` on one store (filled by this one's store_frames,
    the closed hours compacted, the rest rows), interleaved; same answers checked."""
    from taskcodec.bench.storage_size import _bench_lock, _fill_by_hour, _scale_plan
    from taskcodec.server import storage as new

    old = load_module_copy("taskcodec_storage_before_counters", old_storage)
    plan = _scale_plan(seconds * cameras, cameras)
    end = plan["start_ms"] + plan["seconds"] * 1000
    cam = f"cam-{cameras // 2:06d}"
    runs: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="taskcodec-counters-reads-", dir=os.environ.get("TMPDIR")) as tmp:
        st = new.SQLiteStorage(Path(tmp) / "r.db", auto_compact=False)
        _fill_by_hour(plan, 60, st.store_frames, lambda hour_end, _w, _d: st.compact(now=hour_end + 600_000))
        rows = st._reader().execute("SELECT count(*) FROM frames").fetchone()[0]
        log(f"store: {plan['n_total']:,} frames, {rows:,} rows")
        page = new.select_frames(st._reader(), new.FrameFilter(since=end - 1_200_000), limit=100)
        after = (page[-1][3], page[-1][0], page[-1][1], page[-1][2])
        queries = {
            "one camera, per-minute class counts, last hour (dashboard chart)": lambda m, c: m.count_frames(
                c, m.FrameFilter(cameras=(cam,), since=end - 3_600_000, until=end), 60_000, with_bytes=True),
            "newest 100 frames of one camera (dashboard camera page)": lambda m, c: m.select_frames(
                c, m.FrameFilter(cameras=(cam,)), order="desc", limit=100),
            "one camera, 10-minute range": lambda m, c: m.select_frames(
                c, m.FrameFilter(cameras=(cam,), since=end - 5_400_000, until=end - 4_800_000), limit=1000),
            "all cameras, page of 100 from 20 min ago": lambda m, c: m.select_frames(
                c, m.FrameFilter(since=end - 1_200_000), limit=100),
            "all cameras, next page (cursor)": lambda m, c: m.select_frames(
                c, m.FrameFilter(since=end - 1_200_000), after=after, limit=100),
            "all cameras, page of 100 from 100 min ago (a packed hour)": lambda m, c: m.select_frames(
                c, m.FrameFilter(since=end - 6_000_000), limit=100),
            "all cameras, newest 100 (order=desc)": lambda m, c: m.select_frames(
                c, m.FrameFilter(), order="desc", limit=100),
            "one class, all cameras, newest 100": lambda m, c: m.select_frames(
                c, m.FrameFilter(predictions=(3,)), order="desc", limit=100),
        }
        conn = st._reader()
        with _bench_lock():
            for name, fn in queries.items():
                runs[name] = {"before": [], "after": []}
                for r in range(rounds):
                    answers = {}
                    for label, mod in abba((("before", old), ("after", new)), r):
                        t = time.perf_counter()
                        answers[label] = fn(mod, conn)
                        runs[name][label].append(1000 * (time.perf_counter() - t))
                    assert answers["before"] == answers["after"], name
                log(f"{name}: {np.median(runs[name]['before']):.2f} -> {np.median(runs[name]['after']):.2f} ms")
        st.close()
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "seconds": seconds, "rows": rows,
              "rounds": rounds, "load_avg_1min": os.getloadavg()[0], "ms": runs}
    write_json(out / "storage_counters_reads_ab.json", result)
    write_text(out / "storage_counters_reads_ab.md", (
        f"# Readers before and after on one store ({plan['n_total']:,} frames of {cameras} one-fps cameras, "
        f"{rows:,} of them rows)\n\n{machine_line(result['machine'])}; {result['time']}; load average "
        f"{result['load_avg_1min']:.1f}. `python3 -m taskcodec.bench.storage_counters reads-ab OLD_STORAGE.py OUT "
        f"{cameras} {seconds} {rounds}`: one store filled by store_frames and compacted after its closed hour as "
        "the server does, then the storage reader functions of the storage.py before the counters and of this "
        f"one on the same read connection, interleaved (A B, B A, ...), {rounds} runs each, timed at nice 0 "
        "under /tmp/bench.lock; the two give the same answers (checked). Counts that now come from the counters "
        "are not here (the old reader would count the rows twice on the new schema): see "
        "storage_counters_queries.md.\n\n| query | before median ms | after median ms |\n|---|---|---|\n"
        + "".join(f"| {k} | {np.median(v['before']):.2f} | **{np.median(v['after']):.2f}** |\n"
                  for k, v in runs.items())))
    return result


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "write-ab":
        a = [int(x) for x in sys.argv[4:]]
        write_ab(Path(sys.argv[2]), Path(sys.argv[3]), *a)
    elif len(sys.argv) >= 3 and sys.argv[1] == "write-toggle":
        write_toggle(Path(sys.argv[2]), *[int(x) for x in sys.argv[3:]])
    elif len(sys.argv) >= 4 and sys.argv[1] == "reads-ab":
        reads_ab(Path(sys.argv[2]), Path(sys.argv[3]), *[int(x) for x in sys.argv[4:]])
    elif len(sys.argv) == 5 and sys.argv[1] == "queries":
        queries(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit("usage: python3 -m taskcodec.bench.storage_counters write-ab OLD_STORAGE.py OUT [CAMERAS "
                 "PER_COMMIT SECONDS PREFILL_S ROUNDS]\n"
                 "       python3 -m taskcodec.bench.storage_counters write-toggle OUT [CAMERAS PER_COMMIT SECONDS "
                 "PREFILL_S HISTORY_H]\n"
                 "       python3 -m taskcodec.bench.storage_counters reads-ab OLD_STORAGE.py OUT [CAMERAS SECONDS "
                 "ROUNDS]\n"
                 "       python3 -m taskcodec.bench.storage_counters queries OUT BEFORE.json AFTER.json")
