"""Zero-shot transfer benchmark of the generic compressor against JPEG and WebP at equal accuracy.

Protocol (the same for every representation): a fixed probe (standardise + logistic regression) scored by stratified
5-fold cross-validation on each evaluation set. Representations: the raw backbone embedding ("uncompressed"), our
decoded latents (the head's linear decoder applied to the symbols; bottlenecks trained on Fashion-MNIST only; the
probe on the raw symbols is reported too), and the backbone embedding of JPEG / WebP
decoded images at several qualities. JPEG and WebP compress the *native* images (28x28 / 25x25 gray) — the smallest
input they could be given — with PIL (JPEG optimize=True, WebP method=6); sizes are whole files. Our size is the real
range-coded stream (2 check bytes + 32-bit words). "Bytes at equal accuracy" is the smallest mean size whose accuracy
is within ``tolerance`` points of the uncompressed probe.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path("bench/results")
JPEG_QUALITIES = (10, 50, 75, 90)
CEILING_DIMS = (16, 32, 64, 128, 256)
WEBP_QUALITIES = (5, 25, 50, 75)


def pil_codec(fmt: str, quality: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Native uint8 images -> (decoded images, file bytes per image) through PIL's JPEG or WebP."""
    from PIL import Image

    options = {"JPEG": {"optimize": True}, "WEBP": {"method": 6}}[fmt]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        decoded, sizes = np.empty_like(images), np.empty(len(images), np.int64)
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt, quality=quality, **options)
            sizes[i] = buf.tell()
            buf.seek(0)
            out = Image.open(buf)
            decoded[i] = np.asarray(out.convert("L" if img.ndim == 2 else "RGB"))
        return decoded, sizes

    return run


def stream_bytes(symbols: np.ndarray, tables) -> np.ndarray:
    from taskcodec.coding import RangeCoder, compress

    coder = RangeCoder(tables)
    return np.array([len(compress(s, coder)) for s in symbols], np.int64)


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (shared), 1 thread"


def size_study(eval_sets: list[str], sizes: tuple[int, ...], backbone: str, weights, progress=print) -> dict:
    """Probe accuracy of the raw embedding and encoder latency (torch, 1 thread, batch 1) at each input size."""
    import torch

    from taskcodec.training.frozen import FeatureStore, probe_accuracy

    out = {}
    for size in sizes:
        store = FeatureStore(size, backbone, weights)
        acc = {}
        for name in eval_sets:
            d = store.get(name)
            acc[name] = probe_accuracy(d["emb"], d["labels"])
        frame = torch.zeros(1, size, size, 3, dtype=torch.uint8)
        times = []
        with torch.inference_mode():
            for i in range(23):
                t = time.perf_counter()
                store.encoder(frame)
                if i >= 3:
                    times.append(time.perf_counter() - t)
        out[str(size)] = {"accuracy": acc, "latency_b1_ms": float(np.median(times) * 1000)}
        progress(f"size {size}: {acc}, {out[str(size)]['latency_b1_ms']:.1f} ms")
    return out


def pca_ceiling(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = CEILING_DIMS) -> list[dict]:
    """Probe accuracy on the top-k principal components of the dataset's *own* embedding: a hindsight subspace no
    zero-shot compressor can beat at k dimensions, so it bounds how few latents the probe can live with."""
    from taskcodec.training.frozen import probe_accuracy

    z = (emb - emb.mean(0)) / (emb.std(0) + 1e-3)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return [{"k": k, "accuracy": probe_accuracy(z @ vt[:k].T, labels)} for k in ks if k <= len(vt)]


