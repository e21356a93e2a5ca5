"""Rate-accuracy sweeps: train one run per (objective, invariances, beta), add shipped bundles, or collect existing
runs, into sweep.{json,md,png}.

The plot (actual coded bits per image vs MLP-probe accuracy, one curve per objective + invariance set) is where the
invariance gain shows: at equal accuracy an invariant objective needs fewer bits than the non-invariant codec (VC).
Every point uses the same probe protocol (a probe trained on the integer symbols of all 60k training images, tested on
the 10k test images, real range-coded sizes), so a bundle (whose training run may be gone) is measured exactly like a
run: its ONNX encoder produces the symbols, the probes are refitted the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

COLUMNS = [("objective", "objective"), ("augmentations", "invariances"), ("recipe", "recipe"), ("beta", "beta"),
           ("epochs", "epochs"),
           ("n_train", "train imgs"), ("coded_bits_mean", "coded bits/img"), ("estimated_bits_model", "est. bits/img"),
           ("accuracy_linear", "linear acc"), ("accuracy_mlp", "MLP acc"), ("train_time_s", "train s"),
           ("n_test", "test imgs"), ("run", "run")]
GAIN_COLUMNS = [("series", "series"), ("beta", "beta"), ("coded_bits_mean", "coded bits/img"),
                ("accuracy_mlp", "MLP acc"), ("vc_bits_at_equal_accuracy", "VC bits at equal acc"),
                ("ratio_to_vc", "bits / VC bits")]
RAW_CNN_ACCURACY = 0.9212  # supervised CNN on raw pixels, full data (bench/results/classical.json "baseline")


def raw_cnn_accuracy(classical_json: str | Path | None, data: str | Path | None = None) -> float | None:
    """The supervised raw-pixel CNN's accuracy the curves are judged against: the fully trained baseline of a
    ``taskcodec bench classical`` result on the same data; plain Fashion-MNIST falls back to the committed figure."""
    from taskcodec.data import FASHION, parse_data

    if classical_json is not None:
        result = json.loads(Path(classical_json).read_text())
        if not result.get("baseline"):
            raise ValueError(f"{classical_json} has no fully trained raw-pixel baseline (run it with --baseline-epochs)")
        return float(result["baseline"]["accuracy"])
    return RAW_CNN_ACCURACY if parse_data(data).kind == FASHION else None


def run_name(objective: str, beta: float, augmentations: str | None = None, options: dict | None = None) -> str:
    if augmentations is None:
        return f"{objective}_beta{beta:g}"
    def text(v) -> str:
        if isinstance(v, (list, tuple)):
            return "x".join(text(x) for x in v)
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)

    extra = "".join(f"-{k}{text(v)}" for k, v in sorted((options or {}).items()))
    return f"{objective}-{augmentations.replace('+', '_')}{extra}_beta{beta:g}"


# the training-config keys a bundle row copies from its manifest for recipe() (a run's metrics.json has them)
BUNDLE_RECIPE_KEYS = ("head_layers", "batch_size", "temperature", "beta_warmup", "conv_depth", "views")


def recipe(row: dict) -> str:
    """What differs from the default recipe (projection head, batch 256, temperature 0.1, no rate warm-up)."""
    parts = []
    if row.get("objective") == "bince" and row.get("head_layers", 2) == 0:
        parts.append("no head")
    if row.get("batch_size", 256) != 256:
        parts.append(f"batch {row['batch_size']}")
    if row.get("objective") == "bince" and row.get("temperature", 0.1) != 0.1:
        parts.append(f"T={row['temperature']:g}")
    if row.get("beta_warmup", 0.0):
        parts.append(f"β warm-up {row['beta_warmup']:g}")
    if row.get("conv_depth", 1) != 1:
        parts.append(f"{row['conv_depth']} convs/stage")
    if list(row.get("channels", (32, 64, 128))) != [32, 64, 128]:
        parts.append("channels " + "/".join(str(c) for c in row["channels"]))
    if row.get("latent_dim", 64) != 64:
        parts.append(f"{row['latent_dim']}-d latent")
    if row.get("views", 2) != 2:
        parts.append(f"{row['views']} views/image")
    if row.get("seed", 0):  # a repeat of a recipe with another seed: how far one run's number is from noise
        parts.append(f"seed {row['seed']}")
    return ", ".join(parts)


def series_label(row: dict) -> str:
    if row.get("series"):
        return row["series"]
    extra = recipe(row)
    return f"{row['objective'].upper()} ({row['augmentations']}{', ' + extra if extra else ''})"


def parse_series(specs: list[str]) -> list[tuple]:
    """'bince:views' -> ('bince', 'views'); a bare objective gets fashion+label (bince) or fashion (vic, vc).

    A spec may add space-separated KEY=VALUE config overrides for that series only, and its own rate weights:
    'bince:views head_layers=0 betas=0.001,0.003' -> ('bince', 'views', {'head_layers': 0}, [0.001, 0.003]).
    Specs without extras stay (objective, augmentations) pairs.
    """
    out = []
    for spec in specs:
        head, *extras = spec.split()
        obj, _, aug = head.partition(":")
        aug = aug or ("fashion+label" if obj == "bince" else "fashion")
        options, betas = {}, None
        for item in extras:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"series option {item!r} is not KEY=VALUE")
            if key == "betas":
                betas = [float(b) for b in value.split(",") if b]
            else:
                try:
                    options[key] = json.loads(value)
                except json.JSONDecodeError:
                    options[key] = value
        out.append((obj, aug) if not extras else (obj, aug, options, betas))
    return out


def _row_from_run(run: Path) -> dict:
    from taskcodec.training.trainer import RunError

    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{run} has no metrics.json: not a finished run folder")
    row = json.loads(metrics_path.read_text())
    if (run / "evaluation.json").is_file():  # the full-test-set real-coder numbers win where they exist
        ev = json.loads((run / "evaluation.json").read_text())
        row.update({k: ev[k] for k in ("coded_bits_mean", "accuracy_mlp", "accuracy_linear", "n_test") if k in ev})
    row["run"] = str(run)
    if (run / "config.json").is_file():  # metrics.json does not repeat the seed
        row.setdefault("seed", json.loads((run / "config.json").read_text()).get("seed", 0))
    if (run / "data.json").is_file():
        row["data"] = json.loads((run / "data.json").read_text()).get("data")
    return row


def probe_accuracies(s_tr: np.ndarray, y_tr: np.ndarray, s_te: np.ndarray, y_te: np.ndarray, epochs: int = 30,
                     hidden: int = 512, seed: int = 0) -> dict:
    """The probe protocol of :func:`taskcodec.training.trainer.train`: linear and MLP probes on integer symbols."""
    from taskcodec.training.probes import accuracy, fit_probe

    linear = fit_probe(s_tr, y_tr, hidden=0, epochs=epochs, seed=seed)
    mlp = fit_probe(s_tr, y_tr, hidden=hidden, epochs=epochs, lr=3e-3, seed=seed)
    return {"accuracy_linear": accuracy(linear, s_te, y_te), "accuracy_mlp": accuracy(mlp, s_te, y_te)}


def bundle_row(bundle_path: str | Path, data_dir: str | Path | None = None, cache: Path | None = None) -> dict:
    """Measure a shipped bundle with the sweep's protocol: ONNX encoder on all train/test images, probes refitted on
    the 60k training symbols, real range-coded sizes of the 10k test symbols with the bundle's tables."""
    import torch

    from taskcodec.bundle import load_bundle
    from taskcodec.data import load_frames, parse_data
    from taskcodec.providers import ort_session, run_batched
    from taskcodec.training.trainer import coded_bits

    bundle = load_bundle(bundle_path)
    if cache is not None and cache.is_file():
        row = json.loads(cache.read_text())
        if row.get("model_id") == bundle.model_id:
            return _bundle_series(row, bundle, bundle_path)
    torch.set_num_threads(1)
    train_set, test_set = load_frames(data_dir, "train"), load_frames(data_dir, "test")
    xtr, ytr, xte, yte = train_set.frames, train_set.labels, test_set.frames, test_set.labels
    s_tr = run_batched(ort_session(bundle.encoder_path()), xtr).astype(np.int32)
    s_te = run_batched(ort_session(bundle.encoder_path()), xte).astype(np.int32)
    cfg = bundle.manifest.get("training", {}).get("config", {})
    coded = coded_bits(s_te, bundle.tables)
    row = {"objective": bundle.manifest.get("objective", "?"),
           "augmentations": bundle.manifest.get("invariances", {}).get("name", "?"),
           "beta": bundle.manifest.get("beta", cfg.get("beta")), "epochs": cfg.get("epochs"),
           "n_train": cfg.get("train_subset") or len(xtr), "n_probe_train": len(xtr), "n_test": len(xte),
           "coded_bits_mean": float(coded.mean()), "coded_bits_p95": float(np.percentile(coded, 95)),
           "estimated_bits_model": float(bundle.tables.estimated_bits(s_te).mean()),
           **probe_accuracies(s_tr, ytr, s_te, yte, cfg.get("probe_epochs", 30), cfg.get("probe_hidden", 512)),
           "train_time_s": bundle.manifest.get("training", {}).get("metrics", {}).get("train_time_s"),
           "run": f"bundle {bundle_path}", "model_id": bundle.model_id, "data": str(parse_data(data_dir)),
           **{k: cfg[k] for k in BUNDLE_RECIPE_KEYS if k in cfg}}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(row, indent=2))
    return _bundle_series(row, bundle, bundle_path)


