"""Wire v3: the temporal capability in HELLO / WELCOME, TBATCH frame kinds in the low 2 bits of the length, ERROR
RESYNC; version-2 HELLOs still parse (v4 keeps all of it: tests/test_wire_v4.py) (and get a version-2 WELCOME), version 1 is refused."""

import numpy as np
import pytest

from taskcodec import wire


def test_v3_hello_welcome_and_tbatch_round_trip():
    hello = wire.Hello(b"\x01" * 8, "cam-7", b"secret", capabilities=wire.CAP_TEMPORAL, residual_tag=b"\x02" * 8)
    assert wire.decode(hello.encode()) == hello and hello.temporal
    plain = wire.Hello(b"\x01" * 8, "cam-7", b"secret", version=3)
    assert plain.encode()[1] == 3 and plain.encode()[-1] == 0 and wire.decode(plain.encode()) == plain
    v2 = wire.Hello(b"\x01" * 8, "cam-7", b"secret", version=2)
    assert wire.decode(v2.encode()) == v2 and v2.encode() == plain.encode()[:1] + b"\x02" + plain.encode()[2:-1]
    assert wire.Welcome(2).encode() == b"\x06\x02" and wire.Welcome(3, 1).encode() == b"\x06\x03\x01"
    assert wire.decode(b"\x06\x03\x01").temporal and not wire.decode(b"\x06\x03\x00").temporal
    frames = [wire.Frame(10, 1000, b"abc", wire.KEY), wire.Frame(11, 1200, b"", wire.SAME),
              wire.Frame(12, 1400, b"d", wire.COND), wire.Frame(13, 1600, b"", wire.KEY)]
    tb = wire.TemporalBatch(7, frames)
    data = tb.encode()
    assert data[0] == 0x07 and wire.decode(data) == tb and isinstance(wire.decode(data), wire.Batch)
    # per frame: delta, then length << 2 | kind
    assert data[-3:] == bytes([0x90, 0x03, 0 << 2 | wire.KEY])  # last frame: delta +200, empty KEY
    assert bytes([0x00, 3 << 2 | wire.KEY]) + b"abc" + bytes([0x90, 0x03, wire.SAME]) in data
    assert wire.decode(wire.Batch(7, [wire.Frame(1, 5, b"x")]).encode()) == wire.Batch(7, [wire.Frame(1, 5, b"x")])
    assert wire.decode(wire.Error(wire.Code.RESYNC, "lost").encode()) == wire.Error(7, "lost")


def test_v3_refusals():
    with pytest.raises(ValueError):
        wire.TemporalBatch(1, [wire.Frame(0, 0, b"x", wire.SAME)]).encode()     # SAME carries nothing
    with pytest.raises(ValueError):
        wire.Batch(1, [wire.Frame(0, 0, b"x", wire.COND)]).encode()             # plain BATCH: key frames only
    with pytest.raises(ValueError):
        wire.Hello(b"\x01" * 8, "c", b"", capabilities=wire.CAP_TEMPORAL).encode()  # no residual tag
    good = wire.TemporalBatch(1, [wire.Frame(0, 0, b"", wire.SAME)]).encode()
    assert good[-1] == wire.SAME
    for bad_last in (3, (1 << 2) | wire.SAME):  # kind 3; SAME with a payload byte
        with pytest.raises(wire.WireError, match="kind"):
            wire.decode(good[:-1] + bytes([bad_last]) + b"z" * (bad_last >> 2))
    v1 = bytearray(wire.Hello(b"\x01" * 8, "c", b"").encode())
    v1[1] = 1
    with pytest.raises(wire.WireError, match="version 1"):
        wire.decode(bytes(v1))


def test_tbatch_garbage_raises_wire_error_only():
    rng = np.random.default_rng(3)
    good = wire.TemporalBatch(5, [wire.Frame(i, 1000 + i, b"abc" if i % 3 != 1 else b"", [0, 2, 1][i % 3])
                                  for i in range(6)]).encode()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            if not data:
                break
            if rng.random() < 0.7:
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            else:
                del data[int(rng.integers(0, len(data))):]
        try:
            wire.decode(bytes(data))
        except wire.WireError:
            pass
