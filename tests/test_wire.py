"""Wire format: round trips, and every malformed input raises WireError (never anything else)."""

import numpy as np
import pytest

from taskcodec import wire


def test_messages_round_trip():
    msgs = [
        wire.Hello(b"\x01" * 8, "cam-7", b"secret"),
        wire.Batch(5, [wire.Frame(100 + i, 1_700_000_000_000 + 200 * i, bytes([i]) * (i + 6)) for i in range(50)]),
        wire.Ack(5, 100, 50),
        wire.Reject(5, 100, 1, wire.Code.BAD_PAYLOAD, "stream check failed"),
        wire.Error(wire.Code.UNKNOWN_MODEL, "expected model 00ff"),
        wire.Welcome(),
    ]
    for m in msgs:
        assert wire.decode(m.encode()) == m


def test_batch_framing_overhead_is_small():
    frames = [wire.Frame(i, 1000 + 200 * i, b"x" * 6) for i in range(50)]
    encoded = wire.Batch(1, frames).encode()
    assert (len(encoded) - 50 * 6) / 50 <= 4


def test_malformed_messages_raise_wire_error_only():
    rng = np.random.default_rng(0)
    good = wire.Batch(5, [wire.Frame(i, 1000 + i, b"abcdef") for i in range(4)]).encode()
    for _ in range(5000):
        data = bytearray(good if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 60))))
        for _ in range(int(rng.integers(1, 4))):
            if data and rng.random() < 0.7:
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            elif data:
                del data[int(rng.integers(0, len(data))):]
        try:
            wire.decode(bytes(data))
        except wire.WireError:
            pass
    with pytest.raises(wire.WireError, match="trailing"):
        wire.decode(good + b"\0")
    with pytest.raises(wire.WireError, match="unknown"):
        wire.decode(b"\x7f")
