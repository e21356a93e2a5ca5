"""`taskcodec bench cluster`: throughput and server-side CPU of the scale-out mode (gateways + workers + JetStream +
PostgreSQL on this machine) under many simulated one-fps cameras, one frame per message.

The load generator speaks the wire protocol with real range-coded payloads of the bundle, from separate processes
(one asyncio loop each, many WebSocket connections per loop); each camera sends one BATCH of one frame per second and
waits for its ACK, as a one-fps camera with batching off would. Server-side CPU is read from the kernel (user +
system seconds of every gateway, worker, nats-server and PostgreSQL process) over the measured window, so the load
generator's own CPU is not counted. Capture→stored latency comes from PostgreSQL (stored time minus capture time).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskcodec import wire
from taskcodec.bundle import Bundle, load_bundle
from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text


def real_payloads(bundle: Bundle, n: int = 64) -> list[bytes]:
    """Payloads the bundle's own encoder and coder produced from Fashion-MNIST-like frames of the virtual camera."""
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source

    spec = bundle.input
    source = open_source(f"virtual://fashion-mnist?size={spec.width}x{spec.height}&count={n}")
    pre, enc = Preprocessor(spec), FrameEncoder(bundle)
    try:
        frames = np.concatenate([pre(f.image).reshape(1, spec.height, spec.width, spec.channels) for f in source])
    finally:
        source.close()
    return enc.encode(frames)


async def _camera(url: str, cam: str, token: bytes, tag: bytes, payloads: list[bytes], t0: float, seconds: float,
                  stats: dict[str, Any]) -> None:
    import websockets

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 - time.time() - 5.0) + random.random() * 3.0)  # spread the connects
    async with websockets.connect(url, max_size=None, open_timeout=60, ping_interval=None) as ws:
        await ws.send(wire.Hello(tag, cam, token).encode())
        reply = wire.decode(await ws.recv())
        if not isinstance(reply, wire.Welcome):
            stats["refused"] += 1
            return
        epoch = random.getrandbits(62)
        seq = 0
        due = t0 + random.random()
        while due < t0 + seconds:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            ts = int(time.time() * 1000)
            await ws.send(wire.Batch(epoch, [wire.Frame(seq, ts, payloads[seq % len(payloads)])]).encode())
            reply = wire.decode(await ws.recv())
            if isinstance(reply, wire.Ack):
                stats["acked"] += 1
                stats["ack_ms"].append(time.time() * 1000 - ts)
            else:
                stats["other"] += 1
                return
            seq += 1
            due += 1.0
    del loop


def _load_process(url: str, cams: list[tuple[str, bytes]], tag: bytes, payloads: list[bytes], t0: float,
                  seconds: float, out: mp.Queue) -> None:
    stats: dict[str, Any] = {"acked": 0, "other": 0, "refused": 0, "errors": 0, "ack_ms": []}

    async def main():
        results = await asyncio.gather(*(_camera(url, c, t, tag, payloads, t0, seconds, stats) for c, t in cams),
                                       return_exceptions=True)
        stats["errors"] = sum(isinstance(r, BaseException) for r in results)
        stats["first_error"] = next((repr(r) for r in results if isinstance(r, BaseException)), None)

    asyncio.run(main())
    out.put(stats)


