"""The generic compressor on a frozen pretrained backbone (Dubois et al. 2021, section 5.3, "generic compressor").

The backbone stays frozen, so its embeddings are computed once per (dataset, input size, codec) and cached under
``runs/frozen_cache``; training then only touches the small head: a learned affine transform (per dimension by
default, as in the paper, or a full linear map), the factorized entropy bottleneck, and a linear decoder whose only
job is the distortion — predict the (standardised) embedding back from the rounded latents. Rate and distortion are
traded with ``beta``; nothing task-specific is used, which is what lets the latents transfer zero-shot.

With ``views`` > 0 the head is trained the paper's invariant way (its CLIP recipe: reconstruct the embedding of the
image from a randomly augmented rendering of it, VIC on the embedding): each training image is also embedded under
``views`` random augmentations (``training.augmentations``, "generic" by default), the head encodes a random one of
them and its decoder must predict the *unaugmented* embedding, so the rate spent on what the augmentations change is
wasted and the bottleneck learns to drop it.

On the camera the encoder is backbone + affine + ``Round`` (:class:`SymbolEncoder`), exported to ONNX as one graph
that takes uint8 NHWC RGB frames and returns int32 symbols.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from taskcodec.training.backbones import FrozenEncoder, frozen_encoder, get_spec
from taskcodec.training.entropy_bottleneck import EntropyBottleneck
from taskcodec.training.transfer_datasets import TransferSet, cache_name, load_dataset, render

CACHE_DIR = Path("runs/frozen_cache")
ImageCodec = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # native images -> (decoded images, bytes each)


# -- features -----------------------------------------------------------------------------------------------------
def weights_key(backbone: str, weights: str | Path | None) -> str:
    """Short content hash of the weights, so a cache never mixes two different checkpoints."""
    path = Path(weights) if weights is not None else get_spec(backbone).default_weights()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@torch.inference_mode()
def embed_frames(encoder: FrozenEncoder, frames: np.ndarray, batch: int = 64, desc: str = "embed") -> np.ndarray:
    """uint8 RGB frames [N, S, S, 3] -> float32 embeddings [N, D], batched, with a progress bar."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(frames), batch), desc=desc, unit="batch", leave=False):
        out.append(encoder(torch.from_numpy(np.ascontiguousarray(frames[i: i + batch]))).numpy())
    return np.concatenate(out).astype(np.float32)


class FeatureStore:
    """Embeddings of registered datasets at one input size, optionally after an image codec, cached on disk."""

    def __init__(self, size: int, backbone: str = "mobilenet_v2", weights: str | Path | None = None,
                 cache_dir: Path = CACHE_DIR):
        self.size, self.backbone, self.weights = int(size), backbone, weights
        self.dir = Path(cache_dir) / f"{backbone}-{weights_key(backbone, weights)}-{self.size}"
        self._encoder: FrozenEncoder | None = None
        self._datasets: dict[str, TransferSet] = {}

    @property
    def encoder(self) -> FrozenEncoder:
        if self._encoder is None:
            self._encoder = frozen_encoder(self.backbone, self.weights)
        return self._encoder

    def dataset(self, name: str) -> TransferSet:
        if name not in self._datasets:
            self._datasets[name] = load_dataset(name)
        return self._datasets[name]

    def get(self, name: str, codec: ImageCodec | None = None, codec_key: str = "raw") -> dict[str, np.ndarray]:
        """{"emb": [N, D] float32, "labels": [N], "bytes": [N] (codec bytes per image; 0 for raw)}."""
        path = self.dir / f"{cache_name(name)}--{codec_key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        data = self.dataset(name)
        images, nbytes = (data.images, np.zeros(len(data), np.int64)) if codec is None else codec(data.images)
        emb = embed_frames(self.encoder, render(images, self.size), desc=f"{name} {codec_key} @{self.size}")
        result = {"emb": emb, "labels": data.labels, "bytes": np.asarray(nbytes, np.int64)}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **result)
        tmp.replace(path)
        return result

    def views(self, name: str, count: int, augmentation: str = "generic", seed: int = 0) -> np.ndarray:
        """[N, 1 + count, D]: the plain embedding of each image, then ``count`` embeddings of augmented renderings
        (view i uses seed ``seed + i``; each view is cached like any other feature set)."""
        from taskcodec.training.augmentations import augment_images, get_augmentation

        aug = get_augmentation(augmentation)
        embs = [self.get(name)["emb"]]
        for i in range(count):
            def codec(images: np.ndarray, _seed: int = seed + i) -> tuple[np.ndarray, np.ndarray]:
                return augment_images(images, aug, _seed), np.zeros(len(images), np.int64)
            embs.append(self.get(name, codec, f"{augmentation}{seed + i}")["emb"])
        return np.stack(embs, axis=1)


