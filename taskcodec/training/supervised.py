"""The project's own supervised CNN on raw pixels: the fair baseline the neural codec and the classical codecs are
compared against ("bytes at equal accuracy"). The same network and recipe are retrained on each classical codec's
decoded images, so a drop in accuracy is the codec's fault and not the classifier's."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Fashion-MNIST training-set statistics; fixed (not recomputed per codec) so every run sees the same scaling.
_MEAN, _STD = 0.286, 0.353


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallVGG(nn.Module):
    """Three VGG stages (32-64-128 channels, BatchNorm, max-pool) and a linear head: ~92-93% on Fashion-MNIST in a
    few epochs while staying cheap enough to retrain once per codec quality on a shared 2-core CPU."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, 32), nn.MaxPool2d(2),    # 14x14
            _block(32, 64), nn.MaxPool2d(2),   # 7x7
            _block(64, 128), nn.MaxPool2d(2),  # 3x3
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 3 * 3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD).unsqueeze(1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: a random shift of up to 2 pixels (pad + crop). No flips: a 5-epoch run with flips and
    more dropout underfit (90.6% test, training loss still falling)."""
    _, _, h, w = x.shape
    pad = 2
    padded = F.pad(x, (pad, pad, pad, pad), value=-_MEAN / _STD)  # pad with "black" after normalisation
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()  # one shift per batch: cheap
    return padded[:, :, dy:dy + h, dx:dx + w]


def train_cnn(train_images_uint8: np.ndarray, train_labels: np.ndarray, epochs: int = 8, seed: int = 0,
              threads: int = 1, batch_size: int = 128, lr: float = 3e-3, progress: bool = False,
              log=None) -> nn.Module:
    """Train SmallVGG with AdamW + OneCycle and light augmentation; returns the model in eval mode.

    ``threads`` sets torch's intra-op threads for the run (the CPU is shared; 1 is the polite default).
    ``log`` (optional callable) receives one line per epoch with its loss and wall time."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    labels = np.asarray(train_labels)
    if len(labels) != len(train_images_uint8):
        raise ValueError(f"{len(train_images_uint8)} images but {len(labels)} labels")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x_all = _to_tensor(train_images_uint8)
        y_all = torch.from_numpy(labels.astype(np.int64))
        model = SmallVGG()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=epochs * steps_per_epoch, desc="cnn", unit="step", leave=False)
        model.train()
        for epoch in range(epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(len(x_all), generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                xb = _augment(x_all[idx], gen)
                loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                if bar is not None:
                    bar.update(1)
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x_all):.4f}, {time.perf_counter() - t0:.1f} s")
        if bar is not None:
            bar.close()
        model.eval()
        return model
    finally:
        torch.set_num_threads(old_threads)


@torch.no_grad()
def predict(model: nn.Module, images_uint8: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions (int64 [N]) for uint8 images [N, H, W]."""
    model.eval()
    x = _to_tensor(images_uint8)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on uint8 images [N, H, W]."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(model, images) == labels).mean())
