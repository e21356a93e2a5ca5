"""`taskcodec serve-bench`: the server's CPU cost per frame, measured in-process (no network, real SQLite file with
the production durability settings), to tell how many 1-fps cameras one box can take.

Two measurements:
  * stages: CPU per frame of decode, classify and store, and of the whole path, when K one-frame messages (K cameras)
    are handled together in one micro-batch (K=1 is the per-message path);
  * pipeline: C simulated cameras each submitting one-frame batches back to back through the real asyncio
    IngestService, with and without micro-batching across connections: frames/s and submit latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from taskcodec.server.ingest import IngestService
from taskcodec.server.storage import SQLiteStorage
from taskcodec import wire
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, compress, decompress


def _frames(bundle: Bundle, n: int, seed: int = 0) -> list[bytes]:
    coder = RangeCoder(bundle.tables)
    rng = np.random.default_rng(seed)
    # symbols spread over each dimension's support, a few escapes: like a real latent
    lower, length = bundle.tables.lower, bundle.tables.length
    symbols = (lower + (rng.random((n, bundle.latent_dim)) * length).astype(np.int32)).astype(np.int32)
    return [compress(s, coder, bundle.model_tag) for s in symbols]


def _cpu_per_frame(fn, frames: int) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) / frames * 1e6


def measure_stages(bundle: Bundle, db: Path, n: int, sizes: list[int]) -> list[dict]:
    storage = SQLiteStorage(db)
    service = IngestService(bundle, storage)
    payloads = _frames(bundle, n)
    coder, tag = service.coder, bundle.model_tag
    rows = []
    epoch = 0
    for k in sizes:
        groups = [range(i, min(i + k, n)) for i in range(0, n, k)]
        decode = _cpu_per_frame(lambda: [decompress(p, coder, tag) for p in payloads], n)
        symbols = np.stack([decompress(p, coder, tag) for p in payloads])
        classify = _cpu_per_frame(lambda: [service.classifier.predict(symbols[list(g)]) for g in groups], n)
        epoch += 1
        now = int(time.time() * 1000)

        def store(e=epoch):
            for g in groups:
                storage.store_frames([(f"cam-{i}", e, i, now, now, bundle.model_id, payloads[i], 0, 0.5) for i in g])

        t_wall = time.perf_counter()
        store_cpu = _cpu_per_frame(store, n)
        store_wall = (time.perf_counter() - t_wall) / len(groups) * 1e3
        epoch += 1

        def whole(e=epoch):
            for g in groups:
                service.process([(f"cam-{i}", wire.Batch(e, [wire.Frame(i, now, payloads[i])])) for i in g])

        t_wall = time.perf_counter()
        total = _cpu_per_frame(whole, n)
        wall = time.perf_counter() - t_wall
        rows.append({"messages_per_microbatch": k, "frames": n, "decode_us": decode, "classify_us": classify,
                     "store_us": store_cpu, "commit_wall_ms": store_wall, "total_cpu_us": total,
                     "total_wall_us": wall / n * 1e6, "max_frames_per_s_one_core": 1e6 / total})
    storage.close()
    return rows


async def _pipeline(bundle: Bundle, db: Path, cameras: int, seconds: float, microbatch: bool) -> dict:
    storage = SQLiteStorage(db)
    service = IngestService(bundle, storage, microbatch=microbatch)
    payloads = _frames(bundle, 256, seed=1)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    epoch = 100 + int(microbatch)

    async def camera(c: int) -> None:
        seq = 0
        while time.perf_counter() < stop:
            batch = wire.Batch(epoch, [wire.Frame(seq, 0, payloads[(c + seq) % len(payloads)])])
            t = time.perf_counter()
            replies = await service.submit(f"cam-{c}", batch)
            latencies.append(time.perf_counter() - t)
            assert isinstance(replies[0], wire.Ack), replies
            seq += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(camera(c) for c in range(cameras)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    await service.aclose()
    storage.close()
    lat = np.array(latencies) * 1e3
    return {"cameras": cameras, "microbatch": microbatch, "frames": len(lat), "frames_per_s": len(lat) / wall,
            "cpu_us_per_frame": cpu / len(lat) * 1e6, "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99))}


async def _load_clients(url: str, bundle: Bundle, tokens: dict[str, bytes], seconds: float,
                        server_cpu) -> tuple[list[float], float, float, float]:
    """Connect every camera first, then each sends one 1-frame batch per second (phases spread over the second).
    Returns ack RTTs in ms and the server CPU seconds, client CPU seconds and wall seconds of the steady phase."""
    from websockets.asyncio.client import connect

    payloads = _frames(bundle, 64, seed=2)
    rtts: list[float] = []
    ws_url = url.replace("http://", "ws://") + "/v1/stream"
    sem = asyncio.Semaphore(50)  # don't stampede the accept queue

    async def open_camera(cam: str, token: bytes):
        async with sem:
            ws = await connect(ws_url, max_size=None, open_timeout=60)
            await ws.send(wire.Hello(bundle.model_tag, cam, token).encode())
            assert isinstance(wire.decode(await ws.recv()), wire.Welcome)
            return ws

    async def camera(i: int, ws, start: float) -> None:
        t_next = start + i / len(tokens)
        seq = 0
        while t_next < start + seconds:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            t = time.perf_counter()
            await ws.send(wire.Batch(1, [wire.Frame(seq, time.time_ns() // 1_000_000,
                                                    payloads[seq % len(payloads)])]).encode())
            reply = wire.decode(await ws.recv())
            assert isinstance(reply, wire.Ack), reply
            rtts.append((time.perf_counter() - t) * 1e3)
            seq += 1
            t_next += 1.0

    sockets = await asyncio.gather(*(open_camera(cam, tok) for cam, tok in tokens.items()))
    cpu0, client0, t0 = server_cpu(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(camera(i, ws, t0 + 0.05) for i, ws in enumerate(sockets)))
    cpu, client, wall = server_cpu() - cpu0, time.process_time() - client0, time.perf_counter() - t0
    await asyncio.gather(*(ws.close() for ws in sockets))
    return rtts, cpu, client, wall


def measure_load(bundle: Bundle, tmp: Path, cameras: int, seconds: float, *server_args: str) -> dict:
    """A real server subprocess on loopback and ``cameras`` WebSocket cameras at 1 fps from this process."""
    import sqlite3

    from taskcodec.server.auth import add_camera
    from taskcodec.testing import ServerProcess

    db = tmp / "load.db"
    storage = SQLiteStorage(db)
    tokens = {f"cam-{i:04d}": add_camera(storage, f"cam-{i:04d}").encode() for i in range(cameras)}
    storage.close()
    with ServerProcess(bundle.path, db, *server_args) as srv:
        ticks = os.sysconf("SC_CLK_TCK")

        def server_cpu() -> float:
            fields = Path(f"/proc/{srv.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        rtts, cpu, client, wall = asyncio.run(_load_clients(srv.url, bundle, tokens, seconds, server_cpu))
        metrics = {line.split()[0]: float(line.split()[1]) for line in srv.get_text("/metrics").splitlines()
                   if line.startswith("taskcodec_server_") and " " in line}
        microbatches = metrics.get("taskcodec_server_microbatch_frames_count", 0.0)
    with sqlite3.connect(db) as conn:
        lat = np.array([r[0] for r in conn.execute("SELECT ts_stored_ms - ts_capture_ms FROM frames")], float)
    rtt = np.array(rtts)
    return {"cameras": cameras, "fps_per_camera": 1.0, "seconds": seconds, "frames_acked": len(rtt),
            "frames_stored": len(lat), "server_cpu_percent_of_one_core": 100 * cpu / wall,
            "server_cpu_us_per_frame": cpu / max(1, len(rtt)) * 1e6,
            "commits_per_s": microbatches / wall,
            "mean_frames_per_microbatch":
                metrics.get("taskcodec_server_microbatch_frames_sum", 0.0) / max(1, microbatches),
            "client_cpu_percent_of_one_core": 100 * client / wall,
            "ack_rtt_p50_ms": float(np.percentile(rtt, 50)), "ack_rtt_p99_ms": float(np.percentile(rtt, 99)),
            "capture_to_stored_p50_ms": float(np.percentile(lat, 50)),
            "capture_to_stored_p99_ms": float(np.percentile(lat, 99))}


def run(bundle: Bundle, out: Path, frames: int = 2000, sizes: tuple[int, ...] = (1, 10, 50, 250),
        cameras: tuple[int, ...] = (50, 500), seconds: float = 5.0, load_cameras: int = 0,
        load_seconds: float = 20.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-bench-", dir=out) as tmp:
        stages = measure_stages(bundle, Path(tmp) / "stages.db", frames, list(sizes))
        pipeline = []
        for c in cameras:
            for mb in (False, True):
                pipeline.append(asyncio.run(_pipeline(bundle, Path(tmp) / f"pipe-{c}-{mb}.db", c, seconds, mb)))
        load = measure_load(bundle, Path(tmp), load_cameras, load_seconds) if load_cameras else None
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, {platform.python_version()}",
              "bundle": {"model_id": bundle.model_id, "latent_dim": bundle.latent_dim,
                         "mean_payload_bytes": float(np.mean([len(p) for p in _frames(bundle, 200)]))},
              "sqlite": "WAL, synchronous=FULL, one transaction per micro-batch", "stages": stages,
              "pipeline": pipeline, "load": load}
    tag = f"serve_bench_d{bundle.latent_dim}"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{tag}.md").write_text(to_markdown(result))
    _plot(result, out / f"{tag}.png")
    return result


def to_markdown(r: dict) -> str:
    lines = [f"# Ingest server CPU per frame ({r['machine']})", "",
             f"Bundle {r['bundle']['model_id']}, latent dim {r['bundle']['latent_dim']}, "
             f"{r['bundle']['mean_payload_bytes']:.1f} bytes/frame; SQLite {r['sqlite']}.", "",
             "| messages per micro-batch | decode µs | classify µs | store µs (CPU) | commit wall ms | "
             "total CPU µs/frame | frames/s per core |", "|---|---|---|---|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['messages_per_microbatch']} | {s['decode_us']:.1f} | {s['classify_us']:.1f} | "
                     f"{s['store_us']:.1f} | {s['commit_wall_ms']:.2f} | {s['total_cpu_us']:.1f} | "
                     f"{s['max_frames_per_s_one_core']:.0f} |")
    lines += ["", "Closed-loop pipeline (each simulated camera submits its next 1-frame batch as soon as the last is "
              "acked; in-process, no network):", "",
              "| cameras | micro-batching | frames/s | CPU µs/frame | submit p50 ms | submit p99 ms |",
              "|---|---|---|---|---|---|"]
    for p in r["pipeline"]:
        lines.append(f"| {p['cameras']} | {'on' if p['microbatch'] else 'off'} | {p['frames_per_s']:.0f} | "
                     f"{p['cpu_us_per_frame']:.1f} | {p['latency_p50_ms']:.1f} | {p['latency_p99_ms']:.1f} |")
    if r.get("load"):
        g = r["load"]
        lines += ["", f"Real server subprocess on loopback, {g['cameras']} WebSocket cameras at 1 fps for "
                  f"{g['seconds']:.0f} s, clients in the bench process on the same box:", "",
                  "| cameras | frames acked / stored | server CPU % of one core | server CPU µs/frame | "
                  "frames per commit | client CPU % | ack RTT p50 / p99 ms | capture->stored p50 / p99 ms |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {g['cameras']} | {g['frames_acked']} / {g['frames_stored']} | "
                  f"{g['server_cpu_percent_of_one_core']:.1f} | {g['server_cpu_us_per_frame']:.0f} | "
                  f"{g['mean_frames_per_microbatch']:.2f} | "
                  f"{g['client_cpu_percent_of_one_core']:.1f} | "
                  f"{g['ack_rtt_p50_ms']:.1f} / {g['ack_rtt_p99_ms']:.1f} | "
                  f"{g['capture_to_stored_p50_ms']:.0f} / {g['capture_to_stored_p99_ms']:.0f} |"]
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = [s["messages_per_microbatch"] for s in r["stages"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("decode_us", "decode"), ("classify_us", "classify"), ("store_us", "store"),
                       ("total_cpu_us", "whole path")):
        ax.plot(k, [s[key] for s in r["stages"]], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("one-frame messages per micro-batch")
    ax.set_ylabel("CPU µs per frame")
    ax.set_title(f"ingest server CPU per frame, latent dim {r['bundle']['latent_dim']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
