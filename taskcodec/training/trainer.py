"""Train a compressor end to end and write a self-contained run folder.

A run folder holds everything later stages need, so export and evaluation never retrain:
``config.json``, ``model.pt`` (state_dict), ``tables.npz`` (frozen entropy tables), ``probe.pt`` (MLP probe on the
integer symbols + its constructor args; it becomes the server classifier), ``probe_linear.pt``, ``metrics.json``
and ``train.log``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from taskcodec.coding import EntropyTables, RangeCoder, compress
from taskcodec.data import load_frames, parse_data
from taskcodec.training.augmentations import get_augmentation
from taskcodec.training.models import Compressor, CompressorConfig, SymbolEncoder
from taskcodec.training.objectives import compute_loss
from taskcodec.training.probes import StandardisedClassifier, accuracy, fit_probe

from taskcodec.report import machine_info

RUN_DIR = Path("runs/default")
DATA_FILE = "data.json"  # the run's dataset (--data spec) and class names; export and evaluate read it
DENSITY_LR_FACTOR = 10.0


class RunError(RuntimeError):
    """A run folder that is missing or incomplete."""


def _frames(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> uint8 NHWC tensor."""
    t = torch.from_numpy(np.array(images, copy=True))
    return t.unsqueeze(-1) if t.ndim == 3 else t


@torch.no_grad()
def encode_symbols(compressor: Compressor, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """uint8 images [N, H, W(, C)] -> int32 symbols [N, D], exactly what the exported encoder computes."""
    was_training = compressor.training
    enc = SymbolEncoder(compressor)
    frames = _frames(images)
    out = [enc(frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)]
    compressor.train(was_training)
    return torch.cat(out).numpy().astype(np.int32) if out else np.zeros((0, compressor.config.latent_dim), np.int32)


def coded_bits(symbols: np.ndarray, tables: EntropyTables) -> np.ndarray:
    """Actual stream size in bits (2-byte check + byte-terminated range-coder payload) of each row of symbols."""
    coder = RangeCoder(tables)
    return np.array([8 * len(compress(s, coder)) for s in symbols], dtype=np.int64)


def _positive_sources(labels: torch.Tensor, batch_idx: torch.Tensor, prob: float, by_class: list[torch.Tensor],
                      gen: torch.Generator) -> torch.Tensor:
    """Indices of the positive view's source image: the item itself, or with ``prob`` a random same-class image."""
    if prob <= 0:
        return batch_idx
    lab = labels[batch_idx]
    counts = torch.tensor([len(c) for c in by_class])
    starts = torch.cumsum(counts, 0) - counts
    r = (torch.rand(len(batch_idx), generator=gen) * counts[lab]).long().clamp_max(counts[lab] - 1)
    other = torch.cat(by_class)[starts[lab] + r]
    swap = torch.rand(len(batch_idx), generator=gen) < prob
    return torch.where(swap, other, batch_idx)


def _optimizer(model: Compressor, cfg: CompressorConfig) -> torch.optim.Optimizer:
    """Weight decay on network weights only; the density, quantiles and per-dimension affine (the quantisation step)
    learn 10x faster so the prior and the step size keep up with the moving latents within a short CPU schedule."""
    density = list(model.bottleneck.parameters()) + [model.log_scale, model.shift]
    skip = {id(p) for p in density}
    decay = [p for p in model.parameters() if id(p) not in skip and p.ndim > 1]
    skip |= {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in skip]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                              {"params": rest, "weight_decay": 0.0, "lr": cfg.lr},
                              {"params": density, "weight_decay": 0.0, "lr": cfg.lr * DENSITY_LR_FACTOR}])


def beta_at(cfg: CompressorConfig, step: int, total: int) -> float:
    """The rate weight at a step: a linear warm-up from 0 over the first ``beta_warmup`` of the steps, then beta."""
    ramp = cfg.beta_warmup * total
    return cfg.beta if ramp <= 0 else cfg.beta * min(1.0, (step + 1) / ramp)


