"""`taskcodec bench coder`: the entropy coder on the 10 000 Fashion-MNIST test images of a bundle.

One run measures, on the same symbol vectors (the bundle's fp32 encoder on the test images):
- coded size against the float tables' estimate: the bound coded <= estimate x 1.01 + 8 bits per image (coded =
  the range-coded bytes; the 2 check bytes are reported separately), every payload decoded back;
- encode and decode time per frame for the C coder in C (the firmware library, `tcc_tool time`), through the Python
  extension (the runtime's and server's path: `compress` / `decompress`), the numpy/Python fallback, and constriction
  (the coder taskcodec used before, float tables quantised lazily at every call) when it is installed.
Writes bench/results/coder.{json,md}."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer

from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text


CHUNK = 100  # frames per timed slice: on a shared machine short slices dodge other processes' bursts


def _best_us(fn: Callable[[Any], Any], items: list, repeats: int) -> float:
    """Microseconds per item: each slice of CHUNK items timed ``repeats`` times, the best of each slice summed."""
    total = 0.0
    for start in range(0, len(items), CHUNK):
        chunk = items[start: start + CHUNK]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in chunk:
                fn(x)
            best = min(best, time.perf_counter() - t0)
        total += best
    return total / len(items) * 1e6


def _symbols(bundle, data: Optional[Path], limit: Optional[int]) -> np.ndarray:
    from taskcodec.data import load_fashion_mnist
    from taskcodec.providers import ort_session, run_batched

    images, _ = load_fashion_mnist("test", data)
    frames = images[..., None] if images.ndim == 3 else images
    if limit:
        frames = frames[:limit]
    return run_batched(ort_session(bundle.encoder_path()), frames, batch=500).astype(np.int32)


def _size(bundle, symbols: np.ndarray) -> dict[str, Any]:
    from taskcodec.coding import RangeCoder, compress, decompress

    tables, tag = bundle.tables, bundle.model_tag
    coder = RangeCoder(tables)
    payloads = [compress(s, coder, tag) for s in symbols]
    failures = sum(not np.array_equal(decompress(p, coder, tag), s) for p, s in zip(payloads, symbols))
    coded = np.array([8 * (len(p) - 2) for p in payloads], np.float64)
    estimate = tables.estimated_bits(symbols)
    model = tables.model_bits(symbols)
    slack = coded - (estimate * 1.01 + 8)
    return {
        "images": int(len(symbols)), "roundtrip_failures": int(failures),
        "escaped_symbols": int(tables.indices(symbols)[1].sum()),
        "coded_bits_mean": float(coded.mean()), "coded_bits_p50": float(np.percentile(coded, 50)),
        "coded_bits_p95": float(np.percentile(coded, 95)), "coded_bits_max": float(coded.max()),
        "estimate_bits_mean": float(estimate.mean()), "integer_model_bits_mean": float(model.mean()),
        "check_bits": 16, "payload_bits_mean": float(coded.mean() + 16),
        "excess_over_estimate_mean": float((coded - estimate).mean()),
        "excess_over_estimate_max": float((coded - estimate).max()),
        "bound": "coded <= estimate * 1.01 + 8 (per image; coded excludes the 16 check bits)",
        "bound_violations": int((slack > 0).sum()), "bound_worst_slack_bits": float(slack.max()),
    }


def _c_library_us(tables, tag: bytes, symbols: np.ndarray, repeats: int) -> dict[str, float] | None:
    from taskcodec.firmware_bridge import build

    try:
        exe = build.build("tcc_tool")
    except build.BuildError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "tables.tcct"
        blob.write_bytes(tables.to_blob())
        lines = ["load " + " ".join(map(str, s)) for s in symbols] + [f"time {repeats} {tag.hex()}"]
        out = subprocess.run([str(exe), str(blob)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                             timeout=600).stdout.splitlines()[-1].split()
    if out[0] != "ok":
        raise RuntimeError(f"tcc_tool time failed: {out}")
    return {"encode_us": float(out[1]) / 1e3, "decode_us": float(out[2]) / 1e3}


def _constriction_us(tables, symbols: np.ndarray, repeats: int) -> dict[str, float] | None:
    try:
        import constriction
    except ImportError:
        return None
    family = constriction.stream.model.Categorical(perfect=False)  # taskcodec 0.1's model: lazily quantised
    half = constriction.stream.model.Uniform(1 << 16)
    probabilities = tables.pmf.astype(np.float64)
    prepared = []
    for s in symbols:
        idx, escaped = tables.indices(s)
        z = ((s[escaped].astype(np.int64) << 1) ^ (s[escaped].astype(np.int64) >> 63)) & 0xFFFFFFFF
        prepared.append((idx, np.stack([z >> 16, z & 0xFFFF], axis=1).reshape(-1).astype(np.int32)))

    def encode(item):
        idx, halves = item
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(idx, family, probabilities)
        if len(halves):
            enc.encode(halves, half)
        return enc.get_compressed()

    coded = [(encode(item), len(item[1])) for item in prepared]

    def decode(item):
        words, n_halves = item
        dec = constriction.stream.queue.RangeDecoder(words)
        dec.decode(family, probabilities)
        if n_halves:
            dec.decode(half, n_halves)

    return {"encode_us": _best_us(encode, prepared, repeats), "decode_us": _best_us(decode, coded, repeats),
            "version": _dist_version("constriction")}


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(bundle_path: Optional[Path], data: Optional[Path], limit: Optional[int], timing_frames: int, repeats: int,
        out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    from taskcodec.bundle import load_bundle
    from taskcodec.coding import RangeCoder, compress, decompress
    from taskcodec.coding import range_coder

    import os

    load_before = os.getloadavg()[0]
    bundle = load_bundle(bundle_path)
    log(f"encoding the test images with {bundle.path} ({bundle.model_id}) ...")
    symbols = _symbols(bundle, data, limit)
    log(f"coded size over {len(symbols)} images ...")
    size = _size(bundle, symbols)
    timed = symbols[:timing_frames]
    tag, tables = bundle.model_tag, bundle.tables
    rows = []
    c_lib = _c_library_us(tables, tag, timed, repeats)
    if c_lib:
        rows.append({"coder": "C library (firmware; tcc_payload_encode/decode, -O2)", **c_lib})
    for backend in (["c"] if range_coder.c_available() else []) + ["python"]:
        coder = RangeCoder(tables, backend)
        payloads = [compress(s, coder, tag) for s in timed]
        rows.append({"coder": {"c": "C extension via compress/decompress (runtime, server)",
                               "python": "numpy/Python fallback via compress/decompress"}[backend],
                     "encode_us": _best_us(lambda s: compress(s, coder, tag), list(timed), repeats),
                     "decode_us": _best_us(lambda p: decompress(p, coder, tag), payloads, repeats)})
    cons = _constriction_us(tables, timed, repeats)
    if cons:
        rows.append({"coder": f"constriction {cons.pop('version')} queue range coder, lazy float model "
                              "(taskcodec 0.1; no check, no termination search)", **cons})
    result = {"command": "taskcodec bench coder", "when": utc_now(), "machine": machine_info(),
              "bundle": {"path": str(bundle.path), "model_id": bundle.model_id, "coder": bundle.spec.stream.coder,
                         "precision_bits": bundle.spec.stream.precision_bits},
              "size": size, "timing": {"frames": int(len(timed)), "repeats": repeats,
                                       "statistic": f"per slice of {CHUNK} frames the best of REPEATS passes, "
                                                    "summed, per frame", "rows": rows,
                                       "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "coder.json", result)
    write_text(out / "coder.md", markdown(result))
    log(f"wrote {out / 'coder.json'} and {out / 'coder.md'}")
    return result


def markdown(r: dict[str, Any]) -> str:
    s, t = r["size"], r["timing"]
    lines = [f"# Entropy coder: {r['bundle']['coder']}, {r['bundle']['precision_bits']}-bit integer CDF", "",
             f"`{r['command']}` on bundle {r['bundle']['model_id']} ({r['when']}).", machine_line(r["machine"]), "",
             f"## Coded size, {s['images']} Fashion-MNIST test images", "",
             f"- coded bits per image (range-coded bytes, check excluded): mean {s['coded_bits_mean']:.2f}, "
             f"p50 {s['coded_bits_p50']:.0f}, p95 {s['coded_bits_p95']:.0f}, max {s['coded_bits_max']:.0f}",
             f"- estimate (float tables): mean {s['estimate_bits_mean']:.2f} bits; information under the integer "
             f"tables: mean {s['integer_model_bits_mean']:.2f} bits",
             f"- check: {s['check_bits']} bits per payload on top (payload mean {s['payload_bits_mean']:.2f} bits)",
             f"- excess over the estimate: mean {s['excess_over_estimate_mean']:.2f}, max "
             f"{s['excess_over_estimate_max']:.2f} bits",
             f"- bound {s['bound']}: **{s['bound_violations']} violations**, worst slack "
             f"{s['bound_worst_slack_bits']:.2f} bits (negative = inside the bound)",
             f"- round trips: {s['images'] - s['roundtrip_failures']}/{s['images']} exact; escaped symbols: "
             f"{s['escaped_symbols']}", "",
             f"## Time per frame ({t['frames']} frames, {t['statistic']}, {t['repeats']} passes)", "",
             f"Shared machine: 1-minute load average {t['load_average_1m'][0]} at the start, "
             f"{t['load_average_1m'][1]} at the end (timings of the Python paths grow with it).", "",
             markdown_table(t["rows"], [("coder", "coder"), ("encode_us", "encode µs/frame"),
                                        ("decode_us", "decode µs/frame")],
                            {"encode_us": ".2f", "decode_us": ".2f"})]
    return "\n".join(lines)


def coder_cmd(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Fashion-MNIST folder (default: system dataset)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N test images."),
    timing_frames: int = typer.Option(2000, "--timing-frames", min=1, help="Frames per timing pass."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timing passes (the best is reported)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for coder.{json,md}."),
) -> None:
    """Entropy coder: coded size vs estimate on the test set; C / extension / fallback / constriction µs per frame."""
    result = run(bundle, data, limit, timing_frames, repeats, out, log=typer.echo)
    typer.echo(markdown(result))