def _fast_load_process(url: str, cams: list[tuple[str, bytes]], tag: bytes, payloads: list[bytes], t0: float,
                       seconds: float, out) -> None:
    """The same cameras as cluster._load_process (one BATCH of one frame per second each, waiting for its ACK) on
    picows clients: a few µs of load-generator CPU per frame instead of ~200, so one CPU can drive 10 000 cameras
    (TASKCODEC_SERVE_LOAD_CLIENT=picows, bench serve-load and bench cluster)."""
    import asyncio
    import random

    import uvloop
    from picows import WSListener, WSMsgType, ws_connect

    from taskcodec import wire

    stats: dict[str, Any] = {"acked": 0, "other": 0, "refused": 0, "errors": 0, "ack_ms": [], "first_error": None}
    end = t0 + seconds

    class Camera(WSListener):
        def __init__(self, cam: str, token: bytes):
            super().__init__()
            self.cam, self.token = cam, token
            self.epoch, self.seq = random.getrandbits(62), 0
            loop = asyncio.get_running_loop()
            self.loop, self.welcomed, self.finished = loop, loop.create_future(), loop.create_future()
            self.t = None
            self.sent_ms = 0.0
            self.due = t0 + random.random()

        def on_ws_connected(self, transport) -> None:
            self.t = transport
            transport.send(WSMsgType.BINARY, wire.Hello(tag, self.cam, self.token).encode())

        def on_ws_disconnected(self, transport) -> None:
            for f in (self.welcomed, self.finished):
                if not f.done():
                    f.set_result(False)

        def on_ws_frame(self, transport, frame) -> None:
            if frame.msg_type != WSMsgType.BINARY:
                return
            data = frame.get_payload_as_bytes()
            if not self.welcomed.done():
                self.welcomed.set_result(data[:1] == b"\x06")
                return
            if data[:1] == b"\x03":
                stats["acked"] += 1
                stats["ack_ms"].append(time.time() * 1000 - self.sent_ms)
                self.seq += 1
                self.due += 1.0
                self.schedule()
            else:
                stats["other"] += 1
                if not self.finished.done():
                    self.finished.set_result(False)
                transport.disconnect()

        def schedule(self) -> None:
            if self.due >= end:
                if not self.finished.done():
                    self.finished.set_result(True)
                return
            self.loop.call_later(max(0.0, self.due - time.time()), self.send)

        def send(self) -> None:
            self.sent_ms = time.time() * 1000
            batch = wire.Batch(self.epoch, [wire.Frame(self.seq, int(self.sent_ms), payloads[self.seq % len(payloads)])])
            self.t.send(WSMsgType.BINARY, batch.encode())

    async def main() -> None:
        sem = asyncio.Semaphore(64)
        cameras: list[Camera] = []

        async def connect(cam: str, token: bytes) -> None:
            async with sem:
                _, listener = await ws_connect(lambda: Camera(cam, token), url, websocket_handshake_timeout=60,
                                               use_aiofastnet=False)
                cameras.append(listener)
                if not await listener.welcomed:
                    stats["refused"] += 1

        results = await asyncio.gather(*(connect(c, t) for c, t in cams), return_exceptions=True)
        stats["errors"] = sum(isinstance(r, BaseException) for r in results)
        stats["first_error"] = next((repr(r) for r in results if isinstance(r, BaseException)), None)
        for c in cameras:
            c.schedule()
        await asyncio.wait([c.finished for c in cameras], timeout=end - time.time() + 60)
        for c in cameras:
            if c.t is not None:
                c.t.disconnect()

    uvloop.run(main())
    out.put(stats)


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _postgres_pids(cluster) -> list[int]:
    import psutil

    pid_file = cluster.dir / "pg" / "postmaster.pid"
    master = psutil.Process(int(pid_file.read_text().split()[0]))
    return [master.pid] + [c.pid for c in master.children(recursive=True)]


def register_cameras(dsn: str, n: int) -> list[tuple[str, bytes]]:
    import psycopg

    from taskcodec.server.auth import hash_token

    cams = [(f"sim-{i:06d}", os.urandom(16).hex().encode()) for i in range(n)]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO cameras (id, token_hash) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                        [(c, hash_token(t)) for c, t in cams])
    return cams