def run_transfer(runs: list[Path], eval_sets: list[str], size: int, backbone: str = "mobilenet_v2",
                 weights=None, tolerance: float = 0.01, sizes: tuple[int, ...] = (160, 224),
                 jpeg: tuple[int, ...] = JPEG_QUALITIES, webp: tuple[int, ...] = WEBP_QUALITIES,
                 progress=print) -> dict:
    import torch

    from taskcodec.coding import EntropyTables
    from taskcodec.training.frozen import FeatureStore, load_run, probe_accuracy

    torch.set_num_threads(1)
    report: dict = {"machine": machine(), "size": size, "backbone": backbone, "tolerance_points": 100 * tolerance,
                    "protocol": "standardise + logistic regression (C=0.01), stratified 5-fold CV accuracy",
                    "datasets": {}}
    if sizes:
        report["size_study"] = size_study(eval_sets, sizes, backbone, weights, progress)
    store = FeatureStore(size, backbone, weights)
    models = []
    for run in runs:
        model, config, info = load_run(run)
        if config.size != size or config.backbone != backbone:
            raise ValueError(f"{run} was trained at {config.backbone}@{config.size}, the benchmark is {backbone}@{size}")
        models.append((str(run), model, config, EntropyTables.load(Path(run) / "tables.npz"), info))
    for name in eval_sets:
        raw = store.get(name)
        labels = raw["labels"]
        base = probe_accuracy(raw["emb"], labels)
        rows = {"uncompressed": [{"bytes": None, "accuracy": base, "raw_bytes": int(np.prod(store.dataset(name).images.shape[1:]))}]}
        progress(f"{name}: uncompressed embedding {base:.4f}")
        rows["ours"] = []
        for run, model, config, tables, info in models:
            symbols = model.symbols(raw["emb"])
            nbytes = stream_bytes(symbols, tables)
            with torch.no_grad():  # the server-side decode: the head's linear decoder back to embedding space
                decoded = model.decoder(torch.from_numpy(symbols).float()).numpy()
            rows["ours"].append({"run": run, "beta": config.beta, "transform": config.transform,
                                 "latent_dim": model.latent_dim, "views": config.views,
                                 "augmentation": config.augmentation, "bytes": float(nbytes.mean()),
                                 "bits_estimate": float(tables.estimated_bits(symbols).mean()),
                                 "accuracy": probe_accuracy(decoded, labels),
                                 "accuracy_on_symbols": probe_accuracy(symbols.astype(np.float32), labels)})
            progress(f"  ours {run}: {rows['ours'][-1]}")
        for fmt, qualities in (("JPEG", jpeg), ("WEBP", webp)):
            rows[fmt.lower()] = []
            for q in qualities:
                d = store.get(name, pil_codec(fmt, q), f"{fmt.lower()}{q}")
                rows[fmt.lower()].append({"quality": q, "bytes": float(d["bytes"].mean()),
                                          "accuracy": probe_accuracy(d["emb"], labels)})
                progress(f"  {fmt} q{q}: {rows[fmt.lower()][-1]}")
        summary = {}
        for key in ("ours", "jpeg", "webp"):
            ok = [r for r in rows[key] if r["accuracy"] >= base - tolerance - 1e-9]  # 1e-9: float-exact ties pass
            summary[key] = min(ok, key=lambda r: r["bytes"]) if ok else None
        ratios = {}
        if summary["ours"]:
            for key in ("jpeg", "webp"):
                ratios[f"{key}_over_ours"] = summary[key]["bytes"] / summary["ours"]["bytes"] if summary[key] else None
        ceiling = pca_ceiling(raw["emb"], labels)
        progress(f"  PCA ceiling: {ceiling}")
        report["datasets"][name] = {"n": int(len(labels)), "rows": rows, "equal_accuracy": summary, "ratios": ratios,
                                    "pca_ceiling": ceiling}
    return report


