"""The per-image stream: ``check (2 bytes) || range-coded bytes``.

The range coder works on 32-bit words (big-endian in the stream); its own termination rounds every stream up to
whole words. ``compress`` instead writes the shortest byte string whose value, zero-padded to the coder's width, lies
in the coder's final interval (read from the coder's state): any point of that interval decodes to the same symbols
(the range-coding invariant; tests check it on tens of thousands of streams, escapes included), so the coded payload
is within a few bits of the ideal code length. Decoders only pad with zeros.
Decoding is bounded: the decoder reads at most D categorical symbols plus 2 halves per escape.
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
    idx, halves = coder.prepare(symbols)
    low, high, total_bits, sealed = coder.encode_interval(idx, halves)
    payload = _shortest_point(low, high, total_bits)
    if payload is None:  # cannot happen for a valid coder state; the coder's own word-granular termination is valid
        payload = sealed.astype(">u4").tobytes()
    return _check(model_tag, payload) + payload


def _shortest_point(low: int, high: int, total_bits: int) -> bytes | None:
    """The shortest big-endian bytes whose value, zero-padded to ``total_bits``, lies in ``[low, high)``."""
    for length in range(total_bits // 8 + 1):
        shift = total_bits - 8 * length
        value = -(-low >> shift)  # the smallest multiple of 2**shift that is >= low
        if value < 1 << (8 * length) and value << shift < high:
            return value.to_bytes(length, "big")
    return None


def _words(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload + bytes(-len(payload) % 4), dtype=">u4").astype(np.uint32)


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
