"""Wire v4 (issue 15): CBATCH, the compact TBATCH. Header fields that continue the connection's previous CBATCH are
left out, capture times at the nominal interval cost nothing, a run of SAME frames is one byte; a CBATCH decoded
without its connection is pending until ``Connection.resolve``; v2 and v3 HELLOs still parse, v1 is refused."""

import numpy as np
import pytest

from taskcodec import wire

T0 = 1_700_000_000_000


def _frames(first: int, times: list[int], kinds: list[int], rng=None) -> list[wire.Frame]:
    rng = rng or np.random.default_rng(0)
    return [wire.Frame(first + i, t, b"" if k == wire.SAME else rng.bytes(int(rng.integers(0, 9))), k)
            for i, (t, k) in enumerate(zip(times, kinds))]


def test_hello_and_welcome_v4_keep_the_v3_layout():
    hello = wire.Hello(b"\x01" * 8, "cam-7", b"secret", capabilities=wire.CAP_TEMPORAL, residual_tag=b"\x02" * 8)
    v3 = wire.Hello(b"\x01" * 8, "cam-7", b"secret", version=3, capabilities=wire.CAP_TEMPORAL,
                    residual_tag=b"\x02" * 8)
    assert hello.version == wire.VERSION == 4 and hello.encode()[1] == 4
    assert hello.encode()[2:] == v3.encode()[2:] and wire.decode(v3.encode()) == v3
    assert wire.Welcome(4, 1).encode() == b"\x06\x04\x01" and wire.decode(b"\x06\x04\x01").temporal
    v1 = bytearray(hello.encode())
    v1[1] = 1
    with pytest.raises(wire.WireError, match="version 1 is not supported.*version 4"):
        wire.decode(bytes(v1))
    v5 = bytearray(hello.encode())
    v5[1] = 5
    with pytest.raises(wire.WireError, match="version 5"):
        wire.decode(bytes(v5))


def test_cbatch_bytes_continuation_runs_and_times():
    cam, srv = wire.Connection(), wire.Connection()
    k = [wire.KEY, wire.SAME, wire.SAME, wire.COND, wire.SAME]
    first = cam.batch(9, _frames(41, [T0 + 200 * i for i in range(5)], k), 200)
    data = first.encode()
    assert data[:2] == bytes([0x08, 0x0F])  # every header field on a connection's first CBATCH
    assert srv.decode(data) == first and srv.link == wire.Link(9, 45, T0 + 800, 200)
    # the next one continues: no epoch, seq, time or interval; four SAME frames at 200 ms are one byte
    second = cam.batch(9, _frames(46, [T0 + 1000 + 200 * i for i in range(4)], [wire.SAME] * 4), 200)
    assert second.encode() == bytes([0x08, 0x00, 0x04, (4 - 1) << 2 | wire.SAME])
    assert srv.decode(second.encode()) == second
    # jitter: a SAME frame 3 ms late is one TIME item (deviation +3 from the previous frame + interval, SAME bit
    # set); the next frame is 3 ms "early" relative to that one; a KEY frame off the interval is a TIME item (SAME
    # bit clear) before its own item
    third = cam.batch(9, _frames(50, [T0 + 1800, T0 + 2003, T0 + 2200, T0 + 2395], [wire.SAME] * 3 + [wire.KEY]),
                      200)
    data = third.encode()
    assert data[:7] == bytes([0x08, 0x00, 0x04, wire.SAME, ((wire.zigzag(3) << 1 | 1) + 1) << 2 | 3,
                              ((wire.zigzag(-3) << 1 | 1) + 1) << 2 | 3, ((wire.zigzag(-5) << 1) + 1) << 2 | 3])
    assert data[7] & 3 == wire.KEY and srv.decode(data) == third
    # a clock step of years: an absolute time; another epoch and a gap in seqs: those fields come back
    step = cam.batch(10, _frames(0, [5_000, T0 + 10**12, 2**61], [wire.KEY, wire.SAME, wire.SAME]), 200)
    assert step.encode()[-1] == wire.SAME  # a step beyond 2^59 ms: an absolute time, then the SAME frame's own item
    data = step.encode()
    assert data[1] == wire.CB_EPOCH | wire.CB_SEQ and srv.decode(data) == step
    # runs longer than 32 frames take several one-byte items
    long = cam.batch(10, _frames(3, [2**61 + 200 * (i + 1) for i in range(70)], [wire.SAME] * 70), 200)
    assert long.encode()[3:] == bytes([31 << 2 | 2, 31 << 2 | 2, 5 << 2 | 2])
    assert srv.decode(long.encode()) == long


