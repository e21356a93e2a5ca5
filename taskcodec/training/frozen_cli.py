"""`taskcodec frozen ...`: the generic compressor on a frozen pretrained backbone (features, train, export, int8,
bench). Heavy imports happen inside the commands."""

from __future__ import annotations

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
    from taskcodec.training.backbones import BackboneError
    from taskcodec.training.transfer_datasets import DatasetError
    from taskcodec.data import DataError

    return (BackboneError, DatasetError, DataError, FileNotFoundError, ValueError)


@frozen_app.command()
def classify(image: Path = typer.Argument(..., help="an image file (any format OpenCV reads)"),
             size: int = typer.Option(224, help="input size"), top: int = 5,
             backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """ImageNet top-k of one image with the backbone's own head: a quick check that the weights are right."""
    import cv2
    import torch

    from taskcodec.training.backbones import frozen_encoder

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

    from taskcodec.training.frozen import FeatureStore

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

    from taskcodec.training.frozen import FeatureStore, FrozenConfig, save_run, train_compressor

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
def register(app: typer.Typer) -> None:
    app.add_typer(frozen_app, name="frozen")
