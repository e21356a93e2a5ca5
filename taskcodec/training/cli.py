"""Commands: `taskcodec train`, `taskcodec evaluate RUN`, `taskcodec sweep`. torch is imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


DATA_HELP = ("training data: fashion-mnist[:DIR] (default), fashion-mnist-placed[:DIR] (items at random placements, "
             "the paper's augmented-data protocol), folder:PATH (one sub-folder per class, ImageFolder "
             "layout; PATH/train + PATH/test if split) or csv:FILE (rows path,label[,split]).")
FOLDER_IMAGE_SIZE = 64


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _errors() -> tuple:
    from taskcodec.data import DataError
    from taskcodec.training.trainer import RunError

    return (DataError, RunError, ValueError, FileNotFoundError)


def _betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"--betas wants comma-separated numbers, got {text!r}") from None
    if not betas or any(b < 0 for b in betas):
        raise typer.BadParameter("--betas wants at least one non-negative number")
    return betas


def _options(items: Optional[List[str]]) -> dict:
    """KEY=VALUE config overrides (values parsed as JSON where they parse: numbers, true/false, lists)."""
    import json

    from dataclasses import fields

    from taskcodec.training.models import CompressorConfig

    known = {f.name for f in fields(CompressorConfig)}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in known:
            raise typer.BadParameter(f"--set wants KEY=VALUE with KEY one of {', '.join(sorted(known))}; got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def train_cmd(
    objective: str = typer.Option("bince", "--objective", help="bince (invariant), vic or vc (reconstruction)."),
    beta: Optional[float] = typer.Option(None, "--beta", min=0.0, help="rate weight (default: training.defaults)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0),
    augmentations: Optional[str] = typer.Option(
        None, "--augmentations", help="invariance set: none, geometric, photometric, fashion, fashion+label."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (shared CPU: 1 or 2)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", min=2, help="use the first N train images."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="evaluate on the first N test images."),
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", min=8, max=512, help="square input side in pixels (default: 28 for Fashion-MNIST, "
        f"{FOLDER_IMAGE_SIZE} for folder:/csv: data); every image is resized to it, as the runtime resizes frames."),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, max=3,
                                           help="1 (gray) or 3 (RGB); default: RGB if any training image has colour."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="training batch size (default 256)."),
    out: Path = typer.Option(Path("runs/default"), "--out", help="run folder to write."),
) -> None:
    """Train a compressor (default: BINCE with label-preserving invariances) and write a run folder."""
    try:
        from taskcodec.data import detect_channels, parse_data
        from taskcodec.training.defaults import default_config
        from taskcodec.training.trainer import train

        if augmentations is None and objective in ("vic", "vc"):
            augmentations = "fashion"
        if channels not in (None, 1, 3):
            raise typer.BadParameter("--channels is 1 (gray) or 3 (RGB)")
        spec = parse_data(data)
        shape = None
        if not spec.is_fashion or image_size or channels:
            side = image_size or (28 if spec.is_fashion else FOLDER_IMAGE_SIZE)
            shape = (channels or detect_channels(spec), side, side)
        cfg = default_config(objective=objective, beta=beta, epochs=epochs, augmentations=augmentations,
                             latent_dim=latent_dim, threads=threads, seed=seed, train_subset=train_limit,
                             test_subset=test_limit, image_shape=shape, batch_size=batch_size)
        run = train(cfg, data_dir=spec, out=out, progress=True)
    except _errors() as exc:
        _fail(exc)
    import json

    m = json.loads((run / "metrics.json").read_text())
    typer.echo(f"{run}: MLP acc {m['accuracy_mlp']:.4f}, linear {m['accuracy_linear']:.4f}, "
               f"{m['coded_bits_mean']:.1f} coded bits/img (est. {m['estimated_bits_model']:.1f}), "
               f"trained in {m['train_time_s']:.0f} s")


def evaluate_cmd(
    run: Path = typer.Argument(..., help="run folder written by `taskcodec train`."),
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP + " Default: the run's own data."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="only the first N test images."),
) -> None:
    """Range-code, decode and check every test image; write RUN/evaluation.json and RUN/evaluation.md."""
    try:
        from taskcodec.training.evaluate import evaluate_run

        r = evaluate_run(run, data_dir=data, test_limit=test_limit)
    except _errors() as exc:
        _fail(exc)
    typer.echo(f"{run}: {r['coded_bits_mean']:.1f} coded bits/img (p95 {r['coded_bits_p95']:.0f}), MLP acc "
               f"{r['accuracy_mlp']:.4f}, estimate check {'ok' if r['estimate_check_ok'] else 'missed'} "
               f"({r['estimate_check_failures']} images, max excess {r['max_payload_excess_bits']:.1f} bits), "
               f"round-trip failures {r['roundtrip_failures']}; wrote {run / 'evaluation.md'}")
    if r["roundtrip_failures"]:  # a stream that does not decode to its symbols is a real failure
        raise typer.Exit(1)


def sweep_cmd(
    out: Path = typer.Option(..., "--out", help="folder for sweep.{json,md,png} (and the trained runs)."),
    runs: Optional[List[Path]] = typer.Option(None, "--runs", help="collect these existing runs instead of training."),
    objective: List[str] = typer.Option(["bince"], "--objective", help="repeatable: bince, vic, vc."),
    betas: str = typer.Option("0.003,0.01,0.03,0.1", "--betas", help="comma-separated rate weights."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0),
    augmentations: Optional[str] = typer.Option(None, "--augmentations"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", min=2),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1),
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
    series: Optional[List[str]] = typer.Option(None, "--series", help="repeatable OBJECTIVE:INVARIANCES, e.g. "
                                               "bince:views vc:fashion bince:fashion+label (overrides --objective)."),
    bundle: Optional[List[Path]] = typer.Option(None, "--bundle", help="repeatable: also measure a shipped bundle."),
    option: Optional[List[str]] = typer.Option(None, "--set", help="repeatable KEY=VALUE config override, e.g. "
                                               "batch_size=512 beta_warmup=0.3 probe_full_train=true."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="where the runs are trained (default: --out)."),
    raw_cnn: Optional[Path] = typer.Option(None, "--raw-cnn", help="classical.json of `taskcodec bench classical` on "
                                           "the same --data: its raw-pixel CNN baseline is the accuracy line "
                                           "(default: the committed Fashion-MNIST figure; none for other data)."),
) -> None:
    """Rate-accuracy sweep (coded bits vs MLP accuracy per objective), or `--runs R1 R2 ...` to only collect."""
    try:
        from taskcodec.training.sweep import collect, sweep

        from taskcodec.training.sweep import bundle_row, parse_series

        if runs:
            extra = [bundle_row(b, data, cache=out / f"bundle_{b.name}.json") for b in (bundle or [])]
            result = collect(list(runs), out, extra, classical_json=raw_cnn)
        else:
            result = sweep(parse_series(series) if series else objective, _betas(betas), out, data_dir=data,
                           bundles=bundle, runs_dir=runs_dir, classical_json=raw_cnn, epochs=epochs, augmentations=augmentations, threads=threads,
                           train_subset=train_limit, test_subset=test_limit, **_options(option))
    except _errors() as exc:
        _fail(exc)
    typer.echo(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'} ({len(result['rows'])} runs)")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("sweep")(sweep_cmd)
