"""Rate-accuracy sweeps: train one run per (objective, beta), or collect existing runs, into sweep.{json,md,png}.

The plot (actual coded bits per image vs MLP-probe accuracy, one curve per objective) is where the invariance gain
shows: at equal accuracy the invariant objective (BINCE) needs far fewer bits than the non-invariant codec (VC).
"""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [("objective", "objective"), ("augmentations", "invariances"), ("beta", "beta"), ("epochs", "epochs"),
           ("coded_bits_mean", "coded bits/img"), ("estimated_bits_model", "est. bits/img"),
           ("accuracy_linear", "linear acc"), ("accuracy_mlp", "MLP acc"), ("train_time_s", "train s"),
           ("n_test", "test imgs"), ("run", "run")]


def run_name(objective: str, beta: float) -> str:
    return f"{objective}_beta{beta:g}"


def collect(runs: list[str | Path], out: str | Path) -> dict:
    """Read metrics.json (and evaluation.json where present) of each run; write sweep.{json,md,png} into out."""
    from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text
    from taskcodec.training.trainer import RunError

    rows = []
    for run in runs:
        run = Path(run)
        metrics_path = run / "metrics.json"
        if not metrics_path.is_file():
            raise RunError(f"{run} has no metrics.json: not a finished run folder")
        row = json.loads(metrics_path.read_text())
        if (run / "evaluation.json").is_file():  # the full-test-set real-coder numbers win where they exist
            ev = json.loads((run / "evaluation.json").read_text())
            row.update({k: ev[k] for k in ("coded_bits_mean", "accuracy_mlp", "accuracy_linear", "n_test") if k in ev})
        row["run"] = str(run)
        rows.append(row)
    rows.sort(key=lambda r: (r.get("objective", ""), r.get("beta", 0)))
    out = Path(out)
    result = {"measured_at": utc_now(), "machine": machine_info(), "rows": rows}
    write_json(out / "sweep.json", result)
    md = ("# Rate-accuracy sweep\n\nCoded bits are real range-coded stream sizes (16-bit check + byte-terminated range-coder payload) on the "
          "test set; accuracy is a probe trained on the integer symbols.\n\n"
          + markdown_table(rows, COLUMNS, {"coded_bits_mean": ".1f", "estimated_bits_model": ".1f",
                                           "accuracy_linear": ".4f", "accuracy_mlp": ".4f", "train_time_s": ".0f"})
          + f"\n{machine_line(result['machine'])}\n")
    write_text(out / "sweep.md", md)
    plot(rows, out / "sweep.png", machine_line(result["machine"]))
    return result


def plot(rows: list[dict], path: Path, caption: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['objective'].upper()} ({r['augmentations']})", []).append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["coded_bits_mean"])
        ax.plot([r["coded_bits_mean"] for r in rs], [100 * r["accuracy_mlp"] for r in rs], "o-", label=label)
        for r in rs:
            ax.annotate(f"β={r['beta']:g}", (r["coded_bits_mean"], 100 * r["accuracy_mlp"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("actual coded bits per image (mean, log scale)")
    ax.set_ylabel("MLP probe accuracy on symbols (%)")
    ax.set_title("Fashion-MNIST: rate vs downstream accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if caption:
        fig.text(0.01, 0.01, caption[:160], fontsize=5)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(objectives: list[str], betas: list[float], out: str | Path, data_dir: str | Path | None = None,
          progress: bool = True, **overrides) -> dict:
    """Train one run per (objective, beta) into out/<objective>_beta<b>/ (reusing finished ones), then collect."""
    from taskcodec.training.defaults import default_config
    from taskcodec.training.trainer import train

    out = Path(out)
    runs = []
    for objective in objectives:
        for beta in betas:
            run = out / run_name(objective, beta)
            if not (run / "metrics.json").is_file():
                aug = overrides.get("augmentations")
                if aug is None and objective != "bince":
                    aug = "fashion"  # reconstruction objectives have no label positives
                cfg = default_config(**{**overrides, "objective": objective, "beta": beta, "augmentations": aug})
                train(cfg, data_dir=data_dir, out=run, progress=progress)
            runs.append(run)
    return collect(runs, out)
