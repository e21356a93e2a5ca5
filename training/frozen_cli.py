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
          views: int = typer.Option(4, help="augmented renderings per training image; the head reconstructs the "
                                            "plain embedding from a random one (the paper's invariance; 0: off)"),
          augmentation: str = typer.Option("generic", help="augmentation set of the views (training.augmentations)"),
          out: Path = typer.Option(Path("runs/frozen"), help="parent folder of the run folders"),
          backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """Train the bottleneck head on cached frozen features (computing them first if needed)."""
    import torch

    from training.frozen import FeatureStore, FrozenConfig, save_run, train_compressor

    torch.set_num_threads(1)
    if transform not in ("diag", "linear"):
        _fail(ValueError(f"--transform must be diag or linear, got {transform!r}"))
    try:
        store = FeatureStore(size, backbone, weights)
        emb = store.views(train_set, views, augmentation) if views else store.get(train_set)["emb"]
    except _errors() as exc:
        _fail(exc)
    if transform == "diag":
        latent_dim = 0
    for b in beta:
        config = FrozenConfig(backbone=backbone, size=size, transform=transform, latent_dim=latent_dim, beta=b,
                              steps=steps, train_set=train_set, views=views, augmentation=augmentation)
        model, info = train_compressor(emb, config)
        name = f"{backbone}-{size}-{transform}{latent_dim or ''}-{f'{augmentation}{views}-' if views else ''}beta{b:g}"
        run = save_run(model, config, out / name, info)
        last = info["history"][-1]
        typer.echo(f"{run}: {last['bits']:.1f} bits (noisy), mse {last['mse']:.3f}, "
                   f"{info['train_seconds']:.0f} s")


# int8 scheme options of `frozen int8`; defaults = training.frozen_int8.DEFAULT_SCHEME (the measured best)
CALIB = typer.Option(512, help="real calibration frames (Fashion-MNIST train, never the eval set)")
METHOD = typer.Option("percentile", help="activation calibration: minmax, entropy, percentile or mse")
PERCENTILE = typer.Option(99.99, help="--method percentile: percentile of |x| for ReLU6 outputs")
PCT_LINEAR = typer.Option(99.9, help="--method percentile: for the other activations (linear convs, residual sums)")
FP32_FIRST = typer.Option(3, help="the first N convs (after the input normalisation) stay fp32; 0: all int8")
KEEP_FP32 = typer.Option(0, help="last Conv layers kept in fp32 (the pooling/affine/Round tail always is)")
FP32_DW = typer.Option(False, help="exclude depthwise convs from quantization (ORT >= 1.21 still runs them int8 "
                                     "when their neighbours are quantized)")
QUANT_CLIP = typer.Option(True, "--quantize-clip/--fp32-clip", help="quantize ReLU6 so ORT folds it into the conv")
QUANT_ADD = typer.Option(True, "--quantize-add/--fp32-add", help="residual Adds as QLinearAdd")
FMT = typer.Option("qdq", "--format", help="qdq or qoperator")
ACTS = typer.Option("u8", "--activations", help="u8 (asymmetric) or s8 (symmetric) activations")
REDUCE = typer.Option(False, help="7-bit weights (for CPUs without VNNI)")
LATCORR = typer.Option(True, "--latent-correction/--no-latent-correction",
                       help="per-latent gain/offset onto the fp32 latents, fitted on the calibration frames")
EVAL = typer.Option(10000, "--eval-frames", help="Fashion-MNIST test frames for accuracy and agreement (10000: all)")


def _scheme(calib, method, percentile, percentile_linear, fp32_first_convs, keep_fp32_convs, fp32_depthwise,
            quantize_clip, quantize_add, fmt, activations, reduce_range, latent_correction):
    from training.frozen_int8 import Int8Scheme

    return Int8Scheme(method=method, percentile=percentile, percentile_linear=percentile_linear, calib=calib,
                      fp32_first_convs=fp32_first_convs, fp32_last_convs=keep_fp32_convs, fp32_depthwise=fp32_depthwise,
                      quantize_clip=quantize_clip, quantize_add=quantize_add, fmt=fmt, activations=activations,
                      reduce_range=reduce_range, latent_correction=latent_correction)


