"""The C firmware library speaks wire v4 (issue 15): temporal HELLOs, TBATCHes (frame kind in the low 2 bits of each
length), v4 CBATCHes (header continuing the connection's previous CBATCH, implied times, SAME runs) and WELCOMEs agree
byte for byte with taskcodec.wire, under AddressSanitizer/UBSan."""

from __future__ import annotations

import numpy as np

from taskcodec import wire
from test_firmware_bridge import _hex, _tool, cache  # noqa: F401  (the module-scoped build fixture)


def _random_tbatch(rng) -> wire.TemporalBatch:
    n = int(rng.choice([1, 3, 127, 128, 200]))
    first, ts, frames = int(rng.choice([0, 41, 2**63 - 300])), int(rng.choice([0, 1_700_000_000_000, -5])), []
    for i in range(n):
        ts += int(rng.choice([0, 200, -50, 31_536_000_000]))
        kind = int(rng.integers(0, 3))
        payload = b"" if kind == wire.SAME else rng.bytes(int(rng.choice([0, 1, 6, 40, 300])))
        frames.append(wire.Frame(first + i, ts, payload, kind))
    return wire.TemporalBatch(int(rng.choice([0, 5, 2**63 - 1])), frames)


def test_c_temporal_messages_match_python(cache):  # noqa: F811
    rng = np.random.default_rng(15)
    batches = [_random_tbatch(rng) for _ in range(30)]
    hellos = [wire.Hello(rng.bytes(8), "cam-%d" % i, rng.bytes(int(rng.integers(0, 50))),
                         capabilities=int(rng.choice([0, 1, 3, 2**32 - 1])), residual_tag=rng.bytes(8))
              for i in range(20)]
    hellos = [h if h.temporal else wire.Hello(h.model_tag, h.camera_id, h.token, capabilities=h.capabilities)
              for h in hellos]
    lines, refs = [], []
    for b in batches:
        ref = b.encode()
        for cap in (len(ref), len(ref) - 1):
            lines.append(f"tbatch {cap} {b.epoch} {b.frames[0].seq} "
                         + " ".join(f"{f.ts_ms}:{f.kind}:{_hex(f.payload)}" for f in b.frames))
            refs.append((b, ref, cap))
    for h in hellos:
        ref = h.encode()
        lines.append(f"hello {len(ref)} {h.model_tag.hex()} {_hex(h.camera_id.encode())} {_hex(h.token)} "
                     f"{h.capabilities} {_hex(h.residual_tag)}")
        refs.append((h, ref, len(ref)))
    for out, (m, ref, cap) in zip(_tool(cache, lines), refs):
        if cap < len(ref):
            assert out == "err -2", (m, out)
            continue
        assert out == "ok " + ref.hex(), (m, out)
        assert wire.decode(ref) == m
    bad = ["tbatch 100 1 0 5:2:00", "tbatch 100 1 0 5:3:-", "hello 100 0123456789abcdef 61 - 1 -"]
    assert _tool(cache, bad) == ["err -1"] * len(bad)  # SAME with a payload, kind 3, temporal without a tag


def test_c_decodes_v3_welcome_capabilities(cache):  # noqa: F811
    msgs = [wire.Welcome(3, 1), wire.Welcome(3, 0), wire.Welcome(2), wire.Welcome(3, 2**32 - 1),
            wire.Error(wire.Code.RESYNC, "lost the reference")]
    outs = _tool(cache, [f"reply {m.encode().hex()}" for m in msgs])
    for m, out in zip(msgs, outs):
        parts = out.split()
        assert parts[0] == "ok" and int(parts[1]) == m.TYPE, out
        if isinstance(m, wire.Welcome):
            assert (int(parts[2]), int(parts[8])) == (m.version, m.capabilities), out
        else:
            assert int(parts[3]) == 7, out


def test_c_cbatches_match_python_across_a_connection(cache):  # noqa: F811
    """A camera's sequence of CBATCHes on one connection (with new connections in between): the C builder with its
    tcw_link writes exactly wire.Connection's bytes; a batch that does not fit (TCW_E_NOSPACE) leaves the link as
    it was, so the next batch still continues the last one sent."""
    rng = np.random.default_rng(16)
    py = wire.Connection()
    lines, refs = [], []
    epoch, seq, ts = 2**63 - 1, 0, 1_700_000_000_000
    for _ in range(120):
        if rng.random() < 0.08:
            lines.append("link reset")
            refs.append(None)
            py.reset()
        if rng.random() < 0.08:
            epoch = int(rng.integers(0, 2**63 - 1))
        if rng.random() < 0.08:
            seq += int(rng.integers(1, 100))
        n = int(rng.choice([1, 3, 5, 40, 127, 128, 200]))
        interval = int(rng.choice([0, 33, 200, 2**32 - 1]))
        frames = []
        for i in range(n):
            ts += interval + int(rng.choice([0, 0, 0, 1, -2, 40, -31_536_000_000, 2**61]))
            ts = max(-wire.MAX_ABS_TS_MS, min(wire.MAX_ABS_TS_MS, ts))
            kind = int(rng.choice([wire.KEY, wire.COND, wire.SAME, wire.SAME, wire.SAME]))
            payload = b"" if kind == wire.SAME else rng.bytes(int(rng.choice([0, 1, 6, 200])))
            frames.append(wire.Frame(seq + i, ts, payload, kind))
        ref = wire.CompactBatch(epoch, frames, interval, py.link).encode()
        short = rng.random() < 0.2
        cap = len(ref) - 1 if short else len(ref)
        lines.append(f"cbatch {cap} {epoch} {seq} {interval} "
                     + " ".join(f"{f.ts_ms}:{f.kind}:{_hex(f.payload)}" for f in frames))
        refs.append((ref, short))
        if not short:
            py.batch(epoch, frames, interval)
            seq += n
    for line, out, ref in zip(lines, _tool(cache, lines), refs):
        if ref is None:
            assert out == "ok -"
        elif ref[1]:
            assert out == "err -2", line[:80]
        else:
            assert out == "ok " + ref[0].hex(), line[:200]
    bad = ["cbatch 100 1 0 200 5:2:00", "cbatch 100 1 0 200 5:3:-", "cbatch 100 1 0 200"]
    assert _tool(cache, bad) == ["err -1", "err -1", "err usage"]  # SAME with a payload, kind 3, no frame
