"""The entropy coder "taskcodec-range56", driven only by the bundle's integer CDF tables (docs/wire-format.md).

Two implementations write and read the same bytes:

- ``"c"``: taskcodec/coding/c/taskcodec_coder.c through the extension ``taskcodec.coding._tcc`` (built at install
  time with the plain C compiler; the same C file is compiled into the firmware library);
- ``"python"``: this module's numpy/Python coder, for machines where the extension could not be built. Its encoder
  is written differently from the C one on purpose (one exact big integer instead of a 64-bit window with carry
  propagation), so the cross-check tests compare two independent derivations of the same format.

``RangeCoder(tables)`` picks the C coder when it is importable, unless ``TASKCODEC_CODER=python`` is set.
"""

from __future__ import annotations

import binascii
import bisect
import os
import struct

import numpy as np

from taskcodec.coding.tables import EntropyTables

try:  # built by setup.py (optional): absent when the install had no C compiler
    from taskcodec.coding import _tcc
except ImportError:  # pragma: no cover - exercised by forcing the Python backend
    _tcc = None

BACKENDS = ("c", "python")
CHECK_BYTES = 2
_TOP_BITS = 56        # the coder's window: 7 bytes
_BOT = 1 << 48        # renormalise while range < 2**48
_HALF_BITS = 16       # escaped values: zig-zag uint32 as two uniform 16-bit halves, high then low


class CoderError(ValueError):
    """Bytes that this coder's encoder never writes with these tables (wrong symbol region, trailing bytes ...)."""


def c_available() -> bool:
    return _tcc is not None


def default_backend() -> str:
    forced = os.environ.get("TASKCODEC_CODER", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"TASKCODEC_CODER must be one of {BACKENDS}, got {forced!r}")
        if forced == "c" and _tcc is None:
            raise ImportError("TASKCODEC_CODER=c but the C extension taskcodec.coding._tcc is not built "
                              "(reinstall with a C compiler: pip install -e .)")
        return forced
    return "c" if _tcc is not None else "python"


def check_bytes(model_tag: bytes, payload: bytes) -> bytes:
    """The payload's 2-byte check: CRC-16/CCITT (init 0xFFFF) over model_tag || u32le(len(payload)) || payload, xor
    0xFFFF, little-endian."""
    crc = binascii.crc_hqx(struct.pack("<I", len(payload)) + payload, binascii.crc_hqx(model_tag, 0xFFFF))
    return struct.pack("<H", crc ^ 0xFFFF)


def _zigzag(v: int) -> int:
    return ((v << 1) ^ (v >> 31)) & 0xFFFFFFFF


