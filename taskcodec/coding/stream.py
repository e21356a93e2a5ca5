"""The per-image stream (payload): ``check (2 bytes) || range-coded bytes`` (docs/wire-format.md).

The range coder (range_coder.py; C in taskcodec/coding/c/) terminates with the shortest byte string whose value,
zero-padded, lies in its final interval, so a payload is within a byte of the ideal code length under the integer
tables, plus the 2 check bytes. Decoders pad with zeros. Decoding is bounded: at most D table symbols plus 2 halves
per escape, each a fixed amount of integer work, whatever the bytes.
"""

from __future__ import annotations

import numpy as np

from taskcodec.coding.range_coder import CoderError, RangeCoder, check_bytes
from taskcodec.coding.tables import EntropyTables

CHECK_BYTES = 2


class StreamError(ValueError):
    """Bytes that are not a stream of this model: corrupt, truncated, extended or foreign."""


_check = check_bytes  # the name tests and the firmware cross-checks import


def _coder(tables: EntropyTables | RangeCoder) -> RangeCoder:
    return tables if isinstance(tables, RangeCoder) else RangeCoder(tables)


def compress(symbols: np.ndarray, tables: EntropyTables | RangeCoder, model_tag: bytes = b"") -> bytes:
    """One image's symbols [D] -> bytes. Pass a RangeCoder to reuse its prepared tables on a hot path."""
    return _coder(tables).compress(symbols, bytes(model_tag))


def decompress(data: bytes, tables: EntropyTables | RangeCoder, model_tag: bytes = b"") -> np.ndarray:
    """bytes -> the image's symbols [D] (int32); raises StreamError for anything that is not such a stream."""
    data = bytes(data)
    if len(data) < CHECK_BYTES:
        raise StreamError(f"a stream starts with {CHECK_BYTES} check bytes; got {len(data)} bytes")
    try:
        return _coder(tables).decompress(data, bytes(model_tag))
    except CoderError as exc:
        message = str(exc)
        raise StreamError(message if message.startswith("stream check failed") else f"undecodable stream: {message}") \
            from exc


def coded_bits(data: bytes) -> int:
    return 8 * len(data)
