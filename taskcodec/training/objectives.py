"""Training objectives: distortion (nats) + beta * rate (bits per image).

* BINCE (bottlenecked InfoNCE): two augmented views both go through the bottleneck; a critic on their noisy latents
  must identify which views belong together. With label positives ("fashion+label") every same-class batch item is
  a positive too (SupCon-style masking), i.e. invariance to all label-preserving transformations.
* VIC: the decoder reconstructs the *unaugmented* image from an augmented view's latents (invariant reconstruction).
* VC: the decoder reconstructs the augmented input itself: the ordinary, non-invariant neural codec baseline.
Reconstruction distortion is the squared error summed over pixels in [0, 1] units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskcodec.training.augmentations import Augmentation
from taskcodec.training.models import Compressor


@dataclass
class LossParts:
    loss: torch.Tensor        # what the optimiser minimises (includes the aux loss)
    distortion: torch.Tensor
    rate_bits: torch.Tensor   # mean estimated bits per image
    aux: torch.Tensor


def supcon_loss(features: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of -mean log p(positive | anchor) under a softmax over all other items.

    features [M, K] (L2-normalised inside), positives bool [M, M] (diagonal ignored).
    """
    f = F.normalize(features, dim=1)
    logits = f @ f.t() / temperature
    eye = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
    pos = positives & ~eye
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)).mean()


def bince(model: Compressor, views: Sequence[torch.Tensor], labels: torch.Tensor | None,
          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(distortion, bits [kN]) for k >= 2 standardised views of the same N images (every view of an image is a
    positive of the others); labels enable same-class positives."""
    n, k = views[0].shape[0], len(views)
    y_hat, bits = model(torch.cat(list(views)))
    idx = torch.arange(k * n, device=views[0].device)
    positives = (idx.view(-1, 1) % n) == (idx.view(1, -1) % n)
    if labels is not None:
        lab = labels.repeat(k)
        positives = positives | (lab.view(-1, 1) == lab.view(1, -1))
    return supcon_loss(model.head(y_hat), positives, temperature), bits


def reconstruction(model: Compressor, view: torch.Tensor, target01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y_hat, bits = model(view)
    recon = torch.sigmoid(model.decoder(y_hat))
    return ((recon - target01) ** 2).sum(dim=(1, 2, 3)).mean(), bits


def compute_loss(model: Compressor, x01: torch.Tensor, pos01: torch.Tensor, labels: torch.Tensor,
                 aug: Augmentation, gen: torch.Generator, beta: float | None = None) -> LossParts:
    """One batch: x01 the images in [0, 1], pos01 the source of the positive view (x01 itself or a same-class image);
    ``beta`` overrides the config's rate weight (the warm-up schedule)."""
    cfg = model.config
    beta = cfg.beta if beta is None else beta
    if cfg.objective == "bince":
        # the first view of each image and its positive's view (itself or a same-class image), then any more views
        views = [model.standardise(aug(src, gen)) for src in (x01, pos01, *[x01] * (cfg.views - 2))]
        distortion, bits = bince(model, views, labels if aug.uses_labels else None, cfg.temperature)
    else:
        view01 = aug(x01, gen)
        target = x01 if cfg.objective == "vic" else view01
        distortion, bits = reconstruction(model, model.standardise(view01), target)
    rate = bits.mean()
    aux = model.bottleneck.aux_loss()
    return LossParts(distortion + beta * rate + aux, distortion.detach(), rate.detach(), aux.detach())
