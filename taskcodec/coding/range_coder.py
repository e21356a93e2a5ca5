"""Range coding of integer latents with constriction, driven only by the frozen tables.

Symbols inside a dimension's support are coded with that dimension's categorical model; a symbol outside it is coded
as the escape entry followed by its zig-zag 32-bit value as two uniform 16-bit halves.
"""

from __future__ import annotations

import constriction
import numpy as np

from taskcodec.coding.tables import EntropyTables

_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_HALF_WORD = constriction.stream.model.Uniform(1 << 16)


def _zigzag(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64) & 0xFFFFFFFF


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return ((u >> 1) ^ -(u & 1)).astype(np.int64)


class RangeCoder:
    """Encodes one image's symbol vector [D] to 32-bit words and back."""

    def __init__(self, tables: EntropyTables):
        self.tables = tables
        # constriction wants float64 rows; the float32 shipped tables are widened exactly.
        self._probabilities = tables.pmf.astype(np.float64)

    def prepare(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """What gets coded: table indices [D] (escape where outside the support) and the escaped values' halves."""
        symbols = np.asarray(symbols).reshape(-1)
        if symbols.shape[0] != self.tables.dim:
            raise ValueError(f"expected {self.tables.dim} symbols, got {symbols.shape[0]}")
        if symbols.dtype.kind not in "iu":
            raise TypeError(f"symbols must be integers, got {symbols.dtype}")
        idx, escaped = self.tables.indices(symbols)
        if not escaped.any():
            return idx, None
        esc = symbols[escaped].astype(np.int64)
        if ((esc < -(2**31)) | (esc >= 2**31)).any():
            raise ValueError("escaped symbols must fit in int32")
        z = _zigzag(esc)
        return idx, np.stack([z >> 16, z & 0xFFFF], axis=1).reshape(-1).astype(np.int32)

    def _encoder(self, idx: np.ndarray, halves: np.ndarray | None):
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(idx, _CATEGORICAL, self._probabilities)
        if halves is not None:
            encoder.encode(halves, _HALF_WORD)
        return encoder

    def encode_prepared(self, idx: np.ndarray, halves: np.ndarray | None) -> np.ndarray:
        return self._encoder(idx, halves).get_compressed()

    def encode_interval(self, idx: np.ndarray, halves: np.ndarray | None) -> tuple[int, int, int, np.ndarray]:
        """The coder's final interval as integers over the whole stream: ``(low, high, total_bits, sealed_words)``.

        Any point in ``[low, high)`` (``total_bits`` wide: the emitted words plus the 64-bit state) decodes to these
        symbols; ``sealed_words`` is constriction's own (word-granular) termination of the same stream.
        """
        encoder = self._encoder(idx, halves)
        emitted, (lower, width) = encoder.pos()
        sealed = encoder.get_compressed()
        head = int.from_bytes(sealed[:emitted].astype(">u4").tobytes(), "big") if emitted else 0
        low = (head << 64) + lower
        return low, low + width, 32 * emitted + 64, sealed

    def encode(self, symbols: np.ndarray) -> np.ndarray:
        return self.encode_prepared(*self.prepare(symbols))

    def decode(self, words: np.ndarray) -> np.ndarray:
        decoder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
        idx = decoder.decode(_CATEGORICAL, self._probabilities).astype(np.int64)
        symbols = idx + self.tables.lower
        escaped = idx == self.tables.length
        if escaped.any():
            halves = decoder.decode(_HALF_WORD, int(escaped.sum()) * 2).astype(np.int64).reshape(-1, 2)
            symbols[escaped] = _unzigzag((halves[:, 0] << 16) | halves[:, 1])
        return symbols.astype(np.int32)