# -- the compressor head ------------------------------------------------------------------------------------------
@dataclass
class FrozenConfig:
    backbone: str = "mobilenet_v2"
    size: int = 160
    transform: str = "linear"  # "linear": PCA-initialised linear map; "diag": per-dimension affine (the paper's)
    latent_dim: int = 256     # 0: same as the embedding (diag needs that)
    beta: float = 1e-4        # weight of the rate (bits per image) against the distortion (MSE per dimension)
    steps: int = 1500
    batch: int = 256
    lr: float = 3e-3
    seed: int = 0
    train_set: str = "fashion_mnist_train"
    views: int = 0                 # augmented renderings per training image (0: plain embedding distortion)
    augmentation: str = "generic"  # training.augmentations set the views are drawn from


class FrozenCompressor(nn.Module):
    """Embedding -> affine -> entropy bottleneck -> linear decoder (the distortion's prediction of the embedding)."""

    def __init__(self, embed_dim: int, transform: str = "diag", latent_dim: int = 0):
        super().__init__()
        if transform not in ("diag", "linear"):
            raise ValueError(f"transform must be 'diag' or 'linear', got {transform!r}")
        latent_dim = latent_dim or embed_dim
        if transform == "diag" and latent_dim != embed_dim:
            raise ValueError("a per-dimension affine keeps the embedding size; use --transform linear to change it")
        self.transform, self.embed_dim, self.latent_dim = transform, embed_dim, latent_dim
        # Standardisation of the embedding (fixed from the training features) so beta means the same for any backbone.
        self.register_buffer("mu", torch.zeros(embed_dim))
        self.register_buffer("sigma", torch.ones(embed_dim))
        if transform == "diag":
            self.log_scale = nn.Parameter(torch.zeros(embed_dim))  # log-space: scales can shrink to ~0 quickly
            self.shift = nn.Parameter(torch.zeros(embed_dim))
        else:
            self.linear = nn.Linear(embed_dim, latent_dim)
        self.bottleneck = EntropyBottleneck(latent_dim)
        self.decoder = nn.Linear(latent_dim, embed_dim)

    def set_stats(self, emb: np.ndarray) -> None:
        self.mu.copy_(torch.from_numpy(emb.mean(0)))
        self.sigma.copy_(torch.from_numpy(emb.std(0) + 1e-3))
        if self.transform == "linear":  # start from a scaled PCA so early training is not spent finding the basis
            z = (emb - emb.mean(0)) / (emb.std(0) + 1e-3)
            _, s, vt = np.linalg.svd(z[:4096], full_matrices=False)
            k = min(self.latent_dim, len(s))  # fewer samples than latents: the other rows keep their random init
            with torch.no_grad():
                self.linear.weight[:k].copy_(torch.from_numpy(vt[:k] / (s[:k, None] / np.sqrt(len(z[:4096])))))
                self.linear.bias.zero_()

    def analysis(self, emb: torch.Tensor) -> torch.Tensor:
        z = (emb - self.mu) / self.sigma
        return z * self.log_scale.exp() + self.shift if self.transform == "diag" else self.linear(z)

    def forward(self, emb: torch.Tensor, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (y_hat, bits per sample, distortion per sample: MSE of the standardised ``target`` embedding, which
        is ``emb`` itself unless ``emb`` is an augmented view of it)."""
        y_hat, bits = self.bottleneck(self.analysis(emb))
        z = ((emb if target is None else target) - self.mu) / self.sigma
        return y_hat, bits, ((self.decoder(y_hat) - z) ** 2).mean(dim=1)

    @torch.no_grad()
    def symbols(self, emb: np.ndarray) -> np.ndarray:
        return torch.round(self.analysis(torch.from_numpy(emb))).to(torch.int32).numpy()


def train_compressor(emb: np.ndarray, config: FrozenConfig, progress: bool = True
                     ) -> tuple[FrozenCompressor, dict]:
    """Train the head on cached embeddings: [N, D], or [N, 1 + V, D] with augmented views after the plain one
    (:meth:`FeatureStore.views`), where the head encodes a random view and reconstructs the plain embedding.
    Returns the model (eval mode) and a short history."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    views = emb if emb.ndim == 3 else emb[:, None]
    model = FrozenCompressor(views.shape[2], config.transform, config.latent_dim)
    model.set_stats(views.transpose(1, 0, 2).reshape(-1, views.shape[2]))  # view-major: the PCA sees plain ones
    x = torch.from_numpy(views)
    main = [p for n, p in model.named_parameters() if n != "bottleneck.quantiles"]
    opt = torch.optim.Adam(main, lr=config.lr)
    aux_opt = torch.optim.Adam([model.bottleneck.quantiles], lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.05)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train beta={config.beta:g}", disable=not progress, leave=False)
    model.train()
    for step in bar:
        idx = torch.randint(0, len(x), (config.batch,), generator=gen)
        if x.shape[1] > 1:  # a random view of each image; without views the draw is skipped, so plain runs
            view = torch.randint(0, x.shape[1], (config.batch,), generator=gen)  # replay the same batches as before
            _, bits, dist = model(x[idx, view], target=x[idx, 0])
        else:
            _, bits, dist = model(x[idx, 0])
        loss = dist.mean() + config.beta * bits.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        aux_opt.zero_grad()
        model.bottleneck.aux_loss().backward()
        aux_opt.step()
        if step % 200 == 0 or step == config.steps - 1:
            history.append({"step": step, "bits": float(bits.mean().detach()), "mse": float(dist.mean().detach())})
            bar.set_postfix(bits=f"{history[-1]['bits']:.1f}", mse=f"{history[-1]['mse']:.3f}")
    model.bottleneck.fit_quantiles(steps=500)
    model.eval()
    return model, {"history": history, "train_seconds": time.perf_counter() - t0}


def save_run(model: FrozenCompressor, config: FrozenConfig, out: Path, extra: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "compressor.pt")
    model.bottleneck.tables().save(out / "tables.npz")
    (out / "config.json").write_text(json.dumps({"config": asdict(config), **(extra or {})}, indent=2) + "\n")
    return out


def load_run(run: Path) -> tuple[FrozenCompressor, FrozenConfig, dict]:
    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "compressor.pt").is_file():
        raise FileNotFoundError(f"{run} is not a frozen-compressor run (config.json and compressor.pt expected); "
                                "make one with `taskcodec frozen train`")
    info = json.loads((run / "config.json").read_text())
    config = FrozenConfig(**info["config"])
    state = torch.load(run / "compressor.pt", map_location="cpu", weights_only=True)
    model = FrozenCompressor(state["mu"].shape[0], config.transform, config.latent_dim)
    model.load_state_dict(state)
    return model.eval(), config, info


