"""The per-image stream: ``check (2 bytes) || range-coded words``.

The 16-bit check is a CRC over the model tag, the payload length and the payload, so bytes from another model, a
truncated or extended packet, or flipped bits are refused with :class:`StreamError` instead of decoding to garbage.
Decoding is bounded: the decoder reads at most D categorical symbols plus 2 words per escape.
"""

from __future__ import annotations

import binascii
import struct

import numpy as np

from taskcodec.coding.range_coder import RangeCoder
from taskcodec.coding.tables import EntropyTables

CHECK_BYTES = 2


class StreamError(ValueError):
    """Bytes that are not a stream of this model: corrupt, truncated, extended or foreign."""


def _check(model_tag: bytes, payload: bytes) -> bytes:
    crc = binascii.crc_hqx(struct.pack("<I", len(payload)) + payload, binascii.crc_hqx(model_tag, 0xFFFF))
    return struct.pack("<H", crc ^ 0xFFFF)


def _coder(tables: EntropyTables | RangeCoder) -> RangeCoder:
    return tables if isinstance(tables, RangeCoder) else RangeCoder(tables)


def compress(symbols: np.ndarray, tables: EntropyTables | RangeCoder, model_tag: bytes = b"") -> bytes:
    """One image's symbols [D] -> bytes. Pass a RangeCoder to reuse its prepared tables on a hot path."""
    payload = _coder(tables).encode(symbols).astype("<u4").tobytes()
    return _check(model_tag, payload) + payload


def decompress(data: bytes, tables: EntropyTables | RangeCoder, model_tag: bytes = b"") -> np.ndarray:
    """bytes -> the image's symbols [D] (int32); raises StreamError for anything that is not such a stream."""
    data = bytes(data)
    if len(data) < CHECK_BYTES + 4 or (len(data) - CHECK_BYTES) % 4:
        raise StreamError(f"a stream is 2 check bytes plus whole 32-bit words; got {len(data)} bytes")
    payload = data[CHECK_BYTES:]
    if _check(model_tag, payload) != data[:CHECK_BYTES]:
        raise StreamError("stream check failed: corrupt bytes, or a stream of another model")
    coder = _coder(tables)
    try:
        return coder.decode(np.frombuffer(payload, dtype="<u4"))
    except (ValueError, RuntimeError, OverflowError) as exc:  # constriction reports malformed words this way
        raise StreamError(f"undecodable stream: {exc}") from exc


def coded_bits(data: bytes) -> int:
    return 8 * len(data)
