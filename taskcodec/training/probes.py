"""Downstream probes on *decoded integer symbols*: what the server can actually predict from what it received.

:class:`StandardisedClassifier` keeps the symbol standardisation inside the module so that it exports to ONNX as the
bundle's server classifier (int32 symbols [N, D] -> logits [N, classes]) with nothing to remember outside.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class StandardisedClassifier(nn.Module):
    def __init__(self, dim: int, hidden: int = 0, n_classes: int = 10, mean=None, std=None):
        super().__init__()
        self.dim, self.hidden, self.n_classes = int(dim), int(hidden), int(n_classes)
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32))
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, n_classes))
        else:
            self.net = nn.Linear(dim, n_classes)

    def init_args(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "n_classes": self.n_classes}

    def forward(self, symbols: torch.Tensor) -> torch.Tensor:
        return self.net((symbols.to(torch.float32) - self.mean) / self.std)


def fit_probe(symbols: np.ndarray, labels: np.ndarray, hidden: int = 0, epochs: int = 30, batch_size: int = 256,
              lr: float = 1e-2, seed: int = 0, n_classes: int = 10) -> StandardisedClassifier:
    """Train a linear (hidden=0) or one-hidden-layer probe on int symbols [N, D] with AdamW + cosine schedule."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(symbols), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    std = x.std(0)
    probe = StandardisedClassifier(x.shape[1], hidden, n_classes, x.mean(0), torch.where(std > 1e-6, std, 1.0))
    return train_minibatch(probe, x, y, F.cross_entropy, epochs, batch_size, lr, gen)


def train_minibatch(module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn, epochs: int,
                    batch_size: int, lr: float, gen: torch.Generator) -> torch.nn.Module:
    """The probes' recipe: AdamW (weight decay 1e-4) with a one-cycle schedule over shuffled minibatches; returns
    ``module`` in eval mode. Shared by the classification probes and the attribute regressors of bench tasks."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * ((len(x) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            b = order[i:i + batch_size]
            loss = loss_fn(module(x[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return module.eval()


@torch.no_grad()
def accuracy(probe: StandardisedClassifier, symbols: np.ndarray, labels: np.ndarray) -> float:
    probe.eval()
    pred = probe(torch.as_tensor(np.asarray(symbols))).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())