def _bundle_series(row: dict, bundle, bundle_path) -> dict:
    """A bundle is its own point on the plot (its training protocol differs from the sweep's runs)."""
    cfg = bundle.manifest.get("training", {}).get("config", {})
    row.update({k: cfg[k] for k in BUNDLE_RECIPE_KEYS if k in cfg})
    row["series"] = (f"bundle {bundle.manifest.get('name', Path(bundle_path).name)}: {row['objective'].upper()} "
                     f"({row['augmentations']}{', ' + recipe(row) if recipe(row) else ''}), {row['epochs']} epochs "
                     f"on {row['n_train']}")
    return row


def bits_at_accuracy(points: list[dict], acc: float) -> float | None:
    """Coded bits a curve needs for ``acc``: log-linear interpolation between its two neighbouring points on the
    upper envelope (None outside the curve's accuracy range)."""
    pts = sorted(((p["coded_bits_mean"], p["accuracy_mlp"]) for p in points))
    env, best = [], -1.0
    for b, a in pts:  # keep only points that improve accuracy as bits grow
        if a > best:
            env.append((b, a))
            best = a
    for (b0, a0), (b1, a1) in zip(env, env[1:]):
        if a0 <= acc <= a1:
            t = (acc - a0) / (a1 - a0) if a1 > a0 else 0.0
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    if env and abs(env[0][1] - acc) < 1e-12:
        return env[0][0]
    return None


