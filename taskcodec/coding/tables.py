"""Frozen entropy tables: the explicit state that makes a bitstream decodable on another machine.

Per latent dimension d the support is the integer range ``lower[d] .. lower[d] + length[d] - 1``; ``pmf[d, i]`` is the
probability of symbol ``lower[d] + i`` and ``pmf[d, length[d]]`` the probability of the *escape* symbol, which is coded
for any value outside the support (the value itself then follows as a raw 32-bit word, so nothing is ever clamped).
The tables are computed once by training and shipped in the bundle as float32; coders never recompute them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TablesError(ValueError):
    """The tables file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class EntropyTables:
    lower: np.ndarray   # int32 [D]
    length: np.ndarray  # int32 [D], support size without the escape
    pmf: np.ndarray     # float32 [D, max(length) + 1], zero-padded after the escape entry

    def __post_init__(self) -> None:
        lower = np.ascontiguousarray(self.lower, dtype=np.int32)
        length = np.ascontiguousarray(self.length, dtype=np.int32)
        pmf = np.ascontiguousarray(self.pmf, dtype=np.float32)
        if lower.ndim != 1 or length.shape != lower.shape or pmf.ndim != 2 or pmf.shape[0] != lower.shape[0]:
            raise TablesError(f"inconsistent table shapes: lower {lower.shape}, length {length.shape}, pmf {pmf.shape}")
        if (length < 1).any() or pmf.shape[1] < int(length.max()) + 1:
            raise TablesError("every dimension needs a support of at least one symbol plus the escape")
        if not np.isfinite(pmf).all() or (pmf < 0).any():
            raise TablesError("probabilities must be finite and non-negative")
        if (pmf[np.arange(len(length)), length] <= 0).any():
            raise TablesError("the escape symbol needs a positive probability")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "pmf", pmf)

    @property
    def dim(self) -> int:
        return int(self.lower.shape[0])

    @classmethod
    def from_pmfs(cls, lower: np.ndarray, pmfs: list[np.ndarray], escape_mass: float = 1e-6) -> "EntropyTables":
        """Build tables from per-dimension probabilities over the support; the escape gets ``escape_mass``."""
        width = max(len(p) for p in pmfs) + 1
        table = np.zeros((len(pmfs), width), dtype=np.float64)
        for d, p in enumerate(pmfs):
            p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
            p = p / p.sum() * (1.0 - escape_mass)
            table[d, : len(p)] = p
            table[d, len(p)] = escape_mass
        return cls(np.asarray(lower, np.int32), np.array([len(p) for p in pmfs], np.int32), table.astype(np.float32))

    def indices(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Table index per entry (escape where outside the support) and the mask of escaped entries."""
        offset = np.asarray(symbols, dtype=np.int64) - self.lower
        escaped = (offset < 0) | (offset >= self.length)
        return np.where(escaped, self.length, offset).astype(np.int32), escaped

    def estimated_bits(self, symbols: np.ndarray) -> np.ndarray:
        """Ideal code length in bits per row of ``symbols`` [N, D] (escapes cost their raw 32 bits too)."""
        symbols = np.atleast_2d(symbols)
        idx, escaped = self.indices(symbols)
        rows = np.broadcast_to(np.arange(self.dim), idx.shape)
        p = self.pmf.astype(np.float64) / self.pmf.astype(np.float64).sum(axis=1, keepdims=True)
        return (-np.log2(p[rows, idx])).sum(axis=1) + 32.0 * escaped.sum(axis=1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, lower=self.lower, length=self.length, pmf=self.pmf)
        return buf.getvalue()

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.lower, self.length, self.pmf):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "EntropyTables":
        path = Path(path)
        if not path.is_file():
            raise TablesError(f"entropy tables not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["lower"], z["length"], z["pmf"])
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, TablesError):
                raise
            raise TablesError(f"{path} is not a valid entropy table file: {exc}") from exc
