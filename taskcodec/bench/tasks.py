"""`taskcodec bench tasks`: what each representation keeps beyond the 10-class label.

For each representation — raw pixels, JPEG and WebP (decoded pixels, at the smallest files the codecs write unless
told otherwise), and the integer symbols of each bundle (its ONNX encoder, exactly what a camera sends) — the same
probes are trained on the first ``n_train`` training images and tested on the 10k test images:

* ``label``: the 10 Fashion-MNIST classes (MLP probe accuracy);
* ``coarse``: tops (T-shirt, pullover, dress, coat, shirt) / bottoms (trouser) / footwear (sandal, sneaker, ankle
  boot) / bags (MLP probe accuracy);
* within-class attributes measured on the original pixels — item ``size`` (foreground area), mean ``intensity`` of
  the foreground, ``balance`` (left minus right ink over total), ``aspect`` (log bounding-box height / width),
  ``vertical`` position (ink-weighted centroid row): the target is the attribute *minus its class mean* (train-set
  class means), so predicting the class earns nothing; the score is R² on the test images of one multi-output MLP
  regressor (clipped below at 0).

A label-free (task-agnostic) compressor should keep the attributes; a label-supervised one is free to drop them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import typer

COARSE = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])  # tops 0, bottoms 1, footwear 2, bags 3
COARSE_NAMES = ["tops", "bottoms", "footwear", "bags"]
ATTRIBUTES = ("size", "intensity", "balance", "aspect", "vertical")
TASKS = ("label", "coarse") + ATTRIBUTES


def attributes(images: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """uint8 [N, H, W] -> float [N, 5]: size, intensity, balance, aspect, vertical (see the module docstring)."""
    x = images.astype(np.float32) / 255.0
    n, h, w = x.shape
    mask = x > threshold
    area = mask.sum((1, 2)).clip(min=1)
    ink = x.sum((1, 2)).clip(min=1e-6)
    size = mask.mean((1, 2))
    intensity = (x * mask).sum((1, 2)) / area
    balance = (x[:, :, : w // 2].sum((1, 2)) - x[:, :, w - w // 2:].sum((1, 2))) / ink
    rows, cols = mask.any(2), mask.any(1)
    height = np.where(rows.any(1), h - np.argmax(rows[:, ::-1], 1) - np.argmax(rows, 1), 1)
    width = np.where(cols.any(1), w - np.argmax(cols[:, ::-1], 1) - np.argmax(cols, 1), 1)
    aspect = np.log(height.clip(min=1) / width.clip(min=1))
    vertical = (x.sum(2) * np.arange(h)).sum(1) / ink / h
    return np.stack([size, intensity, balance, aspect, vertical], 1).astype(np.float32)


def residual_targets(attr_tr: np.ndarray, y_tr: np.ndarray, attr_te: np.ndarray, y_te: np.ndarray):
    """Subtract the train-set class mean of each attribute (within-class variation only)."""
    means = np.stack([attr_tr[y_tr == c].mean(0) for c in range(10)])
    return attr_tr - means[y_tr], attr_te - means[y_te]


def fit_regressor(x_tr: np.ndarray, t_tr: np.ndarray, x_te: np.ndarray, t_te: np.ndarray, hidden: int = 512,
                  epochs: int = 20, seed: int = 0, batch_size: int = 256, lr: float = 3e-3) -> np.ndarray:
    """Multi-output MLP regressor on standardised features and targets; R² per target on the test set (>= 0)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from taskcodec.training.probes import train_minibatch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x_tr, dtype=torch.float32)
    mu, sd = x.mean(0), x.std(0)
    sd = torch.where(sd > 1e-3, sd, torch.ones_like(sd))  # constant features (blank border pixels) stay unscaled
    tm, ts = t_tr.mean(0), t_tr.std(0) + 1e-9
    t = torch.as_tensor((t_tr - tm) / ts, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, t.shape[1]))
    train_minibatch(net, (x - mu) / sd, t, F.mse_loss, epochs, batch_size, lr, gen)
    with torch.no_grad():
        pred = net((torch.as_tensor(x_te, dtype=torch.float32) - mu) / sd).numpy() * ts + tm
    sse = ((pred - t_te) ** 2).sum(0)
    sst = ((t_te - t_te.mean(0)) ** 2).sum(0)
    return np.clip(1.0 - sse / sst, 0.0, None)