def gains(rows: list[dict], reference: str = "vc") -> list[dict]:
    """For every point of a non-reference series: the reference (VC) curve's bits at the same accuracy, and the ratio."""
    ref = [r for r in rows if r["objective"] == reference]
    out = []
    for r in rows:
        if r["objective"] == reference or r.get("series", "").startswith("bundle"):
            continue  # bundles were trained with another protocol than the sweep's VC runs
        vc_bits = bits_at_accuracy(ref, r["accuracy_mlp"]) if ref else None
        out.append({"series": series_label(r), "beta": r["beta"], "coded_bits_mean": r["coded_bits_mean"],
                    "accuracy_mlp": r["accuracy_mlp"], "vc_bits_at_equal_accuracy": vc_bits,
                    "ratio_to_vc": (r["coded_bits_mean"] / vc_bits) if vc_bits else None})
    return out


def bits_at_reference_points(rows: list[dict], reference: str = "vc") -> list[dict]:
    """The other direction of :func:`gains`: at each reference (VC) point's accuracy, the bits each other series
    needs (interpolated on its own curve) — it still gives a ratio where a series outruns the whole VC curve.
    Series of one point have no curve to read and are left out."""
    ref = sorted((r for r in rows if r["objective"] == reference), key=lambda r: r["coded_bits_mean"])
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["objective"] != reference and not r.get("series", "").startswith("bundle"):
            groups.setdefault(series_label(r), []).append(r)
    groups = {label: pts for label, pts in groups.items() if len(pts) >= 2}
    out = []
    for v in ref:
        for label, pts in sorted(groups.items()):
            bits = bits_at_accuracy(pts, v["accuracy_mlp"])
            out.append({"reference_beta": v["beta"], "reference_bits": v["coded_bits_mean"],
                        "accuracy_mlp": v["accuracy_mlp"], "series": label, "series_bits": bits,
                        "ratio_to_vc": bits / v["coded_bits_mean"] if bits else None})
    return out