def bundle_transfer(bundle_dir: Path, eval_sets: list[str], progress=print) -> dict:
    """What a deployed bundle gives on unseen data: each of its encoders (fp32, and int8 when present) run through
    ONNX Runtime on the rendered frames, real coded bytes, and the probe on the symbols the server would decode."""
    from taskcodec.providers import ort_session, run_batched
    from taskcodec.bundle import load_bundle
    from taskcodec.training.frozen import probe_accuracy
    from taskcodec.training.transfer_datasets import load_dataset, render

    bundle = load_bundle(bundle_dir)
    precisions = ["fp32"] + (["int8"] if bundle.has("encoder_int8") else [])
    report: dict = {"machine": machine(), "bundle": str(bundle_dir), "model_id": bundle.model_id,
                    "name": bundle.manifest.get("name"), "datasets": {}}
    for name in eval_sets:
        data = load_dataset(name)
        frames = render(data.images, bundle.input.height)
        rows, symbols = {}, {}
        for precision in precisions:
            symbols[precision] = run_batched(ort_session(bundle.encoder_path(precision)), frames, batch=32)
            rows[precision] = {"bytes": float(stream_bytes(symbols[precision], bundle.tables).mean()),
                               "accuracy_on_symbols": probe_accuracy(symbols[precision].astype(np.float32),
                                                                     data.labels)}
            progress(f"{name} {precision}: {rows[precision]}")
        if "int8" in symbols:
            rows["symbol_agreement"] = float((symbols["int8"] == symbols["fp32"]).mean())
        report["datasets"][name] = {"n": len(data), **rows}
    return report