def score(name: str, x_tr: np.ndarray, x_te: np.ndarray, data: dict, epochs: int, bytes_per_image: float,
          note: str = "") -> dict:
    """All tasks for one representation (features [N, D] float or int)."""
    from taskcodec.training.probes import accuracy, fit_probe

    t0 = time.perf_counter()
    y_tr, y_te = data["y_tr"], data["y_te"]
    label = fit_probe(x_tr, y_tr, hidden=512, epochs=epochs, lr=3e-3)
    coarse = fit_probe(x_tr, COARSE[y_tr], hidden=512, epochs=epochs, lr=3e-3, n_classes=4)
    r2 = fit_regressor(x_tr, data["t_tr"], x_te, data["t_te"], epochs=epochs)
    row = {"representation": name, "bytes_per_image": float(bytes_per_image), "dim": int(x_tr.shape[1]),
           "label": accuracy(label, x_te, y_te), "coarse": accuracy(coarse, x_te, COARSE[y_te]),
           **{a: float(v) for a, v in zip(ATTRIBUTES, r2)}, "note": note,
           "probe_seconds": time.perf_counter() - t0}
    row["attributes_mean_r2"] = float(np.mean([row[a] for a in ATTRIBUTES]))
    return row


def bundle_features(bundle_path: str | Path, x_tr: np.ndarray, x_te: np.ndarray):
    """(name, train symbols, test symbols, mean coded bytes per test image, manifest note) of a bundle."""
    from taskcodec.bundle import load_bundle
    from taskcodec.coding import RangeCoder, compress
    from taskcodec.export.golden import run_encoder

    bundle = load_bundle(bundle_path)
    s_tr = run_encoder(bundle.encoder_path(), x_tr[..., None]).astype(np.int32)
    s_te = run_encoder(bundle.encoder_path(), x_te[..., None]).astype(np.int32)
    coder = RangeCoder(bundle.tables)
    coded = np.array([len(compress(s, coder)) for s in s_te], np.float64)
    inv = bundle.manifest.get("invariances", {}).get("name", "?")
    name = f"bundle {bundle.manifest.get('name', Path(bundle_path).name)} ({bundle.manifest.get('objective')}, {inv})"
    return name, s_tr, s_te, float(coded.mean()), f"{bundle_path}; model {bundle.model_id}"