def test_cbatch_pending_without_the_connection():
    cam = wire.Connection()
    a = cam.batch(3, _frames(0, [T0, T0 + 100], [wire.KEY, wire.COND]), 100)
    b = cam.batch(3, _frames(2, [T0 + 200, T0 + 300], [wire.SAME, wire.SAME]), 100)
    assert wire.decode(a.encode()) == a and not wire.decode(a.encode()).pending  # self-contained
    pending = wire.decode(b.encode())
    assert pending.pending and pending.epoch == -1 and len(pending.frames) == 2
    with pytest.raises(wire.WireError, match="no previous CBATCH"):
        wire.Connection().resolve(wire.decode(b.encode()))
    srv = wire.Connection()
    srv.resolve(wire.decode(a.encode()))
    assert srv.resolve(pending) is pending and pending == b and not pending.pending
    with pytest.raises(wire.WireError, match="version-3 connection"):
        wire.Connection(3).decode(a.encode())
    with pytest.raises(wire.WireError, match="version-3 connection"):
        wire.Connection(3).resolve(wire.decode(a.encode()))
    # over HTTP (one request, no connection) only the self-contained form is complete
    body = wire.encode_ingest_body(wire.Hello(b"\x01" * 8, "c", b""), a)
    assert wire.decode_ingest_body(body)[1] == a


def test_cbatch_random_round_trips():
    rng = np.random.default_rng(4)
    cam, srv, lazy = wire.Connection(), wire.Connection(), wire.Connection()
    epoch, seq, ts = 2**63 - 1, 0, -5
    for _ in range(300):
        if rng.random() < 0.1:
            epoch = int(rng.integers(0, 2**63 - 1))
        if rng.random() < 0.1:
            seq += int(rng.integers(1, 1000))
        if rng.random() < 0.05:
            cam.reset(), srv.reset(), lazy.reset()
        n = int(rng.choice([1, 2, 5, 40, 130]))
        interval = int(rng.choice([0, 33, 200, 2**32 - 1]))
        times = []
        for _ in range(n):
            ts += interval + int(rng.choice([0, 0, 0, 1, -1, 17, -3000, 31_536_000_000]))
            ts = max(-wire.MAX_ABS_TS_MS, min(wire.MAX_ABS_TS_MS, ts))
            times.append(ts)
        kinds = [int(rng.choice([wire.KEY, wire.COND, wire.SAME, wire.SAME, wire.SAME])) for _ in range(n)]
        b = cam.batch(epoch, _frames(seq, times, kinds, rng), interval)
        data = b.encode()
        assert srv.decode(data) == b
        assert lazy.resolve(wire.decode(data)) == b
        seq += n


def test_cbatch_refusals_and_garbage():
    with pytest.raises(ValueError):
        wire.CompactBatch(1, [wire.Frame(0, 0, b"x", wire.SAME)], 200).encode()       # SAME carries nothing
    with pytest.raises(ValueError):
        wire.CompactBatch(1, [wire.Frame(0, 0, b"x", wire.KEY)], 2**32).encode()      # interval limit
    good = wire.CompactBatch(1, _frames(0, [T0, T0 + 200, T0 + 400], [wire.KEY, wire.SAME, wire.COND]), 200)
    data = good.encode()
    for bad, why in ((data[:1] + b"\x1f" + data[2:], "flags"),                       # unknown flag bit
                     (data + b"\x03", "trailing"),                                   # a TIME item after the end
                     (data[:-1], "ends early"),
                     (bytes([8, 0x0F, 1, 0, 0, 0, 2, 3 << 2 | 2]), "SAME run of 4"),  # run past the count
                     (bytes([8, 0x0F, 1, 0, 0, 0, 1, 7, 7, 2]), "TIME items in a row"),
                     (bytes([8, 0x0F, 1, 0, 0, 0, 1, 7, 11]), "TIME items in a row"),  # then a SAME-with-time
                     (bytes([8, 0x0F, 1, 0, 0, 0, 1, 7]), "ends early")):
        with pytest.raises(wire.WireError, match=why):
            wire.decode(bad)
    rng = np.random.default_rng(8)
    cam = wire.Connection()
    cam.batch(1, _frames(0, [T0], [wire.KEY]), 200)
    cont = cam.batch(1, _frames(1, [T0 + 200, T0 + 450, T0 + 650], [wire.SAME, wire.COND, wire.SAME]), 200).encode()
    for _ in range(3000):
        src = bytearray(data if rng.random() < 0.5 else cont)
        for _ in range(int(rng.integers(1, 4))):
            if not src:
                break
            if rng.random() < 0.7:
                src[int(rng.integers(0, len(src)))] = int(rng.integers(0, 256))
            else:
                del src[int(rng.integers(0, len(src))):]
        try:
            m = wire.decode(bytes(src))
            if isinstance(m, wire.CompactBatch) and m.pending:
                srv = wire.Connection()
                srv.decode(data)
                srv.resolve(m)
        except wire.WireError:
            pass