# -- camera-side encoder ------------------------------------------------------------------------------------------
class CameraHead(nn.Module):
    """The frozen backbone and the head's analysis transform as the two steps of ``models.SymbolEncoder`` (the one
    camera encoder of every bundle): ``normalise`` (uint8 NHWC RGB frames -> the backbone's embedding; the backbone
    normalises its input itself) and ``latents`` (embedding -> continuous latents)."""

    def __init__(self, encoder: FrozenEncoder, compressor: FrozenCompressor):
        super().__init__()
        self.encoder, self.compressor = encoder, compressor

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(frames)

    def latents(self, emb: torch.Tensor) -> torch.Tensor:
        return self.compressor.analysis(emb)


def SymbolEncoder(encoder: FrozenEncoder, compressor: FrozenCompressor) -> nn.Module:  # noqa: N802 (builds a module)
    """uint8 NHWC RGB frames -> int32 symbols: frozen backbone + the head's affine + Round. This is what ships."""
    from taskcodec.training.models import SymbolEncoder as CameraEncoder

    return CameraEncoder(CameraHead(encoder, compressor))


# -- probe ---------------------------------------------------------------------------------------------------------
def probe_pipeline():
    """The fixed probe of every comparison: standardise, then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=200, tol=1e-3))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy of the probe (every image is scored once, by a probe that never saw it)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(1), warnings.catch_warnings():  # 1 BLAS thread: oversubscribing 2 shared cores is slower
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = cross_val_predict(probe_pipeline(), features.astype(np.float32), labels, cv=cv)
    return float((pred == labels).mean())


# -- export --------------------------------------------------------------------------------------------------------