def run_tasks(bundles: Sequence[str | Path], out: str | Path = "bench/results", jpeg: Sequence[int] = (1,),
              webp: Sequence[int] = (0,), train_limit: int | None = 20000, epochs: int = 20, threads: int = 1,
              data_dir: str | Path | None = None, log=print, resume: bool = True) -> dict:
    """Measure every representation on every task; writes tasks.{json,md} into ``out`` (rows already in
    out/tasks.json with the same protocol and, for bundles, the same model id are reused unless ``resume`` is off)."""
    import torch

    from taskcodec.bench.classical import round_trip
    from taskcodec.data import load_fashion_mnist
    from taskcodec.report import machine_info, utc_now, write_json, write_text

    torch.set_num_threads(threads)
    x_tr, y_tr = load_fashion_mnist("train", data_dir)
    x_te, y_te = load_fashion_mnist("test", data_dir)
    if train_limit:
        x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
    t_tr, t_te = residual_targets(attributes(x_tr), y_tr, attributes(x_te), y_te)
    data = {"y_tr": y_tr, "y_te": y_te, "t_tr": t_tr, "t_te": t_te}
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731
    protocol = (f"probes (MLP, 512 hidden, {epochs} epochs, AdamW 3e-3) trained on the first {len(x_tr)} "
                "training images' features, tested on all 10k test images; attributes: R² of the attribute "
                "minus its train-set class mean (clipped at 0), one multi-output regressor")
    out = Path(out)
    done: dict[str, dict] = {}
    if resume and (out / "tasks.json").is_file():  # rows measured with the same protocol are kept
        old = json.loads((out / "tasks.json").read_text())
        if old.get("protocol") == protocol:
            done = {r["representation"]: r for r in old["rows"]}
    rows = []

    def save() -> dict:  # after every row: a crash later keeps what was measured (and --resume reuses it)
        result = {
            "benchmark": "tasks", "dataset": "fashion-mnist", "measured_at": utc_now(), "machine": machine_info(),
            "protocol": protocol,
            "coarse_groups": {n: [i for i in range(10) if COARSE[i] == g] for g, n in enumerate(COARSE_NAMES)},
            "rows": rows + [r for n, r in done.items() if n not in {x["representation"] for x in rows}],
        }
        write_json(out / "tasks.json", result)
        return result

    def add(name, make):
        if name in done:
            rows.append(done[name])
            return
        rows.append(make())
        log(rows[-1])
        save()

    add("raw pixels", lambda: score("raw pixels", flat(x_tr), flat(x_te), data, epochs, x_te[0].size,
                                    "uint8, uncompressed"))
    for codec, qualities in (("jpeg", jpeg), ("webp", webp)):
        for q in qualities:
            def make(codec=codec, q=q):
                rt_tr, rt_te = round_trip(x_tr, codec, q), round_trip(x_te, codec, q)
                return score(f"{codec} q={q}", flat(rt_tr.decoded), flat(rt_te.decoded), data, epochs,
                             float(rt_te.file_bytes.mean()), "decoded pixels; complete files incl. headers")
            add(f"{codec} q={q}", make)
    for b in bundles:
        name, s_tr, s_te, nbytes, note = bundle_features(b, x_tr, x_te)
        if done.get(name, {}).get("note", "").startswith(note):
            rows.append(done[name])
            continue
        rows.append(score(name, s_tr, s_te, data, epochs, nbytes, note + "; range-coded stream incl. 2-byte check"))
        log(rows[-1])
        save()
    done = {}  # the final file holds exactly this call's representations
    result = save()
    write_text(out / "tasks.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    from taskcodec.report import machine_line, markdown_table

    cols = [("representation", "representation"), ("bytes_per_image", "bytes/img"), ("label", "10-class acc"),
            ("coarse", "coarse acc")] + [(a, f"{a} R²") for a in ATTRIBUTES] + [("attributes_mean_r2", "mean R²")]
    fmt = {"bytes_per_image": ".1f", "label": ".4f", "coarse": ".4f", "attributes_mean_r2": ".3f",
           **{a: ".3f" for a in ATTRIBUTES}}
    return ("# Multi-task evaluation (Fashion-MNIST)\n\n"
            f"{result['protocol']}. Coarse groups: "
            + ", ".join(f"{k} {v}" for k, v in result["coarse_groups"].items()) + ".\n\n"
            + markdown_table(result["rows"], cols, fmt) + f"\n{machine_line(result['machine'])}\n")


def tasks_cmd(
    bundle: list[Path] = typer.Option(None, "--bundle", help="repeatable bundle folder (default: the embedded "
                                      "default bundle and taskcodec/bundles/task_agnostic if present)."),
    jpeg: list[int] = typer.Option([1], "--jpeg", help="repeatable JPEG quality (default 1: the smallest file)."),
    webp: list[int] = typer.Option([0], "--webp", help="repeatable WebP quality (default 0: the smallest file)."),
    train_limit: int = typer.Option(20000, "--train-limit", min=100, help="probe training images (first N)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="probe epochs."),
    threads: int = typer.Option(1, "--threads", min=1),
    data: Path = typer.Option(None, "--data", help="Fashion-MNIST folder (default: system dataset)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="folder for tasks.{json,md}."),
    label_counts: list[int] = typer.Option(None, "--label-curve", help="repeatable n: instead, accuracy of a "
                                           "logistic head trained on n labels (heads_curve.{json,md})."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="reuse rows of OUT/tasks.json measured the same "
                                "way (same protocol; bundles: same path and model id)."),
) -> None:
    """The 10-class label, a coarse grouping and within-class attributes from raw pixels, JPEG, WebP and bundles."""
    from taskcodec.bundle import DEFAULT_BUNDLE

    if not bundle:
        agnostic = Path(__file__).resolve().parents[1] / "bundles" / "task_agnostic"
        bundle = [DEFAULT_BUNDLE] + ([agnostic] if (agnostic / "manifest.json").is_file() else [])
    if label_counts:
        label_curve(bundle, out, sorted(label_counts), data_dir=data,
                    log=lambda r: typer.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in r.items() if not k.startswith("seconds"))))
        typer.echo(f"wrote {out / 'heads_curve.json'}, {out / 'heads_curve.md'}")
        return
    result = run_tasks(bundle, out, jpeg, webp, train_limit, epochs, threads, data, resume=resume,
                       log=lambda r: typer.echo(f"{r['representation']}: label {r['label']:.4f} coarse "
                                                f"{r['coarse']:.4f} mean R² {r['attributes_mean_r2']:.3f}"))
    typer.echo(f"wrote {out / 'tasks.json'}, {out / 'tasks.md'} ({len(result['rows'])} representations)")


def label_curve(bundles: Sequence[str | Path], out: str | Path = "bench/results", ns: Sequence[int] = (100, 1000, 10000),
                kind: str = "logistic", data_dir: str | Path | None = None, log=print) -> dict:
    """A head (the product's `taskcodec heads train` fit: training.heads.fit_head) trained on the first n labelled
    training images, from each bundle's symbols and from raw pixels of the same images; 10-class accuracy on the 10k
    test images. Writes heads_curve.{json,md}."""
    from taskcodec.data import load_fashion_mnist
    from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text
    from taskcodec.training.heads import fit_head

    x_tr, y_tr = load_fashion_mnist("train", data_dir)
    x_te, y_te = load_fashion_mnist("test", data_dir)
    n_max = max(ns)
    x_tr, y_tr = x_tr[:n_max], y_tr[:n_max]
    reps = [("raw pixels", x_tr.reshape(n_max, -1), x_te.reshape(len(x_te), -1), 784.0)]
    for b in bundles:
        name, s_tr, s_te, nbytes, _ = bundle_features(b, x_tr, x_te)
        reps.append((name, s_tr, s_te, nbytes))
    rows = []
    for name, f_tr, f_te, nbytes in reps:
        row = {"representation": name, "bytes_per_image": nbytes}
        for n in ns:
            t0 = time.perf_counter()
            head = fit_head("label", "-", f_tr[:n], y_tr[:n].astype(str), kind)
            idx, _ = head.predict(f_te)
            row[f"acc_{n}"] = float((np.array(head.classes)[idx] == y_te.astype(str)).mean())
            row[f"seconds_{n}"] = time.perf_counter() - t0
        rows.append(row)
        log(row)
    result = {"benchmark": "heads_curve", "measured_at": utc_now(), "machine": machine_info(), "kind": kind,
              "protocol": f"{kind} head (training.heads.fit_head: standardised features, scikit-learn) on the first n "
                          "training images' features; 10-class accuracy on the 10k test images", "rows": rows}
    out = Path(out)
    write_json(out / "heads_curve.json", result)
    cols = [("representation", "representation"), ("bytes_per_image", "bytes/img")] + [(f"acc_{n}", f"{n} labels")
                                                                                       for n in ns]
    write_text(out / "heads_curve.md", "# Accuracy against the number of labels\n\n" + result["protocol"] + ".\n\n"
               + markdown_table(rows, cols, {"bytes_per_image": ".1f", **{f"acc_{n}": ".4f" for n in ns}})
               + f"\n{machine_line(result['machine'])}\n")
    return result
