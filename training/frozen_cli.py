"""`taskcodec frozen ...`: the generic compressor on a frozen pretrained backbone (features, train, export, int8,
bench). Heavy imports happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

frozen_app = typer.Typer(help="Generic compressor on a frozen pretrained backbone (MobileNetV2 by default): cache "
                              "features, train the bottleneck, export a bundle, int8, zero-shot transfer benchmark.",
                         no_args_is_help=True)

BACKBONE = typer.Option("mobilenet_v2", "--backbone", help="registered backbone (training.backbones.BACKBONES)")
WEIGHTS = typer.Option(None, "--weights", help="a compatible local state dict (default: the backbone's own weights)")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _errors():
    from training.backbones import BackboneError
    from training.transfer_datasets import DatasetError
    from taskcodec.data import DataError

    return (BackboneError, DatasetError, DataError, FileNotFoundError, ValueError)


@frozen_app.command()
def classify(image: Path = typer.Argument(..., help="an image file (any format OpenCV reads)"),
             size: int = typer.Option(224, help="input size"), top: int = 5,
             backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """ImageNet top-k of one image with the backbone's own head: a quick check that the weights are right."""
    import cv2
    import torch

    from training.backbones import frozen_encoder

    try:
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read an image from {image}")
        enc = frozen_encoder(backbone, weights)
    except _errors() as exc:
        _fail(exc)
    rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    with torch.inference_mode():
        probs = enc.backbone.classifier(enc(torch.from_numpy(rgb[None]))).softmax(1)[0]
    values, idx = probs.topk(top)
    for v, i in zip(values.tolist(), idx.tolist()):
        typer.echo(f"imagenet class {i:4d}  p={v:.3f}")


@frozen_app.command()
def features(datasets: List[str] = typer.Option(["fashion_mnist_train", "fashion_mnist", "mnist", "lfw"],
                                                "--dataset", help="registered datasets"),
             size: int = typer.Option(160, help="square RGB input size"), backbone: str = BACKBONE,
             weights: Optional[Path] = WEIGHTS) -> None:
    """Compute and cache backbone embeddings (runs/frozen_cache); later commands reuse them."""
    import torch

    from training.frozen import FeatureStore

    torch.set_num_threads(1)
    try:
        store = FeatureStore(size, backbone, weights)
        for name in datasets:
            d = store.get(name)
            typer.echo(f"{name}: {d['emb'].shape} -> {store.dir}")
    except _errors() as exc:
        _fail(exc)