def storage_bytes(dsn: str) -> int:
    """Heap + indexes + TOAST of every frames partition and of the class-count rollup."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        parts = conn.execute("SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                             "WHERE inhparent = 'frames'::regclass").fetchone()[0]
        rollup = conn.execute("SELECT pg_total_relation_size('class_counts')").fetchone()[0]
    return int(parts) + int(rollup)


def query_latencies(dsn: str, rows: int, cameras: int = 1000, log=print) -> dict[str, Any]:
    """Fill the store with ``rows`` synthetic one-fps frames (6-byte payloads) of ``cameras`` cameras over the last
    days, through the same partitions and rollup, then time the dashboard's and query API's questions."""
    import psycopg

    from taskcodec.server.cluster.pgstore import partition_ddl

    per_cam = rows // cameras
    now = int(time.time())
    start = now - per_cam
    with psycopg.connect(dsn, autocommit=True) as conn:
        import datetime as dt

        day = dt.datetime.fromtimestamp(start, dt.timezone.utc).date()
        while day <= dt.datetime.fromtimestamp(now, dt.timezone.utc).date():
            conn.execute(partition_ddl(day))
            day += dt.timedelta(days=1)
        t0 = time.time()
        step = max(1, 2_000_000 // cameras)
        for off in range(0, per_cam, step):
            conn.execute(
                """INSERT INTO frames (camera_id, epoch, seq, ts_capture, model_id, payload, prediction, confidence)
                   SELECT 'q-' || lpad(c::text, 6, '0'), 1, s, to_timestamp(%s::bigint + s), 'bench',
                          '\\x010203040506'::bytea, (c + s) %% 10, 9000
                   FROM generate_series(0, %s::int - 1) c, generate_series(%s::int, %s::int) s ON CONFLICT DO NOTHING""",
                (start, cameras, off, min(off + step, per_cam) - 1))
            log(f"  filled {min(off + step, per_cam) * cameras:,} of {per_cam * cameras:,} frames")
        conn.execute("""INSERT INTO class_counts SELECT camera_id, date_trunc('hour', ts_capture), prediction, count(*)
                        FROM frames WHERE camera_id LIKE 'q-%%' GROUP BY 1, 2, 3
                        ON CONFLICT (camera_id, hour, prediction) DO UPDATE SET n = EXCLUDED.n""")
        conn.execute("ANALYZE frames")
        conn.execute("ANALYZE class_counts")
        fill_s = time.time() - t0
        total = conn.execute("SELECT count(*) FROM frames").fetchone()[0]
        queries = {
            "recent 100 frames of one camera": (
                "SELECT seq, ts_capture, prediction FROM frames WHERE camera_id = 'q-000500' "
                "ORDER BY ts_capture DESC LIMIT 100", ()),
            "one camera's frames in a 10-minute range": (
                "SELECT count(*) FROM frames WHERE camera_id = 'q-000500' AND ts_capture >= to_timestamp(%s) "
                "AND ts_capture < to_timestamp(%s)", (now - 3600, now - 3000)),
            "counts by class, one camera, last hour (rollup)": (
                "SELECT prediction, sum(n) FROM class_counts WHERE camera_id = 'q-000500' AND hour >= "
                "date_trunc('hour', to_timestamp(%s)) GROUP BY 1", (now - 3600,)),
            "counts by class per hour, all cameras, last day (rollup)": (
                "SELECT hour, prediction, sum(n) FROM class_counts WHERE hour >= to_timestamp(%s) GROUP BY 1, 2",
                (now - 86400,)),
        }
        timings = {}
        for name, (sql, args) in queries.items():
            runs = []
            for _ in range(5):
                q0 = time.perf_counter()
                conn.execute(sql, args).fetchall()
                runs.append(1000 * (time.perf_counter() - q0))
            timings[name] = {"median_ms": float(np.median(runs)), "max_ms": float(np.max(runs))}
            log(f"  {name}: {timings[name]['median_ms']:.1f} ms")
    return {"frames": int(total), "cameras": cameras, "fill_s": fill_s,
            "disk_bytes_per_frame": storage_bytes(dsn) / max(int(total), 1), "queries": timings}


def _stored(dsn: str) -> tuple[int, list[int]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        n = conn.execute("SELECT count(*) FROM frames").fetchone()[0]
        lat = [r[0] for r in conn.execute("SELECT stored_ms_after FROM frames").fetchall()]
    return n, lat


def run_config(bundle: Bundle, payloads: list[bytes], cameras: int, gateways: int, workers: int, seconds: float,
               load_procs: int, log=print) -> dict[str, Any]:
    from taskcodec.server.cluster.local import LocalCluster

    with LocalCluster([bundle.path], gateways=gateways, workers=workers) as c:
        cams = register_cameras(c.pg_dsn, cameras)
        urls = [c.gateway_url(i).replace("http://", "ws://") + "/v1/stream" for i in range(gateways)]
        groups = {"gateway": [g[0].pid for g in c.gateways], "worker": [w.pid for w in c.workers],
                  "nats": [n.pid for n in c.nats], "postgres": _postgres_pids(c)}
        t0 = time.time() + 8.0 + cameras / 2000.0  # connections first, then the measured window
        q: mp.Queue = mp.get_context("spawn").Queue()
        ctx = mp.get_context("spawn")
        procs = []
        # TASKCODEC_SERVE_LOAD_CLIENT=picows: a load generator costing a few µs per frame instead of ~200
        target = _fast_load_process if os.environ.get("TASKCODEC_SERVE_LOAD_CLIENT") == "picows" else _load_process
        for p in range(load_procs):
            mine = cams[p::load_procs]
            url = urls[p % len(urls)]
            procs.append(ctx.Process(target=target, args=(url, mine, bundle.model_tag, payloads, t0, seconds, q)))
        for p in procs:
            p.start()
        time.sleep(max(0.0, t0 - time.time()))
        stored0 = _stored(c.pg_dsn)[0]
        cpu0 = {k: _cpu_seconds(v) for k, v in groups.items()}
        w0 = time.time()
        time.sleep(seconds)
        cpu1 = {k: _cpu_seconds(v) for k, v in groups.items()}
        stored1 = _stored(c.pg_dsn)[0]
        window = time.time() - w0
        results = [q.get(timeout=seconds + 300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        time.sleep(3.0)  # let the workers drain what was acked at the end
        stored_total, stored_lat = _stored(c.pg_dsn)
        disk = storage_bytes(c.pg_dsn)
    acked = sum(r["acked"] for r in results)
    ack_ms = np.array([x for r in results for x in r["ack_ms"]] or [np.nan])
    frames_window = stored1 - stored0
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    per_1000 = {k: 1000.0 * v / max(frames_window, 1) for k, v in cpu.items()}
    row = {"cameras": cameras, "gateways": gateways, "workers": workers, "seconds": round(window, 1),
           "frames_per_s": frames_window / window, "acked": acked, "stored_total": stored_total,
           "lost": max(0, acked - stored_total), "disk_bytes_per_frame": disk / max(stored_total, 1),
           "errors": sum(r["errors"] for r in results), "first_error": next((r["first_error"] for r in results
                                                                              if r.get("first_error")), None),
           "ack_p50_ms": float(np.nanpercentile(ack_ms, 50)), "ack_p99_ms": float(np.nanpercentile(ack_ms, 99)),
           "stored_p99_ms": float(np.percentile(stored_lat, 99)) if stored_lat else None,
           "cpu_s_per_1000_frames": per_1000, "cpu_us_per_frame": 1000.0 * sum(per_1000.values()),
           "gateway_cpu_us_per_frame": 1000.0 * per_1000["gateway"],
           "cores_per_100k_cameras": sum(per_1000.values()) / 1000.0 * 100_000}
    log(f"{cameras} cameras, {gateways} gateway(s), {workers} worker(s): {row['frames_per_s']:.0f} frames/s, "
        f"{row['cpu_us_per_frame']:.0f} µs CPU/frame, ack p99 {row['ack_p99_ms']:.0f} ms, lost {row['lost']}")
    return row


def run(bundle_path: str | None, cameras: list[int], gateways: list[int], workers: list[int], seconds: float,
        load_procs: int, out: Path, query_rows: int = 0, log=print) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    payloads = real_payloads(bundle)
    rows = []
    for n in cameras:
        for g in gateways:
            for w in workers:
                rows.append(run_config(bundle, payloads, n, g, w, seconds, load_procs, log))
    queries = None
    if query_rows:
        from taskcodec.server.cluster.local import LocalCluster

        log(f"query latencies at {query_rows:,} stored frames")
        with LocalCluster([bundle.path], gateways=0, workers=0, nats_nodes=0) as c:
            queries = query_latencies(c.pg_dsn, query_rows, log=log)
    result = {"machine": machine_info(), "time": utc_now(), "bundle": bundle.model_id,
              "load_avg_1min_at_end": os.getloadavg()[0],
              "payload_bytes_mean": float(np.mean([len(p) for p in payloads])), "rows": rows, "queries": queries,
              "note": "server-side CPU = gateways + workers + 3 nats-server nodes (JetStream R3) + PostgreSQL, all on "
                      "this machine together with the load generator"}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cluster.json", result)
    write_text(out / "cluster.md", markdown(result))
    plot(result, out / "cluster.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    cols = [("cameras", "1-fps cameras"), ("gateways", "gateways"), ("workers", "workers"),
            ("frames_per_s", "frames/s"), ("cpu_us_per_frame", "server CPU µs/frame"),
            ("gateway_cpu_us_per_frame", "gateway µs/frame"), ("gw", "gateway"),
            ("wk", "worker"), ("nats", "nats (3)"), ("pg", "postgres"), ("ack_p99_ms", "ack p99 ms"),
            ("stored_p99_ms", "capture→stored p99 ms"), ("lost", "acked not stored"),
            ("disk_bytes_per_frame", "disk B/frame"),
            ("cores_per_100k_cameras", "cores / 100k cameras")]
    rows = []
    for r in result["rows"]:
        c = r["cpu_s_per_1000_frames"]
        rows.append({**r, "gw": c["gateway"], "wk": c["worker"], "nats": c["nats"], "pg": c["postgres"]})
    return (f"# Scale-out cluster: throughput and server CPU\n\n{machine_line(result['machine'])}; {result['time']}; "
            f"bundle {result['bundle']}, mean payload {result['payload_bytes_mean']:.1f} B. {result['note']}"
            + (f" (load average {result['load_avg_1min_at_end']:.1f} at the end: other jobs shared the CPU)"
               if "load_avg_1min_at_end" in result else "") + ". "
            "Per-component columns are CPU-seconds per 1000 frames.\n\n"
            + markdown_table(rows, cols, {k: ".1f" if k.endswith("ms") else "d" if k in ("cameras", "gateways", "workers",
                                          "lost") else ".3g" for k, _ in cols}) + "\n"
            + _queries_md(result.get("queries")))


def _queries_md(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    lines = [f"\n## Query latencies at {q['frames']:,} stored frames ({q['cameras']} cameras; "
             f"{q['disk_bytes_per_frame']:.1f} B on disk per frame incl. indexes and rollup)\n",
             "| query | median ms | max ms (5 runs) |", "|---|---|---|"]
    lines += [f"| {name} | {t['median_ms']:.2f} | {t['max_ms']:.2f} |" for name, t in q["queries"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for g in sorted({r["gateways"] for r in result["rows"]}):
        rows = sorted((r for r in result["rows"] if r["gateways"] == g), key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in rows], [r["cpu_us_per_frame"] for r in rows], "o-", label=f"{g} gateway(s)")
    ax.set_xlabel("workers")
    ax.set_ylabel("server CPU µs per frame")
    ax.set_title("taskcodec scale-out: CPU per frame (one frame per message)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
