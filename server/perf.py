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

from server.ingest import IngestService
from server.storage import SQLiteStorage
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


def run(bundle: Bundle, out: Path, frames: int = 2000, sizes: tuple[int, ...] = (1, 10, 50, 250),
        cameras: tuple[int, ...] = (50, 500), seconds: float = 5.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-bench-", dir=out) as tmp:
        stages = measure_stages(bundle, Path(tmp) / "stages.db", frames, list(sizes))
        pipeline = []
        for c in cameras:
            for mb in (False, True):
                pipeline.append(asyncio.run(_pipeline(bundle, Path(tmp) / f"pipe-{c}-{mb}.db", c, seconds, mb)))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, {platform.python_version()}",
              "bundle": {"model_id": bundle.model_id, "latent_dim": bundle.latent_dim,
                         "mean_payload_bytes": float(np.mean([len(p) for p in _frames(bundle, 200)]))},
              "sqlite": "WAL, synchronous=FULL, one transaction per micro-batch", "stages": stages,
              "pipeline": pipeline}
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
