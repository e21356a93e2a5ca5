"""Entropy coding of integer latents: frozen tables (tables.py), the range coder (range_coder.py) and the per-image
stream with its integrity check (stream.py)."""

from taskcodec.coding.tables import EntropyTables
from taskcodec.coding.range_coder import RangeCoder
from taskcodec.coding.stream import StreamError, compress, decompress

__all__ = ["EntropyTables", "RangeCoder", "StreamError", "compress", "decompress"]
