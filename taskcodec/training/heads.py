"""`taskcodec heads train|list|curve`: new tasks after the fact, trained on the latents a server has stored.

``heads train --task NAME --labels FILE.csv --db SERVER.db`` reads the labelled frames' payloads from the server
database, decodes them with the bundle's tables (never pixels: the server never had any), fits a logistic regression
or a small MLP with scikit-learn on the standardised symbols, stores the head in the database's ``heads`` table
(server/heads.py), and labels every stored frame with it; a running server picks the head up on its next batch and
labels new frames too.

The labels CSV has a header with ``camera_id``, ``seq``, ``label`` and optionally ``epoch`` (default: any epoch of that
camera and seq).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from taskcodec.bundle import load_bundle
from taskcodec.server.heads import Head, HeadError, HeadStore, decode_payloads, relabel

KINDS = ("logistic", "mlp")


def read_labels(path: str | Path) -> list[tuple[str, int | None, int, str]]:
    """(camera_id, epoch or None, seq, label) rows of a labels CSV."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"camera_id", "seq", "label"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise HeadError(f"{path}: the header must name camera_id, seq and label (optionally epoch); got "
                            f"{reader.fieldnames}")
        rows = []
        for r in reader:
            epoch = r.get("epoch")
            rows.append((r["camera_id"], int(epoch) if epoch not in (None, "") else None, int(r["seq"]),
                         str(r["label"])))
    if not rows:
        raise HeadError(f"{path} has no labelled rows")
    return rows


def labelled_symbols(store: HeadStore, bundle, labels: list[tuple[str, int | None, int, str]]):
    """Decode the stored payloads of the labelled frames -> (symbols [N, D], labels [N], keys)."""
    want: dict[tuple[str, int], list[tuple[int | None, str]]] = {}
    for cam, epoch, seq, lab in labels:
        want.setdefault((cam, seq), []).append((epoch, lab))
    keys, ys, payloads = [], [], []
    for cam, epoch, seq, payload in store.payloads(bundle.model_id):
        for e, lab in want.get((cam, seq), []):
            if e is None or e == epoch:
                keys.append((cam, epoch, seq))
                ys.append(lab)
                payloads.append(payload)
                break
    symbols, ok = decode_payloads(bundle, payloads)
    keys = [k for k, good in zip(keys, ok) if good]
    ys = np.array([y for y, good in zip(ys, ok) if good])
    return symbols, ys, keys


def fit_head(name: str, model_id: str, symbols: np.ndarray, labels: np.ndarray, kind: str = "logistic",
             seed: int = 0, hidden: int = 64) -> Head:
    """scikit-learn fit on standardised symbols, exported as plain weights for the server's numpy inference."""
    if kind not in KINDS:
        raise HeadError(f"kind must be one of {KINDS}, got {kind!r}")
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise HeadError(f"head {name!r} needs at least two distinct labels, got {classes}")
    x = symbols.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    xs = (x - mean) / std
    y = np.searchsorted(classes, labels)
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(xs, y)
        w, b = clf.coef_.T, clf.intercept_
        if len(classes) == 2:  # sklearn's binary model has one logit: softmax over (0, z) is the same model
            w, b = np.concatenate([np.zeros_like(w), w], 1), np.concatenate([[0.0], b])
        layers = [(w, b)]
    else:
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500, early_stopping=len(y) >= 200,
                            random_state=seed).fit(xs, y)
        layers = list(zip(clf.coefs_, clf.intercepts_))
        if len(classes) == 2:
            w, b = layers[-1]
            layers[-1] = (np.concatenate([np.zeros_like(w), w], 1), np.concatenate([[0.0], b]))
    return Head(name, model_id, kind, [str(c) for c in classes], mean, std, layers)


def train_head(db: str | Path, labels_csv: str | Path, task: str, bundle_path: str | Path | None = None,
               kind: str = "logistic", limit: int | None = None, seed: int = 0) -> dict:
    """Fit, register and apply a head; returns a small report (labels used, training accuracy, frames labelled)."""
    bundle = load_bundle(bundle_path)
    store = HeadStore(db)
    try:
        labels = read_labels(labels_csv)
        symbols, y, keys = labelled_symbols(store, bundle, labels)
        if limit:
            symbols, y, keys = symbols[:limit], y[:limit], keys[:limit]
        if len(y) == 0:
            raise HeadError(f"none of the {len(labels)} labelled frames is stored with model {bundle.model_id}")
        head = fit_head(task, bundle.model_id, symbols, y, kind, seed)
        idx, _ = head.predict(symbols)
        store.register(head, len(y))
        n = relabel(store, bundle, head)
        n += relabel(store, bundle, head, only_missing=True)  # frames stored while the first pass ran
        return {"task": task, "kind": kind, "model_id": bundle.model_id, "labels_in_csv": len(labels),
                "labels_used": int(len(y)), "classes": head.classes,
                "train_accuracy": float((np.array(head.classes)[idx] == y).mean()), "frames_labelled": n}
    finally:
        store.close()


heads_app = typer.Typer(help="Heads: new tasks trained on the latents a server has stored.", no_args_is_help=True)


@heads_app.command("train")
def train_cmd(
    task: str = typer.Option(..., "--task", help="head name (the task), e.g. footwear."),
    labels: Path = typer.Option(..., "--labels", help="CSV with camera_id, seq, label (optionally epoch)."),
    db: Path = typer.Option(Path("taskcodec.db"), "--db", help="the server's SQLite database."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="the server's bundle (default: the embedded one)."),
    kind: str = typer.Option("logistic", "--kind", help="logistic or mlp."),
    limit: Optional[int] = typer.Option(None, "--limit", min=2, help="use only the first N labelled frames."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a head on stored latents, register it with the server database and label every stored frame."""
    try:
        r = train_head(db, labels, task, bundle, kind, limit, seed)
    except (HeadError, OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"head {r['task']!r} ({r['kind']}, {len(r['classes'])} classes) trained on {r['labels_used']} stored "
               f"frames (train accuracy {r['train_accuracy']:.4f}); labelled {r['frames_labelled']} stored frames; "
               f"a running server applies it to new frames")


@heads_app.command("list")
def list_cmd(db: Path = typer.Option(Path("taskcodec.db"), "--db")) -> None:
    """The heads registered in a server database."""
    import json

    try:
        store = HeadStore(db)
    except HeadError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for h in store.list():
        typer.echo(json.dumps(h))
    store.close()


def register(app: typer.Typer) -> None:
    app.add_typer(heads_app, name="heads")