@frozen_app.command()
def export(run: Path = typer.Argument(..., help="run folder from `taskcodec frozen train`"),
           out: Path = typer.Option(..., "--out", help="bundle folder to write"),
           int8: bool = typer.Option(True, help="also calibrate an int8 encoder with the measured default scheme "
                                                "(training.frozen_int8.DEFAULT_SCHEME) and add it if it passes; "
                                                "`taskcodec frozen int8 BUNDLE --write` tries other schemes"),
           eval_frames: int = EVAL,
           report: Path = typer.Option(Path("bench/results/transfer_int8.json"), help="int8 report (JSON)"),
           weights: Optional[Path] = WEIGHTS) -> None:
    """Export the whole camera encoder (backbone + affine + Round; uint8 NHWC RGB in, int32 symbols out) as a
    bundle with golden vectors; optionally add a calibrated int8 encoder with a symbol-agreement / accuracy /
    latency report."""
    import torch

    from taskcodec.bundle import BundleError
    from training.frozen import export_bundle
    from training.frozen_int8 import DEFAULT_SCHEME, int8_report

    torch.set_num_threads(1)
    try:
        bundle = export_bundle(run, out, weights, progress=typer.echo)
        typer.echo(f"bundle {bundle.path} model_id={bundle.model_id}")
        if int8:
            result = int8_report(bundle, DEFAULT_SCHEME, n_eval=eval_frames, progress=typer.echo)
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2) + "\n")
            typer.echo(json.dumps(result, indent=2))
    except (*_errors(), BundleError) as exc:
        _fail(exc)


@frozen_app.command(name="int8")
def int8_cmd(bundle_dir: Path = typer.Argument(..., help="bundle folder from `taskcodec frozen export`"),
             calib: int = CALIB, method: str = METHOD, percentile: float = PERCENTILE,
             percentile_linear: float = PCT_LINEAR,
             fp32_first_convs: int = FP32_FIRST, keep_fp32_convs: int = KEEP_FP32, fp32_depthwise: bool = FP32_DW,
             quantize_clip: bool = QUANT_CLIP, quantize_add: bool = QUANT_ADD, fmt: str = FMT,
             activations: str = ACTS, reduce_range: bool = REDUCE, latent_correction: bool = LATCORR,
             eval_frames: int = EVAL,
             write: bool = typer.Option(False, help="add the int8 encoder to the bundle when accuracy passes"),
             log: Optional[Path] = typer.Option(None, help="append this scheme's result to a JSON list (a sweep log)"),
             note: str = typer.Option("", help="a label stored with the result in --log")) -> None:
    """Try one int8 scheme on an existing bundle: accuracy, symbol agreement, bytes, latency vs fp32 (1 thread)."""
    import torch

    from taskcodec.bundle import BundleError, load_bundle
    from training.frozen_int8 import int8_report

    torch.set_num_threads(1)
    try:
        scheme = _scheme(calib, method, percentile, percentile_linear, fp32_first_convs, keep_fp32_convs,
                         fp32_depthwise,
                         quantize_clip, quantize_add, fmt, activations, reduce_range, latent_correction)
        result = int8_report(load_bundle(bundle_dir), scheme, n_eval=eval_frames, write=write, progress=typer.echo)
    except (*_errors(), BundleError) as exc:
        _fail(exc)
    if log is not None:
        entries = json.loads(log.read_text()) if log.is_file() else []
        entries.append({"note": note, **result})
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps(entries, indent=2) + "\n")
        typer.echo(f"appended to {log} ({len(entries)} entries)")


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


@frozen_app.command(name="bench-bundle")
def bench_bundle(bundle_dir: Path = typer.Argument(..., help="bundle folder from `taskcodec frozen export`"),
                 eval_sets: List[str] = typer.Option(["fashion_mnist", "mnist", "lfw"], "--eval", help="datasets"),
                 out: Path = typer.Option(Path("bench/results"), help="folder for transfer_bundle.{json,md}")) -> None:
    """A deployed bundle on unseen datasets: fp32 and int8 encoders (ONNX Runtime), real bytes, probe accuracy."""
    import sys

    from bench.transfer import bundle_transfer, write_bundle_outputs
    from taskcodec.bundle import BundleError

    try:
        report = bundle_transfer(bundle_dir, eval_sets, progress=typer.echo)
    except (*_errors(), BundleError) as exc:
        _fail(exc)
    write_bundle_outputs(report, out, command="taskcodec frozen bench-bundle " + " ".join(sys.argv[3:]))
    typer.echo(f"wrote {out}/transfer_bundle.json, transfer_bundle.md")


def register(app: typer.Typer) -> None:
    app.add_typer(frozen_app, name="frozen")
