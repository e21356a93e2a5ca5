"""`taskcodec bench serve-load`: the embedded server (`taskcodec serve`, a real subprocess with its SQLite file) under
many simulated one-fps cameras, one frame per message, with the cluster bench's load generator (real range-coded
payloads, the wire protocol over WebSockets, one BATCH of one frame per second per camera, waiting for its ACK).

Server CPU per frame = the server process's user + system CPU-seconds (psutil, read from the kernel) over the measured
window divided by the frames it stored in that window (max(rowid) before/after), so the load generator's CPU is not
counted. ``--profile`` also records the server with py-spy (``py-spy record -f raw``) during the window and writes
the collapsed stacks plus a per-function summary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from taskcodec.bench.cluster import _cpu_seconds, _fast_load_process, _load_process, real_payloads
from taskcodec.bench.ab import abba
from taskcodec.bundle import load_bundle
from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text


def _register(db: Path, n: int, pythonpath: str | None = None) -> list[tuple[str, bytes]]:
    """Register n cameras (and the optional prefill) in a new database file. ``pythonpath``: with the storage code
    of that source tree (in a subprocess), so that the file has the schema the server of that tree expects."""
    cams = [(f"sim-{i:06d}", os.urandom(16).hex().encode()) for i in range(n)]
    if pythonpath:
        import inspect
        import json
        import sys

        code = (inspect.getsource(_fill) + "\nimport json, sys\nfrom pathlib import Path\n"
                "cams = [(c, t.encode()) for c, t in json.load(sys.stdin)]\n_fill(Path(sys.argv[1]), cams)\n")
        subprocess.run([sys.executable, "-c", code, str(db)], input=json.dumps([(c, t.decode()) for c, t in cams]),
                       text=True, check=True, env=dict(os.environ, PYTHONPATH=pythonpath), cwd=tempfile.gettempdir())
    else:
        _fill(db, cams)
    return cams


def _fill(db, cams) -> None:
    import os
    import time

    import numpy as np

    from taskcodec.server.auth import hash_token
    from taskcodec.server.storage import SQLiteStorage

    storage = SQLiteStorage(db)
    try:
        w = storage._writer
        w.execute("BEGIN")
        w.executemany("INSERT INTO cameras (id, token_hash, created) VALUES (?, ?, 0)",
                      [(c, hash_token(t)) for c, t in cams])
        w.execute("COMMIT")
        # TASKCODEC_SERVE_LOAD_PREFILL_S=S: S seconds of earlier frames of every camera already stored as rows (a
        # server in its steady state holds up to ~70 minutes of them before compaction packs them), so each new
        # frame lands in its camera's own index leaves, not in leaves shared with other cameras as in a fresh file.
        # Stored "now", so that the server's first compaction (10 minutes of settle time) leaves them alone.
        prefill = int(os.environ.get("TASKCODEC_SERVE_LOAD_PREFILL_S", "0"))
        if prefill:
            rng = np.random.default_rng(0)
            now = int(time.time() * 1000)
            for s0 in range(0, prefill, 60):
                w.execute("BEGIN")
                w.executemany(storage._INSERT, [
                    (c, 1, s, now - (prefill - s) * 1000, now, "prefill", rng.bytes(6), int(s % 10), 0.5)
                    for s in range(s0, min(prefill, s0 + 60)) for c, _ in cams])
                w.execute("COMMIT")
            w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        storage.close()


def _pin(server_pid: int, load_pids: list[int]) -> str | None:
    """TASKCODEC_SERVE_LOAD_PIN=1: the server (every thread) on the last CPU, the load generator on the others, so
    the server's CPU per frame is not inflated by sharing a CPU (and its caches) with the load generator."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    server, rest = {cpus[-1]}, set(cpus[:-1])
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), server)
    for pid in load_pids:
        os.sched_setaffinity(pid, rest)
    return f"server on CPU {cpus[-1]}, load generator on CPUs {sorted(rest)}"


