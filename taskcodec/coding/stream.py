"""The per-image stream: ``check (2 bytes) || range-coded bytes``.

The range coder emits 32-bit words, written big-endian so that the stream ends with the least significant bytes of
its final code point. Those bytes are mostly not needed: ``compress`` drops trailing bytes (rounding the kept prefix
up by one unit where the truncated point would fall below the final interval) for as long as the stream, zero-padded
back to whole words, still decodes to the same symbols — verified by decoding, so it is exact. This puts the coded
payload within a few bits of the ideal code length instead of rounding it up to whole 32-bit words.

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
# Stop trimming once the payload is within this many bits of the ideal code length: a further byte is then almost
# never removable, and skipping the (failing) verification decodes saves ~20 % of the coding time for ~0.06 bits.
TRIM_SLACK_BITS = 4.0


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
    idx = idx.astype(np.int32)
    payload = coder.encode_prepared(idx, halves).astype(">u4").tobytes()
    ideal = coder.ideal_bits(idx, halves)
    while payload and 8 * len(payload) > ideal + TRIM_SLACK_BITS:
        shorter = payload[:-1]
        rounded_up = _increment(shorter)
        if coder.matches(_words(shorter), idx, halves):
            payload = shorter
        elif rounded_up is not None and coder.matches(_words(rounded_up), idx, halves):
            payload = rounded_up
        else:
            break
    return _check(model_tag, payload) + payload


def _increment(prefix: bytes) -> bytes | None:
    """The big-endian number ``prefix`` plus one (same length), or None if it would overflow or is empty."""
    value = int.from_bytes(prefix, "big") + 1 if prefix else None
    return value.to_bytes(len(prefix), "big") if value is not None and value < 1 << (8 * len(prefix)) else None


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