REVERSE_COLUMNS = [("reference_beta", "VC beta"), ("reference_bits", "VC bits/img"), ("accuracy_mlp", "MLP acc"),
                   ("series", "series"), ("series_bits", "series bits at that acc"), ("ratio_to_vc", "bits / VC bits")]


def collect(runs: list[str | Path], out: str | Path, extra_rows: list[dict] | None = None, note: str = "",
            classical_json: str | Path | None = None) -> dict:
    """Read metrics.json (and evaluation.json where present) of each run, plus measured bundle rows; write
    sweep.{json,md,png} into out. The accuracy line is the raw-pixel CNN of the rows' own data
    (:func:`raw_cnn_accuracy`; none for rows of several datasets unless ``classical_json`` names one)."""
    from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text

    rows = [_row_from_run(Path(run)) for run in runs] + list(extra_rows or [])
    for r in rows:
        r["recipe"] = recipe(r)
    rows.sort(key=lambda r: (r.get("objective", ""), r.get("augmentations", ""), r.get("beta", 0)))
    out = Path(out)
    gain_rows = gains(rows)
    reverse_rows = bits_at_reference_points(rows)
    datasets = sorted({str(r.get("data") or "fashion-mnist") for r in rows})
    raw_cnn = raw_cnn_accuracy(classical_json, datasets[0]) if len(datasets) == 1 or classical_json else None
    result = {"measured_at": utc_now(), "machine": machine_info(), "note": note, "rows": rows, "gains_vs_vc": gain_rows,
              "bits_at_vc_points": reverse_rows, "datasets": datasets, "raw_pixel_cnn_accuracy": raw_cnn,
              "probe_protocol": "linear and MLP (512 hidden) probes, 30 epochs, on the integer symbols of the 60k "
                                "training images (n_probe_train); accuracy on the 10k test images"}
    write_json(out / "sweep.json", result)
    fmt = {"coded_bits_mean": ".1f", "estimated_bits_model": ".1f", "accuracy_linear": ".4f", "accuracy_mlp": ".4f",
           "train_time_s": ".0f", "vc_bits_at_equal_accuracy": ".1f", "ratio_to_vc": ".2f"}
    md = ("# Rate-accuracy sweep\n\nCoded bits are real range-coded stream sizes (16-bit check + byte-terminated "
          "range-coder payload) on the test set; accuracy is a probe trained on the integer symbols "
          f"({result['probe_protocol']}).{(' ' + note) if note else ''}\n\n"
          + markdown_table(rows, COLUMNS, fmt)
          + "\n## Bits against VC at equal accuracy\n\nVC bits interpolated log-linearly on the VC curve at each point's "
            "MLP accuracy (empty: outside the VC curve's range).\n\n"
          + markdown_table(gain_rows, GAIN_COLUMNS, fmt)
          + ("\nAnd at each VC point's accuracy, the bits each other series needs on its own curve (empty: outside "
             "that curve's range; this direction still gives a ratio where a series outruns the whole VC curve).\n\n"
             + markdown_table(reverse_rows, REVERSE_COLUMNS, {**fmt, "reference_bits": ".1f", "series_bits": ".1f"})
             if any(r["series_bits"] for r in reverse_rows) else "")
          + (f"\nSupervised raw-pixel CNN on the same data (`taskcodec bench classical` baseline): {100 * raw_cnn:.2f} %."
             if raw_cnn is not None else "\nNo raw-pixel CNN measured on this data.")
          + f" Data: {', '.join(datasets)}.\n\n{machine_line(result['machine'])}\n")
    write_text(out / "sweep.md", md)
    plot(rows, out / "sweep.png", machine_line(result["machine"]), raw_cnn, datasets)
    return result