def _max_rowid(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT coalesce(max(rowid), 0) FROM frames").fetchone()[0]
    finally:
        conn.close()


def _threads(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU-seconds per thread id (the event loop runs in the main thread, whose id is the pid)."""
    import psutil

    return {t.id: (t.user_time, t.system_time) for t in psutil.Process(pid).threads()}


def _ctx_switches(pid: int) -> dict[int, int]:
    """Voluntary + involuntary context switches so far per thread id (/proc/PID/task/TID/status): how often each
    thread went to sleep and was woken (or was preempted)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        out[int(task.name)] = sum(int(line.split()[1]) for line in text.splitlines()
                                  if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return out


def _thread_names(pid: int) -> dict[int, str]:
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:
            pass
    return names


def _thread_split(pid: int, th0: dict, th1: dict, frames: int, names: dict[int, str]) -> dict[str, float]:
    """µs per frame of the event-loop thread and of all other threads, user and system (kernel) time apart."""
    out = {}
    for what, ids in (("event_loop", [pid]), ("other_threads", [t for t in th1 if t != pid])):
        for i, mode in enumerate(("user", "sys")):
            out[f"{what}_{mode}_us_per_frame"] = 1e6 * sum(th1[t][i] - th0.get(t, (0.0, 0.0))[i]
                                                           for t in ids) / max(frames, 1)
    by_name: Counter = Counter()
    for t in th1:
        if t != pid:
            name = names.get(t, "?").rstrip("0123456789_")
            by_name[name] += 1e6 * sum(th1[t][i] - th0.get(t, (0.0, 0.0))[i] for i in (0, 1)) / max(frames, 1)
    out["other_threads_by_name_us_per_frame"] = {k: round(v, 1) for k, v in by_name.most_common()}
    return out


_COUNTERS = ("taskcodec_server_microbatch_frames_sum", "taskcodec_server_microbatch_frames_count",
             "taskcodec_server_process_cpu_seconds_total", "taskcodec_server_store_cpu_seconds_total")


def _microbatches(server) -> tuple[float, ...]:
    """(frames, micro-batches, ingest-thread CPU in process(), of which in the storage write) so far, from the
    server's /metrics."""
    import urllib.request

    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {server.operator_key}"})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    got = {}
    for line in text.splitlines():
        for k in _COUNTERS:
            if line.startswith(k + " "):
                got[k] = float(line.split()[1])
    return tuple(got.get(k, 0.0) for k in _COUNTERS)


def _summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks (``-f raw``)."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        if frames[0].startswith(("thread", "process")):  # --threads: the stack starts with its thread
            threads[frames[0]] += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {"samples": total, "threads": [(t, round(100 * n / max(total, 1), 1)) for t, n in threads.most_common(8)],
            "self": [(f, round(100 * n / max(total, 1), 1)) for f, n in self_c.most_common(top)],
            "inclusive": [(f, round(100 * n / max(total, 1), 1)) for f, n in incl.most_common(top)]}


def run_one(bundle, payloads, cameras: int, seconds: float, load_procs: int, server_args: list[str],
            profile: Path | None, log=print, pythonpath: str | None = None) -> dict[str, Any]:
    from taskcodec.server.process import LocalServer

    with tempfile.TemporaryDirectory(prefix="taskcodec-serveload-") as tmp:
        db = Path(tmp) / "server.db"
        # A/B against another checkout: TASKCODEC_SERVE_LOAD_PYTHONPATH=/path/to/checkout runs *its* server code
        other = pythonpath or os.environ.get("TASKCODEC_SERVE_LOAD_PYTHONPATH")
        cams = _register(db, cameras, other)
        # every simulated camera connects from 127.0.0.1: lift the per-address cap on unauthenticated connections
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(f"limits: {{max_pending_per_address: {cameras + 16}, max_pending: {cameras + 16}, "
                       f"max_connections: {max(10000, cameras + 256)}}}\n")
        with LocalServer(bundle.path, db, "--config", str(cfg), "--log-level", "warning", *server_args,
                         env={"PYTHONPATH": other} if other else None) as server:
            if other:
                log(f"server code from {other}")
            pid = server.proc.pid
            url = server.url.replace("http://", "ws://") + "/v1/stream"
            t0 = time.time() + 8.0 + cameras / 1000.0
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            client = os.environ.get("TASKCODEC_SERVE_LOAD_CLIENT", "websockets")
            target = _fast_load_process if client == "picows" else _load_process
            procs = [ctx.Process(target=target, args=(url, cams[p::load_procs], bundle.model_tag, payloads,
                                                             t0, seconds, q)) for p in range(load_procs)]
            for p in procs:
                p.start()
            pinned = _pin(pid, [p.pid for p in procs]) if os.environ.get("TASKCODEC_SERVE_LOAD_PIN") else None
            if pinned:
                log(f"pinned: {pinned}")
            time.sleep(max(0.0, t0 - time.time()) + 2.0)  # +2 s: every camera has sent its first frame
            window = max(5.0, seconds - 4.0)
            spy = None
            if profile is not None:
                # every thread that is running (not only the GIL holder), each stack under its thread's name
                spy = subprocess.Popen(["py-spy", "record", "-f", "raw", "--threads", "-r", "200", "-d", str(int(window)),
                                        "-o", str(profile), "-p", str(pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mb0 = _microbatches(server)
            rows0, cpu0, th0, w0 = _max_rowid(db), _cpu_seconds([pid]), _threads(pid), time.time()
            cs0 = _ctx_switches(pid)
            time.sleep(window)
            rows1, cpu1, th1, w1 = _max_rowid(db), _cpu_seconds([pid]), _threads(pid), time.time()
            cs1 = _ctx_switches(pid)
            names = _thread_names(pid)
            mb1 = _microbatches(server)
            results = [q.get(timeout=seconds + 300) for _ in procs]
            for p in procs:
                p.join(timeout=60)
            if spy is not None:
                spy.wait(timeout=120)
            db_bytes = sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if os.path.exists(p))
            stored = _max_rowid(db)
    frames = rows1 - rows0
    cpu = cpu1 - cpu0
    split = _thread_split(pid, th0, th1, frames, names)
    loop_cpu = sum(th1.get(pid, (0.0, 0.0))) - sum(th0.get(pid, (0.0, 0.0)))
    mb = tuple(b - a for a, b in zip(mb0, mb1))
    ack_ms = np.array([x for r in results for x in r["ack_ms"]] or [np.nan])
    row = {"cameras": cameras, "load_generator": client,
           "server_args": " ".join(server_args) + (" (pinned)" if pinned else ""), "seconds": round(w1 - w0, 1),
           "frames_per_s": frames / (w1 - w0), "server_cpu_s": cpu, "cpu_us_per_frame": 1e6 * cpu / max(frames, 1),
           "server_cpu_share": cpu / (w1 - w0),
           "event_loop_us_per_frame": 1e6 * loop_cpu / max(frames, 1),
           "other_threads_us_per_frame": 1e6 * (cpu - loop_cpu) / max(frames, 1), **split,
           "event_loop_switches_per_frame": (cs1.get(pid, 0) - cs0.get(pid, 0)) / max(frames, 1),
           "other_threads_switches_per_frame": sum(cs1[t] - cs0.get(t, 0) for t in cs1 if t != pid) / max(frames, 1),
           "process_cpu_us_per_frame": 1e6 * mb[2] / max(mb[0], 1),
           "store_cpu_us_per_frame": 1e6 * mb[3] / max(mb[0], 1),
           "microbatches_per_s": mb[1] / (w1 - w0), "frames_per_microbatch": mb[0] / max(mb[1], 1), "acked": sum(r["acked"] for r in results), "stored": stored,
           "errors": sum(r["errors"] for r in results),
           "first_error": next((r["first_error"] for r in results if r.get("first_error")), None),
           "ack_p50_ms": float(np.nanpercentile(ack_ms, 50)), "ack_p99_ms": float(np.nanpercentile(ack_ms, 99)),
           "db_bytes_per_frame": db_bytes / max(stored, 1), "load_avg_1min": os.getloadavg()[0]}
    if profile is not None and profile.exists():
        row["profile"] = {"file": str(profile), **_summarise_profile(profile)}
    log(f"serve {' '.join(server_args) or '(defaults)'}: {cameras} cameras, {row['frames_per_s']:.0f} frames/s, "
        f"{row['cpu_us_per_frame']:.0f} µs server CPU/frame, ack p99 {row['ack_p99_ms']:.0f} ms, "
        f"errors {row['errors']}, load {row['load_avg_1min']:.1f}")
    return row


def run(bundle_path: str | None, cameras: list[int], seconds: float, load_procs: int, out: Path,
        variants: list[str], profile: bool, name: str = "serve_load", log=print) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    payloads = real_payloads(bundle)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in cameras:
        for i, v in enumerate(variants):
            prof = out / f"{name}_profile_{n}_{i}.txt" if profile else None
            rows.append(run_one(bundle, payloads, n, seconds, load_procs, v.split(), prof, log))
    result = {"machine": machine_info(), "time": utc_now(), "bundle": bundle.model_id,
              "payload_bytes_mean": float(np.mean([len(p) for p in payloads])), "rows": rows,
              "note": "one `taskcodec serve` process (SQLite, synchronous=FULL) on this shared 2-core machine, with "
                      "the load generator and other people's jobs on the same cores; CPU = the server process only"}
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    cols = [("cameras", "1-fps cameras"), ("load_generator", "load generator"), ("server_args", "serve options"),
            ("frames_per_s", "frames/s"),
            ("cpu_us_per_frame", "server CPU µs/frame"), ("event_loop_us_per_frame", "event loop thread"),
            ("event_loop_user_us_per_frame", "of which user"), ("event_loop_sys_us_per_frame", "of which kernel"),
            ("other_threads_us_per_frame", "ingest + other threads"),
            ("other_threads_user_us_per_frame", "of which user"), ("other_threads_sys_us_per_frame", "of which kernel"),
            ("process_cpu_us_per_frame", "of which in process()"),
            ("store_cpu_us_per_frame", "of which in storage write"),
            ("frames_per_microbatch", "frames/micro-batch"),
            ("server_cpu_share", "server CPU (cores)"),
            ("ack_p50_ms", "ack p50 ms"), ("ack_p99_ms", "ack p99 ms"), ("errors", "errors"),
            ("load_avg_1min", "load avg")]
    text = (f"# Embedded server under one-fps cameras (one frame per message)\n\n{machine_line(result['machine'])}; "
            f"{result['time']}; bundle {result['bundle']}, mean payload {result['payload_bytes_mean']:.1f} B. "
            f"{result['note']}. Load generator: websockets = cluster._load_process (~200 µs of its own CPU per "
            f"frame), picows = _fast_load_process (a few µs); (pinned): the server on one CPU, the load generator on "
            f"the other (TASKCODEC_SERVE_LOAD_PIN=1).\n\n"
            + markdown_table(result["rows"], cols, {k: ".1f" if k.endswith("ms") or k == "load_avg_1min" else
                                                    "d" if k in ("cameras", "errors") else "s" if k in ("server_args", "load_generator")
                                                    else ".0f" if k == "frames_per_s"
                                                    else ".3g" for k, _ in cols}) + "\n")
    for r in result["rows"]:
        p = r.get("profile")
        if p:
            text += (f"\n## py-spy ({r['cameras']} cameras, {r['server_args'] or 'defaults'}): {p['samples']} samples,"
                     f" top self time\n\n| function | % |\n|---|---|\n"
                     + "\n".join(f"| `{f}` | {s} |" for f, s in p["self"][:15]) + "\n")
    return text


def ab(before: Path, cameras: int, seconds: float, rounds: int, load_procs: int, out: Path, name: str,
       log=print) -> dict[str, Any]:
    """Interleaved A/B of the server code: ``before`` (a source tree whose `taskcodec` the server subprocess imports,
    e.g. `git archive <commit>` plus the built coder extension; run from outside the repository, or the working
    directory's copy wins) against the installed code, A B / B A / ... rounds of `run_one` on the same box, so that
    the load other jobs put on the shared cores hits both alike; the per-round ratio is the figure to trust."""
    bundle = load_bundle(None)
    payloads = real_payloads(bundle)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    # TASKCODEC_SERVE_LOAD_AFTER=TREE: the "after" server code from that source tree too (e.g. the start commit plus
    # only the files of one change, when other people's edits in the working tree would mix into the comparison)
    after = os.environ.get("TASKCODEC_SERVE_LOAD_AFTER") or None
    for r in range(rounds):
        for which in abba(("before", "after"), r):
            row = run_one(bundle, payloads, cameras, seconds, load_procs, [], None, log,
                          pythonpath=str(before) if which == "before" else after)
            row["round"], row["code"] = r, which
            runs[which].append(row)
    ratios = [a["cpu_us_per_frame"] / b["cpu_us_per_frame"] for a, b in zip(runs["after"], runs["before"])]
    med = {k: {m: float(np.median([x[m] for x in v])) for m in (
        "cpu_us_per_frame", "event_loop_us_per_frame", "other_threads_us_per_frame", "process_cpu_us_per_frame",
        "store_cpu_us_per_frame", "frames_per_microbatch", "ack_p50_ms", "ack_p99_ms", "frames_per_s")}
        for k, v in runs.items()}
    result = {"machine": machine_info(), "time": utc_now(), "cameras": cameras, "seconds": seconds, "rounds": rounds,
              "before": str(before), "after": after or "the installed code (working tree)", "load_generator": os.environ.get("TASKCODEC_SERVE_LOAD_CLIENT", "websockets"),
              "pinned": bool(os.environ.get("TASKCODEC_SERVE_LOAD_PIN")),
              "prefill_s": int(os.environ.get("TASKCODEC_SERVE_LOAD_PREFILL_S", "0")), "runs": runs, "median": med,
              "ratio_after_to_before": ratios, "median_ratio": float(np.median(ratios))}
    write_json(out / f"{name}.json", result)
    cols = ("cpu_us_per_frame", "event_loop_us_per_frame", "other_threads_us_per_frame", "store_cpu_us_per_frame",
            "frames_per_microbatch", "ack_p99_ms", "load_avg_1min")
    lines = [f"# Embedded server CPU per frame: interleaved A/B ({cameras} one-fps cameras)\n",
             f"{machine_line(result['machine'])}; {result['time']}. {rounds} rounds (A B, B A, ...) of "
             f"`run_one` ({seconds:g} s each, one frame per message), load generator {result['load_generator']}"
             f"{', server pinned to one CPU and the load generator to the other' if result['pinned'] else ''}; "
             + (f"{result['prefill_s']} s of earlier frames per camera stored as rows before each run "
                "(TASKCODEC_SERVE_LOAD_PREFILL_S; a steady-state file, not a fresh one); " if result['prefill_s']
                else "a fresh database per run; ") +
             f"before = the server code of {before}, after = {result['after']}. Server CPU = the `taskcodec serve` "
             "process (user + system, psutil) over the frames it stored; load average = the box's 1-minute load "
             "at the end of each run (a shared 2-core box).\n",
             "| round | code | server µs/frame | event loop | ingest + other threads | of which storage write | "
             "frames/micro-batch | ack p99 ms | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in range(rounds):
        for which in ("before", "after"):
            x = runs[which][r]
            lines.append(f"| {r} | {which} | " + " | ".join(f"{x[c]:.1f}" for c in cols) + " |")
    lines += ["", "| code | median server µs/frame | event loop | ingest + other | storage write | frames/micro-batch | "
              "ack p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for k, m in med.items():
        lines.append(f"| {k} | {m['cpu_us_per_frame']:.1f} | {m['event_loop_us_per_frame']:.1f} | "
                     f"{m['other_threads_us_per_frame']:.1f} | {m['store_cpu_us_per_frame']:.1f} | "
                     f"{m['frames_per_microbatch']:.1f} | {m['ack_p50_ms']:.0f} / {m['ack_p99_ms']:.0f} |")
    lines += ["", f"Per-round ratio after / before: {', '.join(f'{x:.3f}' for x in ratios)}; median "
              f"**{result['median_ratio']:.3f}**.\n"]
    write_text(out / f"{name}.md", "\n".join(lines))
    log("\n".join(lines))
    return result


if __name__ == "__main__":  # python3 -m taskcodec.bench.serve_load ab BEFORE_TREE [CAMERAS] [ROUNDS] [SECONDS] [NAME]
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "ab":
        a = sys.argv[2:] + [None] * 5
        ab(Path(a[0]), int(a[1] or 1000), float(a[3] or 20), int(a[2] or 6), 2,
           Path(os.environ.get("TASKCODEC_SERVE_LOAD_OUT", "bench/results")).resolve(), a[4] or "serve_load_cpu_ab")
    else:
        sys.exit("usage: python3 -m taskcodec.bench.serve_load ab BEFORE_TREE [CAMERAS] [ROUNDS] [SECONDS] [NAME]")
