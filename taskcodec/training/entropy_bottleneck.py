"""Learned factorized prior (Ballé et al. 2018, "Variational image compression with a scale hyperprior", appendix 6.1).

A re-implementation of CompressAI's ``EntropyBottleneck`` for flat latents [N, D] (CompressAI itself needs torchvision,
which does not import here). Each dimension has its own monotone non-parametric CDF built from softplus-positive
matrices; the likelihood of an integer bin is ``CDF(y+0.5) - CDF(y-0.5)``. Training adds uniform noise (a
differentiable proxy of rounding); evaluation rounds. The symbols are plain ``round(y)`` with no median offset, so the
exported encoder ends in a single ONNX ``Round``. Learned quantiles (trained by :meth:`aux_loss`, which never moves the
density itself) bound the integer support that :meth:`tables` freezes for the range coder.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskcodec.coding import EntropyTables

LIKELIHOOD_BOUND = 1e-9


class EntropyBottleneck(nn.Module):
    def __init__(self, dim: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0,
                 tail_mass: float = 1e-6):
        super().__init__()
        self.dim = int(dim)
        self.filters = tuple(int(f) for f in filters)
        self.tail_mass = float(tail_mass)
        widths = (1,) + self.filters + (1,)
        scale = init_scale ** (1.0 / (len(self.filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1.0 / scale / widths[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((dim, widths[i + 1], widths[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(dim, widths[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(dim, widths[i + 1], 1)))
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(dim, 1, 1))
        target = math.log(2.0 / self.tail_mass - 1.0)
        self.register_buffer("target", torch.tensor([-target, 0.0, target]))

    # -- density ------------------------------------------------------------------------------------------------
    def _logits_cumulative(self, x: torch.Tensor, stop_gradient: bool = False) -> torch.Tensor:
        """x [D, 1, M] -> logit of the CDF at x, same shape; computed in x's dtype (float64 for the tables)."""
        logits = x
        for i in range(len(self.filters) + 1):
            matrix, bias = self.matrices[i], self.biases[i]
            if stop_gradient:
                matrix, bias = matrix.detach(), bias.detach()
            logits = torch.matmul(F.softplus(matrix.to(x.dtype)), logits) + bias.to(x.dtype)
            if i < len(self.filters):
                factor = self.factors[i].detach() if stop_gradient else self.factors[i]
                logits = logits + torch.tanh(factor.to(x.dtype)) * torch.tanh(logits)
        return logits

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability mass of the unit bin around each entry of y [N, D] (not yet lower-bounded)."""
        x = y.t().unsqueeze(1)  # [D, 1, N]
        lower = self._logits_cumulative(x - 0.5)
        upper = self._logits_cumulative(x + 0.5)
        # Evaluate on the side of the median where sigmoid is far from 1, for precision in the tails.
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return p.squeeze(1).t()

    def bits(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Estimated code length in bits per sample [N] of (noisy or rounded) latents [N, D]."""
        p = self.likelihood(y_hat).clamp_min(LIKELIHOOD_BOUND)
        return -torch.log2(p).sum(dim=1)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y [N, D] -> (y_hat, bits [N]): noisy in training, rounded (straight-through gradient) otherwise."""
        if self.training:
            y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        else:
            y_hat = y + (torch.round(y) - y).detach()
        return y_hat, self.bits(y_hat)

    # -- support ------------------------------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """Moves the quantiles to CDF = tail/2, 1/2, 1 - tail/2; it does not touch the density parameters."""
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    @torch.no_grad()
    def fit_quantiles(self, steps: int = 3000, lr: float = 0.05) -> float:
        """Converge the quantiles with the aux loss alone (no data needed); returns the final aux loss."""
        opt = torch.optim.Adam([self.quantiles], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            with torch.enable_grad():
                opt.zero_grad()
                loss = self.aux_loss()
                loss.backward()
            opt.step()
            sched.step()
        return float(loss)

    @torch.no_grad()
    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """Integer (lower, upper) per dimension, inclusive, from the learned quantiles."""
        q = self.quantiles.detach().double().squeeze(1)
        lo = torch.minimum(q[:, 0], q[:, 1])
        hi = torch.maximum(q[:, 2], q[:, 1])
        return torch.floor(lo).long().numpy(), torch.ceil(hi).long().numpy()

    @torch.no_grad()
    def tables(self, tail_mass: float = 1e-6) -> EntropyTables:
        """Freeze the density into integer tables; the escape carries the mass outside the support (>= tail_mass)."""
        lower, upper = self.support()
        pmfs = []
        escape = tail_mass
        for d in range(self.dim):
            xs = torch.arange(int(lower[d]), int(upper[d]) + 1, dtype=torch.float64)
            x = xs.view(1, 1, -1)
            lo = self._logits_cumulative_single(d, x - 0.5)
            hi = self._logits_cumulative_single(d, x + 0.5)
            sign = -torch.sign(lo + hi)
            p = torch.abs(torch.sigmoid(sign * hi) - torch.sigmoid(sign * lo)).view(-1).numpy()
            pmfs.append(p.astype(np.float32).astype(np.float64))
            escape = max(escape, 1.0 - float(p.sum()))
        return EntropyTables.from_pmfs(lower.astype(np.int32), pmfs, escape_mass=min(escape, 0.5))

    def _logits_cumulative_single(self, d: int, x: torch.Tensor) -> torch.Tensor:
        logits = x
        for i in range(len(self.filters) + 1):
            logits = torch.matmul(F.softplus(self.matrices[i][d:d + 1].double()), logits) + self.biases[i][d:d + 1].double()
            if i < len(self.filters):
                logits = logits + torch.tanh(self.factors[i][d:d + 1].double()) * torch.tanh(logits)
        return logits
