"""The per-image stream: ``check (2 bytes) || range-coded bytes``.

The range coder emits 32-bit words; its final word usually carries bytes the decoder does not need. ``compress``
drops trailing bytes for as long as the stream, zero-padded back to whole words, still decodes to the same symbols
(verified by decoding, so it is exact), which keeps the coded size within 32 bits of the ideal code length.

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
    coder = _coder(tables)
    symbols = np.asarray(symbols).reshape(-1)
    payload = coder.encode(symbols).astype("<u4").tobytes()
    while payload and _decodes_to(coder, payload[:-1], symbols):
        payload = payload[:-1]
    return _check(model_tag, payload) + payload


def _words(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload + bytes(-len(payload) % 4), dtype="<u4")


def _decodes_to(coder: RangeCoder, payload: bytes, symbols: np.ndarray) -> bool:
    try:
        return bool(np.array_equal(coder.decode(_words(payload)), symbols))
    except Exception:  # constriction signals undecodable data with several exception types
        return False


def decompress(data: bytes, tables: EntropyTables | RangeCoder, model_tag: bytes = b"") -> np.ndarray:
    """bytes -> the image's symbols [D] (int32); raises StreamError for anything that is not such a stream."""
    data = bytes(data)
    if len(data) < CHECK_BYTES:
        raise StreamError(f"a stream starts with {CHECK_BYTES} check bytes; got {len(data)} bytes")
    payload = data[CHECK_BYTES:]
    if _check(model_tag, payload) != data[:CHECK_BYTES]:
        raise StreamError("stream check failed: corrupt bytes, or a stream of another model")
    coder = _coder(tables)
    try:
        return coder.decode(_words(payload))
    except Exception as exc:  # constriction signals undecodable data with several exception types
        raise StreamError(f"undecodable stream: {exc}") from exc


def coded_bits(data: bytes) -> int:
    return 8 * len(data)
