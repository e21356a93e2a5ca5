"""Costs of several models and of over-the-air rollout (issue 13), measured with the product code:

1. the server's ingest (IngestService.process: decode, classify, one durable transaction) per frame, every micro-batch
   from one model vs split between two models of the same cost (one decoder and classifier call per model);
2. on the camera, RolloutAgent.prepare for a real bundle served by a real server subprocess: download over HTTP with
   the camera token, Ed25519 signature, sha256 of every file, model id, golden vectors, encoder open;
3. check_golden alone per bundle.

    python -m taskcodec.bench.rollout [--rounds 5] [--out bench/results/rollout]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from taskcodec import wire
from taskcodec.bench.ab import abba
from taskcodec.bundle import DEFAULT_BUNDLE, check_golden, generate_signing_key, load_bundle, sign_bundle
from taskcodec.coding import RangeCoder, compress
from taskcodec.report import machine_info

SECOND = Path(DEFAULT_BUNDLE).parent / "bundles" / "task_agnostic"


def _batches(bundle, n_batches: int, frames: int, epoch0: int, tag: bytes) -> list[wire.Batch]:
    coder = RangeCoder(bundle.tables)
    with np.load(bundle.file("golden")) as z:
        symbols = z["symbols"]
    out = []
    for b in range(n_batches):
        fs = [wire.Frame(i, 1_000 + i, compress(symbols[(b * frames + i) % len(symbols)], coder, tag))
              for i in range(frames)]
        out.append(wire.Batch(epoch0 + b, fs))
    return out


def ingest_cost(rounds: int, micro: int = 8, frames: int = 16, n_micro: int = 40) -> dict:
    """Process CPU seconds per frame: micro-batches of ``micro`` batches x ``frames`` frames, all from one model vs
    split half/half between two models of identical cost (the default bundle served a second time under another model
    tag), so the difference is what serving several models costs: grouping by model, one decoder and one classifier
    call per model per micro-batch."""
    from taskcodec.server.ingest import IngestService, ServedModel, Session
    from taskcodec.server.storage import SQLiteStorage

    a = load_bundle(None)
    twin_tag = bytes(x ^ 0xFF for x in a.model_tag)
    modes = ["one_model", "two_models"]
    results = {m: [] for m in modes}
    for r in range(rounds):
        for mode in abba(modes, r):
            tmp = tempfile.mkdtemp(prefix="tc-rollout-bench-")
            try:
                storage = SQLiteStorage(Path(tmp) / "s.db")
                service = IngestService(a, storage, microbatch=False)
                twin = ServedModel(a)
                twin.model_tag, twin.model_id = twin_tag, twin_tag.hex()
                service.models = {**service.models, twin_tag: twin}
                sa, sb = Session("cam-a", None), Session("cam-b", None, model=twin)
                ba = _batches(a, micro * n_micro, frames, 1, a.model_tag)
                bb = _batches(a, micro * n_micro, frames, 10**6, twin_tag)
                jobs = []
                for m in range(n_micro):
                    chunk = []
                    for k in range(micro):
                        i = m * micro + k
                        both = mode == "two_models" and k % 2 == 1
                        chunk.append((sb, bb[i]) if both else (sa, ba[i]))
                    jobs.append(chunk)
                service.process(jobs[0])  # warm-up (ORT first run)
                t0 = time.process_time()
                for chunk in jobs[1:]:
                    replies = service.process(chunk)
                cpu = time.process_time() - t0
                assert all(isinstance(x, wire.Ack) for rep in replies for x in rep), replies
                results[mode].append(cpu / ((n_micro - 1) * micro * frames))
                storage.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in results.items()}
    return {"micro_batch": f"{micro} batches x {frames} frames", "micro_batches": n_micro - 1,
            "two_models_minus_one_model_us_per_frame": round(1e6 * (best["two_models"] - best["one_model"]), 2),
            **{f"{k}_us_per_frame_best": round(1e6 * v, 2) for k, v in best.items()},
            **{f"{k}_us_per_frame_all": [round(1e6 * x, 2) for x in v] for k, v in results.items()}}


def verify_cost(rounds: int) -> dict:
    """RolloutAgent.prepare on the second bundle, downloaded from a real server subprocess."""
    from taskcodec.runtime.capture import CaptureConfig
    from taskcodec.runtime.rollout import RolloutAgent
    from taskcodec.server.registry import Registry
    from taskcodec.testing import ServerProcess

    tmp = Path(tempfile.mkdtemp(prefix="tc-rollout-bench-"))
    try:
        key, pub = generate_signing_key(tmp / "op.key")
        shutil.copytree(SECOND, tmp / "b")
        sign_bundle(tmp / "b", key)
        with ServerProcess(None, tmp / "s.db") as srv:
            token = srv.add_camera("cam-1").decode()
            Registry(tmp / "s.db").add(tmp / "b")
            times, golden = [], []
            for r in range(rounds):
                cfg = CaptureConfig(device="virtual://fashion-mnist", server=srv.url, camera_id="cam-1", token=token,
                                    spool=str(tmp / f"spool{r}"), trusted_keys=[str(pub)], threads=1)
                rt = SimpleNamespace(config=cfg, bundle=load_bundle(None), encoder=SimpleNamespace(stats=None))
                agent = RolloutAgent(rt)
                t0 = time.perf_counter()
                ready = agent.prepare(load_bundle(tmp / "b").model_id)
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert check_golden(ready.bundle) is None
                golden.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in (tmp / "b").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bundle": SECOND.name, "bundle_bytes": size, "prepare_s_best": round(min(times), 4),
            "prepare_s_all": [round(t, 4) for t in times], "check_golden_s_best": round(min(golden), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/rollout"))
    args = ap.parse_args()
    load = os.getloadavg()
    result = {"command": f"python -m taskcodec.bench.rollout --rounds {args.rounds}", "machine": machine_info(),
              "load_average_at_start": [round(x, 2) for x in load],
              "ingest": ingest_cost(args.rounds), "camera_verify": verify_cost(args.rounds)}
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    i, v = result["ingest"], result["camera_verify"]
    md = f"""# Several models and over-the-air rollout: costs

`{result['command']}` on {result['machine'].get('cpu', '?')} (load average {result['load_average_at_start']} at start,
{result['load_average_at_end']} at end; a shared machine: best of {args.rounds} rounds, rounds alternate the order).

| measurement | result |
|---|---|
| server ingest CPU per frame, micro-batches from one model ({i['micro_batch']}) | {i['one_model_us_per_frame_best']} us |
| the same frames split half/half between two models of identical cost (default bundle under a second tag) | {i['two_models_us_per_frame_best']} us |
| difference: what serving two models at once costs per frame | {i['two_models_minus_one_model_us_per_frame']} us |
| camera: download + signature + sha256 + model id + golden vectors + encoder open ({v['bundle']}, {v['bundle_bytes']} bytes, local server) | {v['prepare_s_best']} s |
| golden vectors alone (check_golden, same bundle) | {v['check_golden_s_best']} s |

Ingest: IngestService.process (decode, classify, one SQLite transaction with fsync) in this process, process CPU
time; per-round values in rollout.json. Camera: RolloutAgent.prepare against a real server subprocess on this
machine (loopback HTTP).
"""
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