def _unzigzag(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


class RangeCoder:
    """Encodes one image's symbol vector [D] to bytes and back; ``compress``/``decompress`` add the 2-byte check."""

    def __init__(self, tables: EntropyTables, backend: str | None = None):
        self.tables = tables
        self.backend = backend or default_backend()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "c":
            if _tcc is None:
                raise ImportError("the C coder extension taskcodec.coding._tcc is not built")
            self._c = _tcc.Coder(tables.lower.astype(np.int32).tobytes(), tables.length.astype(np.uint32).tobytes(),
                                 tables.cdf.astype(np.uint32).tobytes(), tables.stride, tables.precision)
        else:
            # plain Python lists: per-symbol integer arithmetic is faster on ints than on numpy scalars
            self._lower = [int(v) for v in tables.lower]
            self._length = [int(v) for v in tables.length]
            self._rows = [[int(v) for v in tables.cdf[d, : self._length[d] + 2]] for d in range(tables.dim)]

    # -- the public interface used by stream.py, the runtime, the server and training ---------------------------

    def _symbols(self, symbols: np.ndarray) -> np.ndarray:
        symbols = np.asarray(symbols)
        if symbols.dtype.kind not in "iu":
            raise TypeError(f"symbols must be integers, got {symbols.dtype}")
        symbols = symbols.reshape(-1)
        if symbols.shape[0] != self.tables.dim:
            raise ValueError(f"expected {self.tables.dim} symbols, got {symbols.shape[0]}")
        if symbols.dtype != np.int32:
            wide = symbols.astype(np.int64)
            if ((wide < -(2**31)) | (wide >= 2**31)).any():
                raise ValueError("symbols must fit in int32")
            symbols = wide.astype(np.int32)
        return np.ascontiguousarray(symbols)

    def encode(self, symbols: np.ndarray) -> bytes:
        """Range-coded bytes of one symbol vector (no check bytes)."""
        symbols = self._symbols(symbols)
        if self.backend == "c":
            return self._c.encode(symbols, None)
        return self._py_encode(symbols.tolist())

    def decode(self, data: bytes) -> np.ndarray:
        """Inverse of ``encode``; raises CoderError for bytes no encoder writes with these tables."""
        if self.backend == "c":
            try:
                return np.frombuffer(self._c.decode(bytes(data), None), dtype=np.int32)
            except _tcc.CoderError as exc:
                raise CoderError(exc.args[1] if len(exc.args) > 1 else str(exc)) from None
        return np.array(self._py_decode(bytes(data)), dtype=np.int32)

    def compress(self, symbols: np.ndarray, model_tag: bytes = b"") -> bytes:
        """check (2 bytes) || range-coded bytes."""
        symbols = self._symbols(symbols)
        if self.backend == "c":
            return self._c.encode(symbols, bytes(model_tag))
        body = self._py_encode(symbols.tolist())
        return check_bytes(model_tag, body) + body

    def decompress(self, payload: bytes, model_tag: bytes = b"") -> np.ndarray:
        """check || coded bytes -> symbols; raises CoderError (message starting with "stream check failed" when the
        check does not match)."""
        payload = bytes(payload)
        if self.backend == "c":
            try:
                return np.frombuffer(self._c.decode(payload, bytes(model_tag)), dtype=np.int32)
            except _tcc.CoderError as exc:
                if exc.args and exc.args[0] == -4:  # TCC_E_CHECK
                    raise CoderError("stream check failed: corrupt bytes, or a stream of another model") from None
                raise CoderError(exc.args[1] if len(exc.args) > 1 else str(exc)) from None
        if check_bytes(bytes(model_tag), payload[CHECK_BYTES:]) != payload[:CHECK_BYTES]:
            raise CoderError("stream check failed: corrupt bytes, or a stream of another model")
        return np.array(self._py_decode(payload[CHECK_BYTES:]), dtype=np.int32)

    # -- the numpy/Python coder -------------------------------------------------------------------------------

    def _py_encode(self, symbols: list[int]) -> bytes:
        """Exact big-integer formulation: ``low`` is the whole code value so far (no carry bookkeeping needed),
        ``shifts`` counts the bytes that left the 56-bit window."""
        prec = self.tables.precision
        low, rng, shifts = 0, 1 << _TOP_BITS, 0

        def put(cum: int, freq: int, bits: int) -> None:
            nonlocal low, rng, shifts
            r = rng >> bits
            low += r * cum
            rng = r * freq
            while rng < _BOT:
                rng <<= 8
                low <<= 8
                shifts += 1

        for d, v in enumerate(symbols):
            row, off = self._rows[d], v - self._lower[d]
            if 0 <= off < self._length[d]:
                put(row[off], row[off + 1] - row[off], prec)
            else:
                esc = self._length[d]
                put(row[esc], row[esc + 1] - row[esc], prec)
                z = _zigzag(v)
                put(z >> _HALF_BITS, 1, _HALF_BITS)
                put(z & 0xFFFF, 1, _HALF_BITS)
        total_bytes = _TOP_BITS // 8 + shifts
        high = low + rng
        for zero_bytes in range(total_bytes, -1, -1):  # the point of [low, high) with the most trailing zero bytes
            unit = 1 << (8 * zero_bytes)
            value = -(-low // unit) * unit
            if value < high:
                break
        return value.to_bytes(total_bytes, "big").rstrip(b"\0")

    def _py_decode(self, data: bytes) -> list[int]:
        prec = self.tables.precision
        pos = 7
        code = int.from_bytes(data[:7].ljust(7, b"\0"), "big")
        rng = 1 << _TOP_BITS
        n = len(data)

        def narrow(r: int, cum: int, freq: int) -> None:
            nonlocal code, rng, pos
            code -= r * cum
            rng = r * freq
            while rng < _BOT:
                rng <<= 8
                code = (code << 8) | (data[pos] if pos < n else 0)
                pos += 1

        def half() -> int:
            r = rng >> _HALF_BITS
            q = code // r
            if q >> _HALF_BITS:
                raise CoderError("undecodable stream")
            narrow(r, q, 1)
            return q

        out = []
        for d in range(len(self._rows)):
            row, length = self._rows[d], self._length[d]
            r = rng >> prec
            q = code // r
            if q >= 1 << prec:
                raise CoderError("undecodable stream")
            k = bisect.bisect_right(row, q, 0, length + 2) - 1
            narrow(r, row[k], row[k + 1] - row[k])
            if k < length:
                out.append(self._lower[d] + k)
            else:
                hi = half()
                v = _unzigzag((hi << _HALF_BITS) | half())
                if 0 <= v - self._lower[d] < length:
                    raise CoderError("undecodable stream")  # an escape for a value inside the support
                out.append(v)
        if n > pos or (n and data[-1] == 0):
            raise CoderError("undecodable stream")  # bytes beyond what the encoder writes
        return out