def write_bundle_outputs(report: dict, out_dir: Path = RESULTS, stem: str = "transfer_bundle",
                         command: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Deployed bundle on unseen datasets: {report['name']} ({report['model_id']})", "",
             f"Command: `{command}`", "", f"Machine: {report['machine']}.", "",
             "Each encoder of the bundle through ONNX Runtime on the rendered frames; bytes are real streams; accuracy "
             "is the transfer probe (standardise + logistic regression, 5-fold CV) on the decoded symbols.", "",
             "| dataset | n | fp32 bytes | fp32 acc | int8 bytes | int8 acc | int8 - fp32 (points) | symbol agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        f, i = d["fp32"], d.get("int8")
        tail = (f"{i['bytes']:.1f} | {100 * i['accuracy_on_symbols']:.2f} | "
                f"{100 * (i['accuracy_on_symbols'] - f['accuracy_on_symbols']):+.2f} | "
                f"{100 * d['symbol_agreement']:.1f} %" if i else "- | - | - | -")
        lines.append(f"| {name} | {d['n']} | {f['bytes']:.1f} | {100 * f['accuracy_on_symbols']:.2f} | {tail} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def write_outputs(report: dict, out_dir: Path = RESULTS, stem: str = "transfer", command: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Zero-shot transfer: generic compressor on frozen {report['backbone']} @ {report['size']}px",
             "", f"Command: `{command}`", "", f"Machine: {report['machine']}.", "",
             f"Probe: {report['protocol']}. Equal accuracy = within {report['tolerance_points']:g} point of the "
             "probe on the uncompressed embedding. Bottlenecks trained on Fashion-MNIST train images only.", ""]
    if "size_study" in report:
        lines += ["## Input size", "", "| size | " + " | ".join(f"{n} acc" for n in report["datasets"]) +
                  " | latency b1 (ms, torch 1 thread) |", "|---" * (len(report["datasets"]) + 2) + "|"]
        for size, s in report["size_study"].items():
            lines.append(f"| {size} | " + " | ".join(f"{100 * s['accuracy'].get(n, float('nan')):.1f}"
                                                  for n in report["datasets"]) + f" | {s['latency_b1_ms']:.1f} |")
        lines.append("")
    lines += ["## Bytes at equal accuracy", "",
              "| dataset | n | uncompressed acc | ours bytes (acc) | JPEG bytes (acc, q) | WebP bytes (acc, q) | "
              "JPEG/ours | WebP/ours |", "|---|---|---|---|---|---|---|---|"]

    def cell(r, q=True):
        if r is None:
            return "not reached"
        views = f", {r['views']} views" if r.get("views") else ", no views"
        return f"{r['bytes']:.1f} ({100 * r['accuracy']:.1f}" + (f", q{r['quality']})" if q else
                                                                f", beta {r['beta']:g}{views})")

    for name, d in report["datasets"].items():
        s, rt = d["equal_accuracy"], d["ratios"]
        fmt = lambda v: f"{v:.1f}x" if v else "-"
        lines.append(f"| {name} | {d['n']} | {100 * d['rows']['uncompressed'][0]['accuracy']:.1f} | "
                     f"{cell(s['ours'], False)} | {cell(s['jpeg'])} | {cell(s['webp'])} | "
                     f"{fmt(rt.get('jpeg_over_ours'))} | {fmt(rt.get('webp_over_ours'))} |")
    lines += ["", "## All points", "", "| dataset | codec | setting | bytes | accuracy |", "|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        for key in ("ours", "jpeg", "webp"):
            for r in d["rows"][key]:
                views = f", {r['augmentation']} x{r['views']} views" if r.get("views") else ""
                setting = (f"beta {r['beta']:g} ({r['transform']} {r['latent_dim']}{views}; on symbols "
                           f"{100 * r['accuracy_on_symbols']:.1f})" if key == "ours" else f"q{r['quality']}")
                lines.append(f"| {name} | {key} | {setting} | {r['bytes']:.1f} | {100 * r['accuracy']:.1f} |")
    ceilings = {n: d["pca_ceiling"] for n, d in report["datasets"].items() if d.get("pca_ceiling")}
    if ceilings:
        ks = sorted({c["k"] for cs in ceilings.values() for c in cs})
        lines += ["", "## How many dimensions the probe needs", "",
                  "Probe accuracy on the top-k principal components of each dataset's own uncompressed embedding "
                  "(a subspace chosen with hindsight, so no zero-shot compressor keeping k numbers does better):", "",
                  "| dataset | uncompressed | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---" * (len(ks) + 2) + "|"]
        for name, cs in ceilings.items():
            acc = {c["k"]: c["accuracy"] for c in cs}
            base = report["datasets"][name]["rows"]["uncompressed"][0]["accuracy"]
            lines.append(f"| {name} | {100 * base:.1f} | " +
                         " | ".join(f"{100 * acc[k]:.1f}" if k in acc else "-" for k in ks) + " |")
    if "int8" in report:
        r = report["int8"]
        lines += ["", "## int8 encoder (ONNX Runtime static quantization, 1 thread)", "",
                  f"Scheme: {r['scheme']}; evaluated on {r['eval']}.", "",
                  "| encoder | accuracy (bundle classifier) | bytes/image | latency b1 (ms) | latency b32 (ms/frame) |",
                  "|---|---|---|---|---|"]
        for k in ("fp32", "int8"):
            lines.append(f"| {k} | {100 * r[k]['accuracy']:.1f} | {r[k]['bytes_per_image']:.1f} | "
                         f"{r[k]['latency_b1_ms']:.2f} | {r[k]['latency_b32_ms']:.2f} |")
        lines += ["", f"Symbol agreement {100 * r['symbol_agreement']:.1f}% (within +-1: "
                      f"{100 * r['symbols_within_1']:.1f}%), accuracy drop {r['accuracy_drop_points']:.2f} points, "
                      f"latency int8/fp32 {r['latency_ratio_b1']:.2f} (b1), {r['latency_ratio_b32']:.2f} (b32)."]
    for extra in report.get("notes", []):
        lines += ["", extra]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(report, out_dir / f"{stem}.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = report["datasets"][name]
        base = d["rows"]["uncompressed"][0]["accuracy"]
        series = {"ours, augmented views": [r for r in d["rows"]["ours"] if r.get("views")],
                  "ours, plain": [r for r in d["rows"]["ours"] if not r.get("views")],
                  "jpeg": d["rows"]["jpeg"], "webp": d["rows"]["webp"]}
        for (label, rows), style in zip(series.items(), ("o-", "o--", "s-", "^-")):
            if rows:
                rows = sorted(rows, key=lambda r: r["bytes"])
                ax.plot([r["bytes"] for r in rows], [100 * r["accuracy"] for r in rows], style, label=label)
        ax.axhline(100 * base, color="gray", ls="--", label="uncompressed")
        ax.axhline(100 * (base - report["tolerance_points"] / 100), color="gray", ls=":", label="-1 point")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image")
        ax.set_ylabel("probe accuracy (%)")
        ax.set_title(f"{name} (n={d['n']})")
        ax.legend(fontsize=8)
    fig.suptitle(f"Frozen {report['backbone']} @ {report['size']}px, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