def plot(rows: list[dict], path: Path, caption: str = "", raw_cnn: float | None = RAW_CNN_ACCURACY,
         datasets: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    runs = [r for r in rows if not str(r.get("run", "")).startswith("bundle")]
    protocols = {(r.get("epochs"), r.get("n_train")) for r in runs}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = series_label(r)
        if len(protocols) > 1 and r in runs:  # a curve joins runs of one training length only
            label += f" — {r.get('epochs')} epochs"
        groups.setdefault(label, []).append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["coded_bits_mean"])
        style = "*" if label.startswith("bundle") else "o-"
        ax.plot([r["coded_bits_mean"] for r in rs], [100 * r["accuracy_mlp"] for r in rs], style, label=label,
                markersize=10 if style == "*" else 5)
        for r in rs:
            tag = f"β={r['beta']:g}"
            ax.annotate(tag, (r["coded_bits_mean"], 100 * r["accuracy_mlp"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    if raw_cnn is not None:
        ax.axhline(100 * raw_cnn, color="gray", ls="--", lw=0.8)
        ax.axhline(100 * raw_cnn - 2, color="gray", ls=":", lw=0.8)
        ax.text(ax.get_xlim()[0], 100 * raw_cnn, " raw-pixel CNN (6272 bits) / −2 points", fontsize=6,
                va="bottom", color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("actual coded bits per image (mean, log scale)")
    ax.set_ylabel("MLP probe accuracy on symbols (%)")
    sub = (f"\ncurves: {runs[0].get('epochs')} epochs on {runs[0].get('n_train')} training images each"
           f"{'; ★ shipped bundles (own training)' if len(runs) < len(rows) else ''}" if len(protocols) == 1 and runs
           else "")
    title = "placed Fashion-MNIST" if datasets == ["fashion-mnist-placed"] else "Fashion-MNIST"
    ax.set_title(f"{title}: rate vs downstream accuracy" + sub, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if caption:
        fig.text(0.01, 0.01, caption[:160], fontsize=5)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(objectives: list[str] | list[tuple], betas: list[float], out: str | Path,
          data_dir: str | Path | None = None, progress: bool = True, bundles: list[str | Path] | None = None,
          note: str = "", runs_dir: str | Path | None = None, classical_json: str | Path | None = None,
          **overrides) -> dict:
    """Train one run per (series, beta) into runs_dir/<name>/ (default: out; reusing finished ones), measure bundles,
    then collect into out.

    ``objectives``: plain objective names (with ``overrides['augmentations']`` or the per-objective default), or
    series from :func:`parse_series`: (objective, augmentations[, options, betas]) for several invariance sets and
    recipes in one sweep.
    """
    from taskcodec.training.defaults import default_config
    from taskcodec.training.trainer import train

    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir else out
    series = []
    for item in objectives:
        if isinstance(item, tuple):
            obj, aug, options, own_betas = (tuple(item) + ({}, None))[:4]
            series.append((obj, aug, True, options or {}, own_betas or betas))
        else:
            aug = overrides.get("augmentations")
            if aug is None and item != "bince":
                aug = "fashion"  # reconstruction objectives have no label positives
            series.append((item, aug, False, {}, betas))
    runs = []
    for objective, aug, named, options, series_betas in series:
        for beta in series_betas:
            name = run_name(objective, beta, aug, options) if named else run_name(objective, beta)
            run = runs_dir / name
            if not (run / "metrics.json").is_file():
                cfg = default_config(**{**overrides, **options, "objective": objective, "beta": beta,
                                        "augmentations": aug})
                train(cfg, data_dir=data_dir, out=run, progress=progress)
            runs.append(run)
    extra = [bundle_row(b, data_dir, cache=out / f"bundle_{Path(b).name}.json") for b in (bundles or [])]
    return collect(runs, out, extra, note, classical_json)
