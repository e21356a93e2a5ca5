"""Frozen entropy tables: the explicit state that makes a bitstream decodable on another machine.

Per latent dimension d the support is the integer range ``lower[d] .. lower[d] + length[d] - 1``; ``pmf[d, i]`` is the
probability of symbol ``lower[d] + i`` and ``pmf[d, length[d]]`` the probability of the *escape* symbol, which is coded
for any value outside the support (the value itself then follows as a raw 32-bit word, so nothing is ever clamped).

Coders use only the **integer CDF** ``cdf[d, 0..length[d] + 1]`` (uint32, ``cdf[d, 0] = 0``, strictly increasing,
``cdf[d, length[d] + 1] = 2**precision``; padding after it repeats ``2**precision``). It is quantised from the float
pmf once (``quantize_cdf``, at training/export time), stored in the bundle's tables.npz next to the float pmf and
covered by the model id; coders never recompute it. The float pmf stays for the size estimate and for training.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TablesError(ValueError):
    """The tables file is missing, malformed or inconsistent."""


CODER = "taskcodec-range56"   # the coder these tables drive (taskcodec/coding/c/taskcodec_coder.c)
PRECISION_BITS = 16          # default CDF precision: every row sums to 2**16
MAX_PRECISION_BITS = 24
BLOB_MAGIC = b"TCCT"


def quantize_cdf(pmf: np.ndarray, length: np.ndarray, precision: int = PRECISION_BITS) -> np.ndarray:
    """Float pmf rows -> integer CDF rows [D, pmf width + 1] (uint32) summing to ``2**precision``.

    Every entry (support and escape) gets a frequency >= 1 so any value stays codable; the rest of the mass is
    allocated greedily to minimise the expected code length (start from floor(p * total), then move single counts
    where they gain / cost the least: the optimum of this separable convex problem). Deterministic for given inputs;
    it runs once, at export, and its output is what ships."""
    pmf = np.asarray(pmf, dtype=np.float64)
    length = np.asarray(length)
    total = 1 << int(precision)
    cdf = np.full((pmf.shape[0], pmf.shape[1] + 1), total, dtype=np.uint32)
    for d in range(pmf.shape[0]):
        n = int(length[d]) + 1
        if n > total:
            raise TablesError(f"dimension {d}: {n} entries do not fit a {precision}-bit CDF")
        p = pmf[d, :n] / pmf[d, :n].sum()
        freq = np.maximum(1, np.floor(p * total)).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            while freq.sum() < total:   # add a count where it saves the most expected bits
                freq[int(np.argmax(p * np.log2((freq + 1) / freq)))] += 1
            while freq.sum() > total:   # take a count where it costs the least (never below 1)
                cost = np.where(freq > 1, p * np.log2(freq / np.maximum(freq - 1, 1)), np.inf)
                freq[int(np.argmin(cost))] -= 1
        cdf[d, 0] = 0
        cdf[d, 1: n + 1] = np.cumsum(freq)
    return cdf


@dataclass(frozen=True)
class EntropyTables:
    lower: np.ndarray   # int32 [D]
    length: np.ndarray  # int32 [D], support size without the escape
    pmf: np.ndarray     # float32 [D, max(length) + 1], zero-padded after the escape entry
    cdf: np.ndarray | None = None  # uint32 [D, pmf width + 1]: the coder's integer CDF (quantised from pmf if None)
    precision: int = PRECISION_BITS

    def __post_init__(self) -> None:
        lower = np.ascontiguousarray(self.lower, dtype=np.int32)
        length = np.ascontiguousarray(self.length, dtype=np.int32)
        pmf = np.ascontiguousarray(self.pmf, dtype=np.float32)
        if lower.ndim != 1 or length.shape != lower.shape or pmf.ndim != 2 or pmf.shape[0] != lower.shape[0]:
            raise TablesError(f"inconsistent table shapes: lower {lower.shape}, length {length.shape}, pmf {pmf.shape}")
        if lower.shape[0] < 1 or (length < 1).any() or pmf.shape[1] < int(length.max()) + 1:
            raise TablesError("every dimension needs a support of at least one symbol plus the escape")
        if not np.isfinite(pmf).all() or (pmf < 0).any():
            raise TablesError("probabilities must be finite and non-negative")
        if (pmf[np.arange(len(length)), length] <= 0).any():
            raise TablesError("the escape symbol needs a positive probability")
        if ((lower.astype(np.int64) + length - 1) > np.iinfo(np.int32).max).any():
            raise TablesError("a support reaches beyond int32")
        precision = int(self.precision)
        if not 1 <= precision <= MAX_PRECISION_BITS:
            raise TablesError(f"CDF precision must be 1..{MAX_PRECISION_BITS} bits, got {precision}")
        if self.cdf is None:
            cdf = quantize_cdf(pmf, length, precision)
        else:
            raw = np.asarray(self.cdf)
            if raw.dtype.kind not in "iu" or raw.shape != (pmf.shape[0], pmf.shape[1] + 1):
                raise TablesError(f"integer CDF must be [D, {pmf.shape[1] + 1}] integers, got {raw.shape} {raw.dtype}")
            if (raw < 0).any() or (raw > (1 << precision)).any():
                raise TablesError(f"integer CDF values must lie in 0..2**{precision}")
            cdf = np.ascontiguousarray(raw, dtype=np.uint32)
            _check_cdf(cdf, length, precision)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "pmf", pmf)
        object.__setattr__(self, "cdf", cdf)
        object.__setattr__(self, "precision", precision)

    @property
    def stride(self) -> int:
        return int(self.cdf.shape[1])

    def frequencies(self, d: int) -> np.ndarray:
        """Integer frequencies of dimension d's entries (support then escape)."""
        return np.diff(self.cdf[d, : int(self.length[d]) + 2].astype(np.int64))

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

    def model_bits(self, symbols: np.ndarray) -> np.ndarray:
        """Ideal code length in bits per row of ``symbols`` [N, D] under the *integer* CDF the coder uses."""
        symbols = np.atleast_2d(symbols)
        idx, escaped = self.indices(symbols)
        rows = np.broadcast_to(np.arange(self.dim), idx.shape)
        freq = self.cdf[rows, idx + 1].astype(np.float64) - self.cdf[rows, idx]
        return (self.precision - np.log2(freq)).sum(axis=1) + 32.0 * escaped.sum(axis=1)

    def estimated_bits(self, symbols: np.ndarray) -> np.ndarray:
        """Ideal code length in bits per row of ``symbols`` [N, D] (escapes cost their raw 32 bits too)."""
        symbols = np.atleast_2d(symbols)
        idx, escaped = self.indices(symbols)
        rows = np.broadcast_to(np.arange(self.dim), idx.shape)
        p = self.pmf.astype(np.float64) / self.pmf.astype(np.float64).sum(axis=1, keepdims=True)
        return (-np.log2(p[rows, idx])).sum(axis=1) + 32.0 * escaped.sum(axis=1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, lower=self.lower, length=self.length, pmf=self.pmf, cdf=self.cdf,
                 precision_bits=np.int32(self.precision))
        return buf.getvalue()

    def to_blob(self) -> bytes:
        """The tables as firmware loads them (tcc_blob_load in taskcodec_coder.h): little-endian header and arrays."""
        header = BLOB_MAGIC + struct.pack("<BBHII", 1, self.precision, 0, self.dim, self.stride)
        return (header + self.lower.astype("<i4").tobytes() + self.length.astype("<u4").tobytes()
                + self.cdf.astype("<u4").tobytes())

    def digest(self) -> str:
        """Content hash of everything that defines the bytes: coder, precision, integer CDF (and supports, pmf)."""
        h = hashlib.sha256(f"{CODER}/{self.precision}".encode())
        for a in (self.lower, self.length, self.pmf, self.cdf):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, require_cdf: bool = False) -> "EntropyTables":
        """Read tables.npz. A file without the integer CDF (a training run's, or an old bundle's) gets it quantised
        here unless ``require_cdf`` (bundles: the shipped CDF is the contract)."""
        path = Path(path)
        if not path.is_file():
            raise TablesError(f"entropy tables not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "cdf" not in z.files:
                    if require_cdf:
                        raise TablesError(f"{path} has no integer CDF (tables from before the integer-CDF format)")
                    return cls(z["lower"], z["length"], z["pmf"])
                return cls(z["lower"], z["length"], z["pmf"], z["cdf"], int(z["precision_bits"]))
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, TablesError):
                raise
            raise TablesError(f"{path} is not a valid entropy table file: {exc}") from exc


def _check_cdf(cdf: np.ndarray, length: np.ndarray, precision: int) -> None:
    total = 1 << precision
    for d in range(cdf.shape[0]):
        n = int(length[d]) + 1
        row = cdf[d].astype(np.int64)
        if row[0] != 0 or row[n] != total or (np.diff(row[: n + 1]) < 1).any() or (row[n:] != total).any():
            raise TablesError(f"integer CDF row {d} is invalid: it must start at 0, increase strictly over the "
                              f"{n} entries (support + escape) and end at 2**{precision}, padded with 2**{precision}")