@frozen_app.command()
def train(beta: List[float] = typer.Option([0.01], "--beta", help="rate weight(s); one run per value"),
          size: int = typer.Option(160, help="square RGB input size"),
          steps: int = typer.Option(1500, help="optimizer steps on cached features"),
          transform: str = typer.Option("linear", help="linear (PCA-initialised map; measured better here) or diag "
                                                       "(per-dimension affine, the paper's recipe)"),
          latent_dim: int = typer.Option(256, help="latent size for --transform linear (diag: always the embedding's)"),
          train_set: str = typer.Option("fashion_mnist_train", help="registered dataset to train on"),
          out: Path = typer.Option(Path("runs/frozen"), help="parent folder of the run folders"),
          backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """Train the bottleneck head on cached frozen features (computing them first if needed)."""
    import torch

    from training.frozen import FeatureStore, FrozenConfig, save_run, train_compressor

    torch.set_num_threads(1)
    if transform not in ("diag", "linear"):
        _fail(ValueError(f"--transform must be diag or linear, got {transform!r}"))
    try:
        emb = FeatureStore(size, backbone, weights).get(train_set)["emb"]
    except _errors() as exc:
        _fail(exc)
    if transform == "diag":
        latent_dim = 0
    for b in beta:
        config = FrozenConfig(backbone=backbone, size=size, transform=transform, latent_dim=latent_dim, beta=b,
                              steps=steps, train_set=train_set)
        model, info = train_compressor(emb, config)
        run = save_run(model, config, out / f"{backbone}-{size}-{transform}{latent_dim or ''}-beta{b:g}", info)
        last = info["history"][-1]
        typer.echo(f"{run}: {last['bits']:.1f} bits (noisy), mse {last['mse']:.3f}, "
                   f"{info['train_seconds']:.0f} s")


@frozen_app.command()
def export(run: Path = typer.Argument(..., help="run folder from `taskcodec frozen train`"),
           out: Path = typer.Option(..., "--out", help="bundle folder to write"),
           int8: bool = typer.Option(True, help="also calibrate an int8 encoder and add it if it passes"),
           calib: int = typer.Option(256, help="real calibration frames (Fashion-MNIST train, never the eval set)"),
           method: str = typer.Option("percentile", help="calibration: minmax, entropy or percentile"),
           keep_fp32_convs: int = typer.Option(1, help="last Conv layers kept in fp32 (the tail always is)"),
           reduce_range: bool = typer.Option(False, help="7-bit weights (for CPUs without VNNI)"),
           fmt: str = typer.Option("qdq", "--format", help="qdq or qoperator"),
           fp32_depthwise: bool = typer.Option(False, help="keep depthwise convolutions in fp32"),
           report: Path = typer.Option(Path("bench/results/transfer_int8.json"), help="int8 report (JSON)"),
           weights: Optional[Path] = WEIGHTS) -> None:
    """Export the whole camera encoder (backbone + affine + Round; uint8 NHWC RGB in, int32 symbols out) as a
    bundle; optionally add a calibrated int8 encoder with a symbol-agreement / accuracy / latency report."""
    import torch

    from taskcodec.bundle import BundleError
    from training.frozen import export_bundle
    from training.frozen_int8 import int8_report

    torch.set_num_threads(1)
    if fmt not in ("qdq", "qoperator") or method not in ("minmax", "entropy", "percentile"):
        _fail(ValueError(f"--format must be qdq or qoperator and --method minmax, entropy or percentile"))
    try:
        bundle = export_bundle(run, out, weights, progress=typer.echo)
        typer.echo(f"bundle {bundle.path} model_id={bundle.model_id}")
        if int8:
            result = int8_report(bundle, calib, method=method, keep_fp32_convs=keep_fp32_convs,
                                 reduce_range=reduce_range, fmt=fmt, fp32_depthwise=fp32_depthwise,
                                 progress=typer.echo)
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2) + "\n")
            typer.echo(json.dumps(result, indent=2))
    except (*_errors(), BundleError) as exc:
        _fail(exc)


@frozen_app.command()
def bench(runs: List[Path] = typer.Argument(..., help="run folders (one rate point each)"),
          size: int = typer.Option(160, help="input size the runs were trained at"),
          eval_sets: List[str] = typer.Option(["fashion_mnist", "mnist", "lfw"], "--eval", help="datasets"),
          sizes: List[int] = typer.Option([160, 224], "--size-study", help="sizes for the accuracy/latency study"),
          out: Path = typer.Option(Path("bench/results"), help="folder for transfer.{json,md,png}"),
          note: List[str] = typer.Option([], "--note", help="a remark to print under the tables"),
          backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """Zero-shot transfer: rate and probe accuracy on unseen datasets vs JPEG and WebP at equal accuracy."""
    import sys

    from bench.transfer import run_transfer, write_outputs

    try:
        report = run_transfer(runs, eval_sets, size, backbone, weights, sizes=tuple(sizes), progress=typer.echo)
    except _errors() as exc:
        _fail(exc)
    report["notes"] = list(note)
    int8 = Path(out) / "transfer_int8.json"
    if int8.is_file():
        report["int8"] = json.loads(int8.read_text())
    write_outputs(report, out, command="taskcodec frozen bench " + " ".join(a for a in sys.argv[3:] if a not in note))
    typer.echo(f"wrote {out}/transfer.json, transfer.md, transfer.png")


def register(app: typer.Typer) -> None:
    app.add_typer(frozen_app, name="frozen")