def train_model(cfg: CompressorConfig, images: np.ndarray, labels: np.ndarray, progress: bool = True,
                log=None, monitor=None) -> Compressor:
    """Optimise a fresh compressor on uint8 images [N, H, W(, C)] (no evaluation, no files); ``monitor(model)``, if
    given, returns a held-out accuracy that each epoch's log line reports."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Compressor(cfg)
    aug = get_augmentation(cfg.augmentations)
    x_all = _frames(images).permute(0, 3, 1, 2)  # uint8 NCHW
    y_all = torch.as_tensor(labels, dtype=torch.long)
    by_class = [torch.nonzero(y_all == c).view(-1) for c in range(int(y_all.max()) + 1)]
    steps_per_epoch = len(x_all) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    if total == 0:
        return model.eval()
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                                                pct_start=0.15)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, desc=f"train {cfg.objective} beta={cfg.beta}", unit="step")
    model.train()
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        sums = np.zeros(4)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            pos = _positive_sources(y_all, idx, aug.label_positive_prob, by_class, gen)
            beta = beta_at(cfg, epoch * steps_per_epoch + s, total)
            parts = compute_loss(model, x_all[idx].float() / 255.0, x_all[pos].float() / 255.0, y_all[idx], aug, gen,
                                 beta)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
            sched.step()
            sums += [float(parts.loss.detach()), float(parts.distortion), float(parts.rate_bits), float(parts.aux)]
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, dist=f"{parts.distortion.item():.3f}",
                            bits=f"{parts.rate_bits.item():.1f}")
        if log:
            m = sums / max(1, steps_per_epoch)
            acc = f" accuracy {monitor(model):.4f}" if monitor else ""
            model.train()
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {m[0]:.4f} distortion {m[1]:.4f} rate {m[2]:.2f} bits "
                f"aux {m[3]:.1f}{acc} ({time.perf_counter() - t_start:.0f} s)")
    bar.close()
    return model.eval()


def train(config: CompressorConfig, data_dir: str | Path | None = None, out: str | Path = RUN_DIR,
          progress: bool = True) -> Path:
    """Train, freeze tables, fit probes on the integer symbols, measure real coded sizes; returns the run folder."""
    torch.set_num_threads(max(1, int(config.threads)))
    cfg = config
    spec = parse_data(data_dir)
    channels, height, width = cfg.image_shape
    train_set = load_frames(spec, "train", height, width, channels)  # data errors surface before anything is written
    test_set = load_frames(spec, "test", height, width, channels)
    (xtr, ytr), (xte, yte) = (train_set.frames, train_set.labels), (test_set.frames, test_set.labels)
    if not spec.is_fashion:  # the operator's own pixel statistics; batches no larger than the data
        pixels = xtr.astype(np.float32) / 255.0
        cfg = dataclasses.replace(cfg, mean=round(float(pixels.mean()), 4), std=round(float(pixels.std()) or 1.0, 4),
                                  batch_size=max(2, min(cfg.batch_size, len(xtr))))
        del pixels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"
    log_path.write_text("")
    (out / DATA_FILE).write_text(json.dumps({"data": str(spec), "classes": list(train_set.classes),
                                             "n_train": len(xtr), "n_test": len(xte)}, indent=2) + "\n")

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        if progress and msg.startswith("epoch"):  # live progress on the console, above the bar
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def monitor(model: Compressor, n: int = 1000) -> float:
        """Nearest-class-mean accuracy on the symbols of up to 1000 test images (class means from 2000 train)."""
        s_tr, s_te = encode_symbols(model, xtr[:2 * n]).astype(np.float64), encode_symbols(model, xte[:n])
        classes = np.unique(ytr[:2 * n])
        means = np.stack([s_tr[ytr[:2 * n] == c].mean(0) for c in classes])
        d = ((s_te[:, None, :] - means[None]) ** 2).sum(-1)
        return float((classes[d.argmin(1)] == yte[:n]).mean()) if len(s_te) else 0.0

    xprobe, yprobe = xtr, ytr
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    if not cfg.probe_full_train:
        xprobe, yprobe = xtr, ytr
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    (out / "config.json").write_text(cfg.to_json())
    log(f"config {json.dumps(cfg.to_dict())}; train {len(xtr)} test {len(xte)}; threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    model = train_model(cfg, xtr, ytr, progress=progress, log=log, monitor=monitor)
    train_time = time.perf_counter() - t0
    aux = model.bottleneck.fit_quantiles(cfg.quantile_steps)
    tables = model.bottleneck.tables()
    torch.save(model.state_dict(), out / "model.pt")
    tables.save(out / "tables.npz")
    log(f"trained in {train_time:.1f} s; quantile aux loss {aux:.4f}; support sizes {tables.length.tolist()}")

    s_tr = encode_symbols(model, xprobe)
    s_te = encode_symbols(model, xte)
    linear = fit_probe(s_tr, yprobe, hidden=0, epochs=cfg.probe_epochs, seed=cfg.seed)
    mlp = fit_probe(s_tr, yprobe, hidden=cfg.probe_hidden, epochs=cfg.probe_epochs, lr=3e-3, seed=cfg.seed)
    torch.save({"state_dict": mlp.state_dict(), "init_args": mlp.init_args()}, out / "probe.pt")
    torch.save({"state_dict": linear.state_dict(), "init_args": linear.init_args()}, out / "probe_linear.pt")
    with torch.no_grad():
        model_bits = float(model.bottleneck.bits(torch.as_tensor(s_te, dtype=torch.float32)).mean()) if len(s_te) else 0.0
    coded = coded_bits(s_te, tables)
    metrics = {
        "objective": cfg.objective, "beta": cfg.beta, "augmentations": cfg.augmentations, "epochs": cfg.epochs,
        "latent_dim": cfg.latent_dim, "n_train": int(len(xtr)), "n_test": int(len(xte)),
        "accuracy_linear": accuracy(linear, s_te, yte), "accuracy_mlp": accuracy(mlp, s_te, yte),
        "train_accuracy_mlp": accuracy(mlp, s_tr[:10000], yprobe[:10000]), "n_probe_train": int(len(s_tr)),
        "batch_size": cfg.batch_size, "beta_warmup": cfg.beta_warmup, "head_layers": cfg.head_layers,
        "temperature": cfg.temperature, "conv_depth": cfg.conv_depth, "views": cfg.views, "channels": list(cfg.channels),
        "estimated_bits_model": model_bits,
        "estimated_bits_tables": float(tables.estimated_bits(s_te).mean()) if len(s_te) else 0.0,
        "coded_bits_mean": float(coded.mean()) if len(coded) else 0.0,
        "coded_bits_p50": float(np.percentile(coded, 50)) if len(coded) else 0.0,
        "coded_bits_p95": float(np.percentile(coded, 95)) if len(coded) else 0.0,
        "coded_bits_max": int(coded.max()) if len(coded) else 0,
        "active_dims": int((tables.length > 1).sum()),
        "train_time_s": train_time, "total_time_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(), "machine": machine_info(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log("metrics " + json.dumps(metrics))
    return out


def load_probe(path: str | Path) -> StandardisedClassifier:
    """A probe saved by :func:`train` (state_dict + constructor args), in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    probe = StandardisedClassifier(**blob["init_args"])
    probe.load_state_dict(blob["state_dict"])
    return probe.eval()


def load_run(path: str | Path) -> tuple[Compressor, StandardisedClassifier, dict]:
    """Rebuild (compressor in eval mode, MLP probe, info) from a run folder; info has config, metrics, tables, path."""
    path = Path(path)
    need = ("config.json", "model.pt", "probe.pt", "tables.npz")
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise RunError(f"{path} is not a complete run folder (missing {', '.join(missing)}); train one with "
                       "`taskcodec train --out DIR`")
    cfg = CompressorConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = Compressor(cfg)
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    probe = load_probe(path / "probe.pt")
    metrics_path = path / "metrics.json"
    info = {
        "path": path, "config": cfg, "tables": EntropyTables.load(path / "tables.npz"),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        # runs from before --data existed were trained on Fashion-MNIST
        "data": json.loads((path / DATA_FILE).read_text()) if (path / DATA_FILE).is_file() else {"data": "fashion-mnist"},
    }
    info["classes"] = info["data"].get("classes")
    return model, probe, info
