"""Evaluate a run folder on the full test set with the *real* coder: every test image is range-coded with the frozen
tables, decoded back and checked, so the reported rate is bytes on the wire, not an estimate.

The stream is ``2 check bytes || byte-terminated range-coder payload``; the check is counted separately from the
payload, and the payload must stay within ``estimate * 1.02 + 32`` bits for every image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from taskcodec.coding import RangeCoder, compress, decompress
from taskcodec.coding.stream import CHECK_BYTES
from taskcodec.data import load_frames


def evaluate_run(run: str | Path, data_dir: str | Path | None = None, test_limit: int | None = None,
                 progress: bool = True) -> dict:
    """Coded sizes, estimate check, round trip and probe accuracies of a run; writes evaluation.{json,md} into it."""
    import torch
    from tqdm.auto import tqdm

    from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text
    from taskcodec.training.probes import accuracy
    from taskcodec.training.trainer import encode_symbols, load_probe, load_run

    run = Path(run)
    model, probe, info = load_run(run)
    torch.set_num_threads(max(1, int(info["config"].threads)))
    tables = info["tables"]
    channels, height, width = info["config"].image_shape
    test = load_frames(data_dir or info["data"]["data"], "test", height, width, channels)
    images, labels = test.frames, test.labels
    if test_limit:
        images, labels = images[:test_limit], labels[:test_limit]
    symbols = encode_symbols(model, images)
    estimate = tables.estimated_bits(symbols)
    coder = RangeCoder(tables)
    payload = np.zeros(len(symbols), np.int64)
    roundtrip_failures = 0
    for i, s in enumerate(tqdm(symbols, disable=not progress, desc="range-code test set", unit="img")):
        stream = compress(s, coder)
        payload[i] = 8 * (len(stream) - CHECK_BYTES)
        roundtrip_failures += int(not np.array_equal(decompress(stream, coder), s))
    coded = payload + 8 * CHECK_BYTES
    over = payload > estimate * 1.02 + 32
    result = {
        "run": str(run), "n_test": int(len(symbols)), "measured_at": utc_now(), "machine": machine_info(),
        "objective": info["config"].objective, "beta": info["config"].beta,
        "augmentations": info["config"].augmentations, "latent_dim": info["config"].latent_dim,
        "coded_bits_mean": float(coded.mean()), "coded_bits_p5": float(np.percentile(coded, 5)),
        "coded_bits_p50": float(np.percentile(coded, 50)), "coded_bits_p95": float(np.percentile(coded, 95)),
        "coded_bits_max": int(coded.max()), "check_bits": 8 * CHECK_BYTES,
        "payload_bits_mean": float(payload.mean()), "estimated_bits_mean": float(estimate.mean()),
        "estimate_check": "payload <= estimate * 1.02 + 32 bits",
        "estimate_check_failures": int(over.sum()), "estimate_check_ok": bool(not over.any()),
        # The range coder's termination can push an image a bit over a word boundary (e.g. 31.1 estimated bits -> 64).
        "max_payload_excess_bits": float((payload - estimate * 1.02).max()),
        "roundtrip_failures": roundtrip_failures,
        "accuracy_mlp": accuracy(probe, symbols, labels),
    }
    if (run / "probe_linear.pt").is_file():
        result["accuracy_linear"] = accuracy(load_probe(run / "probe_linear.pt"), symbols, labels)
    write_json(run / "evaluation.json", result)
    rows = [{"metric": k, "value": result[k]} for k in (
        "n_test", "coded_bits_mean", "coded_bits_p5", "coded_bits_p50", "coded_bits_p95", "coded_bits_max",
        "check_bits", "payload_bits_mean", "estimated_bits_mean", "estimate_check_failures", "max_payload_excess_bits",
        "roundtrip_failures",
        "accuracy_linear", "accuracy_mlp") if k in result]
    md = (f"# Evaluation of `{run}`\n\n{result['objective']} beta={result['beta']} "
          f"augmentations={result['augmentations']} D={result['latent_dim']}; every test image range-coded, decoded "
          f"and checked; {result['estimate_check']} for all images: "
          f"{'yes' if result['estimate_check_ok'] else 'NO'}.\n\n"
          + markdown_table(rows, [("metric", "metric"), ("value", "value")], {"value": ".4g"})
          + f"\n{machine_line(result['machine'])}\n")
    write_text(run / "evaluation.md", md)
    return result
