"""Invariance sets: the transformations the codec is allowed to forget.

The compressor keeps only what is needed to predict labels that are invariant to these transformations (Dubois et al.
2021), so the set *is* the task specification. All transforms work batched on float images in [0, 1], shape
[N, 1, H, W], with torch ops (one ``affine_grid``/``grid_sample`` per batch), and draw from an explicit
``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskcodec.data import PLACEMENT


@dataclass(frozen=True)
class Augmentation:
    name: str
    description: str
    rotate_deg: float = 0.0       # uniform in +-rotate_deg
    shift_px: float = 0.0         # uniform translation in +-shift_px (pixels)
    scale: float = 0.0            # zoom factor uniform in 1 +- scale (zoom-in crops / zoom-out pads)
    shear_deg: float = 0.0        # horizontal shear angle uniform in +-shear_deg
    hflip: bool = False           # mirror left-right with probability 1/2
    brightness: float = 0.0       # additive, uniform in +-brightness
    contrast: float = 0.0         # multiplicative around the image mean, uniform in 1 +- contrast
    erase_prob: float = 0.0       # random erasing of one rectangle (2-15 % of the area)
    noise: float = 0.0            # additive Gaussian pixel noise, std uniform in [0, noise]
    label_positive_prob: float = 0.0  # chance that the positive view comes from another image of the same class

    @property
    def uses_labels(self) -> bool:
        return self.label_positive_prob > 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """x float [N, C, H, W] in [0, 1] -> an augmented view of the same shape."""
        if self.rotate_deg or self.shift_px or self.scale or self.hflip or self.shear_deg:
            x = _affine(x, self, gen)
        if self.brightness or self.contrast:
            x = _photometric(x, self, gen)
        if self.erase_prob:
            x = _erase(x, self.erase_prob, gen)
        if self.noise:
            sigma = _u(x.shape[0], 0.0, self.noise, gen, x.device).view(-1, 1, 1, 1)
            x = (x + sigma * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0.0, 1.0)
        return x


def _u(n: int, lo: float, hi: float, gen, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _affine(x: torch.Tensor, a: Augmentation, gen) -> torch.Tensor:
    n, _, h, w = x.shape
    angle = _u(n, -a.rotate_deg, a.rotate_deg, gen, x.device) * (math.pi / 180.0)
    zoom = _u(n, 1 - a.scale, 1 + a.scale, gen, x.device)
    flip = torch.where(torch.rand(n, generator=gen, device=x.device) < 0.5, -1.0, 1.0) if a.hflip else torch.ones(n, device=x.device)
    tx = _u(n, -a.shift_px, a.shift_px, gen, x.device) * (2.0 / w)
    ty = _u(n, -a.shift_px, a.shift_px, gen, x.device) * (2.0 / h)
    shear = torch.tan(_u(n, -a.shear_deg, a.shear_deg, gen, x.device) * (math.pi / 180.0)) if a.shear_deg \
        else torch.zeros(n, device=x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, cos * flip * shear - sin, tx], 1),
                         torch.stack([sin * flip, sin * flip * shear + cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _photometric(x: torch.Tensor, a: Augmentation, gen) -> torch.Tensor:
    n = x.shape[0]
    c = _u(n, 1 - a.contrast, 1 + a.contrast, gen, x.device).view(n, 1, 1, 1)
    b = _u(n, -a.brightness, a.brightness, gen, x.device).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(0.0, 1.0)


def _erase(x: torch.Tensor, prob: float, gen) -> torch.Tensor:
    n, _, h, w = x.shape
    area = _u(n, 0.02, 0.15, gen, x.device) * h * w
    aspect = torch.exp(_u(n, math.log(0.3), math.log(3.3), gen, x.device))
    eh = torch.sqrt(area * aspect).clamp(1, h)
    ew = torch.sqrt(area / aspect).clamp(1, w)
    top = torch.rand(n, generator=gen, device=x.device) * (h - eh)
    left = torch.rand(n, generator=gen, device=x.device) * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    on = (torch.rand(n, generator=gen, device=x.device) < prob).view(n, 1, 1)
    return x.masked_fill((box & on).unsqueeze(1), 0.0)


# the placed dataset's own placement on the 28x28 frame, as view parameters
_PLACED = dict(rotate_deg=PLACEMENT["rotate_deg"], shift_px=round(PLACEMENT["shift"] * 28, 6),
               scale=round((PLACEMENT["scale"][1] - PLACEMENT["scale"][0]) / 2, 6), shear_deg=PLACEMENT["shear_deg"])
_FASHION = dict(rotate_deg=10.0, shift_px=2.5, scale=0.1, hflip=True, brightness=0.1, contrast=0.2, erase_prob=0.25)

REGISTRY: dict[str, Augmentation] = {
    a.name: a
    for a in (
        Augmentation("none", "No transformation: the codec must keep everything it keeps (non-invariant baseline)."),
        Augmentation("geometric", "Small rotations (+-10 deg), shifts (+-2.5 px), zoom (+-10 %) and left-right flips.",
                     rotate_deg=10.0, shift_px=2.5, scale=0.1, hflip=True),
        Augmentation("photometric", "Brightness (+-0.1), contrast (+-20 %) and random erasing (p=0.25).",
                     brightness=0.1, contrast=0.2, erase_prob=0.25),
        Augmentation("fashion", "Label-preserving for Fashion-MNIST: geometric + photometric together.", **_FASHION),
        Augmentation("generic", "Nuisances most image tasks ignore, for the generic (zero-shot) compressor: rotations "
                     "(+-15 deg), shifts (+-3 px), zoom (+-15 %), brightness (+-0.15), contrast (+-40 %); no flips, "
                     "which change digits and text.",
                     rotate_deg=15.0, shift_px=3.0, scale=0.15, brightness=0.15, contrast=0.4),
        Augmentation("views", "Label-free views that keep the tasks (the task-agnostic compressor): crops/zoom "
                     "(+-15 %), shifts (+-3 px), small rotations (+-10 deg), left-right flips, brightness (+-0.1), "
                     "contrast (+-20 %) and Gaussian noise (std <= 0.05); no erasing, no label positives.",
                     rotate_deg=10.0, shift_px=3.0, scale=0.15, hflip=True, brightness=0.1, contrast=0.2, noise=0.05),
        Augmentation("placement", "Label-free views for items at any placement (the task-agnostic compressor of "
                     "`--data fashion-mnist-placed`): the data's own nuisance (taskcodec.data.PLACEMENT: rotations "
                     f"+-{_PLACED['rotate_deg']:g} deg, shifts +-{_PLACED['shift_px']:g} px, zoom "
                     f"+-{100 * _PLACED['scale']:g} %, shear +-{_PLACED['shear_deg']:g} deg) plus left-right flips, "
                     "brightness (+-0.1), contrast (+-20 %) and Gaussian noise (std <= 0.05); no labels.",
                     hflip=True, brightness=0.1, contrast=0.2, noise=0.05, **_PLACED),
        Augmentation("fashion+label", "The fashion views, and the positive view is another training image of the "
                     "same class half the time (invariance to all label-preserving changes; same-class batch items "
                     "also count as positives).", label_positive_prob=0.5, **_FASHION),
    )
}


def get_augmentation(name: str) -> Augmentation:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown augmentations {name!r}; choose one of {', '.join(REGISTRY)}") from None


def augment_images(images, augmentation: Augmentation, seed: int):
    """uint8 images at native size, gray [N, H, W] or RGB [N, H, W, 3] -> one augmented view of each, same shape."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = augmentation(x, torch.Generator().manual_seed(seed))
    y = y.squeeze(1) if images.ndim == 3 else y.permute(0, 2, 3, 1)
    return y.mul(255.0).round().clamp(0, 255).to(torch.uint8).numpy()
