"""Firmware C wire library, compiled for real with AddressSanitizer + UBSan: C unit tests, fuzzing, and C <-> Python
cross-checks (C-encoded HELLO/BATCH equal taskcodec.wire's bytes and decode there; Python-encoded replies decode
in C with the same fields; C and Python accept and refuse exactly the same mutated replies)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from taskcodec.firmware_bridge import build
from taskcodec import wire
from taskcodec.coding.stream import _check



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    try:
        build.find_cc()
    except build.BuildError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("fwcache")
    # Probe the sanitizers with a trivial program (build.sanitizers_work runs test_wire itself, so a failing C test
    # would read as "no sanitizers" and skip everything).
    probe = out / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    try:
        subprocess.run([build.find_cc(), *build.SANITIZE_FLAGS, str(probe), "-o", str(out / "probe")], check=True,
                       capture_output=True, timeout=120)
        ok = subprocess.run([str(out / "probe")], env=build.sanitizer_env(), timeout=60).returncode == 0
    except (subprocess.CalledProcessError, OSError):
        ok = False
    if not ok:
        pytest.skip("this C compiler cannot build AddressSanitizer/UBSan programs here")
    return out


def _exe(target: str, cache) -> str:
    return str(build.build(target, sanitize=True, werror=True, out_dir=cache))


def _tool(cache, lines: list[str]) -> list[str]:
    proc = subprocess.run([_exe("tcw_tool", cache)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          env=build.sanitizer_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == len(lines), proc.stderr[-3000:]
    return out


def _hex(b: bytes) -> str:
    return b.hex() or "-"


def test_c_unit_tests_pass_under_sanitizers(cache):
    proc = subprocess.run([_exe("test_wire", cache)], capture_output=True, text=True, env=build.sanitizer_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout


def test_fuzz_harness_finds_nothing(cache):
    # Bounded by iterations (deterministic) and by a generous CPU-time cap for slow machines.
    proc = subprocess.run([_exe("fuzz_wire", cache), "300000", "7", "15"], capture_output=True, text=True,
                          env=build.sanitizer_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "inputs, accepted" in proc.stdout
    counts = dict(kv.split("=") for kv in proc.stdout.split("accepted ")[1].split())
    assert all(int(v) > 0 for v in counts.values()), proc.stdout  # the mutations reach every reply type


def _random_hello(rng) -> wire.Hello:
    cam = "".join(rng.choice(list("abcxyz-_09éü")) for _ in range(int(rng.integers(1, 40))))
    return wire.Hello(rng.bytes(8), cam, rng.bytes(int(rng.integers(0, 256))))


def _random_batch(rng) -> wire.Batch:
    n = int(rng.choice([1, 2, 5, 127, 128, 300]))
    first = int(rng.choice([0, 1, 127, 128, 2**31, 2**63 - 400]))
    ts = int(rng.choice([0, 1_700_000_000_000, 2**40, -5000]))
    year = 365 * 86_400_000
    frames = []
    for i in range(n):
        ts += int(rng.choice([0, 1, 33, 200, 70000, -50, year, -year]))  # clocks going backwards, stepping by a year
        frames.append(wire.Frame(first + i, ts, rng.bytes(int(rng.choice([0, 1, 6, 40, 200])))))
    return wire.Batch(int(rng.choice([0, 1, 5, 2**31, 2**32, 2**63 - 1])), frames)


def _batch_line(b: wire.Batch, cap: int) -> str:
    frames = " ".join(f"{f.ts_ms}:{_hex(f.payload)}" for f in b.frames)
    return f"batch {cap} {b.epoch} {b.frames[0].seq} {frames}"


def test_c_encoders_match_python_byte_for_byte(cache):
    rng = np.random.default_rng(0)
    msgs = [_random_hello(rng) for _ in range(40)] + [_random_batch(rng) for _ in range(40)]
    msgs.append(wire.Batch(3, [wire.Frame(9, 5, rng.bytes(wire.MAX_FRAME_BYTES)), wire.Frame(10, 6, b"")]))
    lines, expected = [], []
    for m in msgs:
        ref = m.encode()
        for cap in (len(ref), len(ref) - 1, len(ref) + 50):
            if isinstance(m, wire.Hello):
                lines.append(f"hello {cap} {m.model_tag.hex()} {_hex(m.camera_id.encode())} {_hex(m.token)}")
            else:
                lines.append(_batch_line(m, cap))
            expected.append((m, ref, cap))
    for out, (m, ref, cap) in zip(_tool(cache, lines), expected):
        if cap < len(ref):
            assert out == "err -2", (m, out)  # output buffer too small
            continue
        assert out.startswith("ok "), (m, out)
        c_bytes = bytes.fromhex(out[3:])
        assert c_bytes == ref
        assert wire.decode(c_bytes) == m  # every capture time exact, whatever the clock did


def test_c_encoders_refuse_what_python_cannot_decode(cache):
    lines = [
        "hello 100 0123456789abcdef - -",                          # empty camera id
        "hello 400 0123456789abcdef " + "61" * 256 + " -",         # camera id of 256 bytes
        "hello 400 0123456789abcdef 61 " + "00" * 256,             # token of 256 bytes
        f"batch 100 {2**63} 0 5:00",                               # epoch above the decoder's limit
        f"batch 100 1 {2**63} 5:00",                               # sequence number above the limit
        f"batch 100 1 {2**63 - 1} 5:00 6:00",                      # the second frame's seq above the limit
        f"batch 100 1 0 0:00 {2**62}:00",                          # capture time above the limit
        f"batch 100 1 0 {-2**62}:00",                              # capture time below the limit
        "batch 100 1 0",                                           # no frames
        "batch 200000 1 0 5:" + "00" * (wire.MAX_FRAME_BYTES + 1),  # payload too large
    ]
    assert _tool(cache, lines) == ["err -1"] * len(lines)


def _random_reply(rng):
    kind = int(rng.integers(0, 4))
    epoch = int(rng.choice([0, 1, 300, 2**32, 2**63 - 1]))
    first = int(rng.choice([0, 5, 2**35, 2**63 - 1]))
    count = int(rng.choice([0, 1, 127, 128, 4096]))
    reason = "".join(rng.choice(list("ok bad stream ✓ é")) for _ in range(int(rng.choice([0, 3, 100, 400]))))
    code = int(rng.integers(0, 256))
    return [wire.Ack(epoch, first, count), wire.Reject(epoch, first, count, code, reason),
            wire.Error(code, reason), wire.Welcome(int(rng.integers(0, 256)))][kind]


def _parse_c_reply(out: str):
    parts = out.split()
    if parts[0] == "err":
        return None
    t, version, code, epoch, first, count = (int(p) for p in parts[1:7])
    reason = bytes.fromhex(parts[7]) if parts[7] != "-" else b""
    return t, version, code, epoch, first, count, reason


def _as_c_fields(m):
    if isinstance(m, wire.Ack):
        return 3, 0, 0, m.epoch, m.first_seq, m.count, b""
    if isinstance(m, wire.Reject):
        return 4, 0, m.code, m.epoch, m.first_seq, m.count, m.reason.encode()[:1024]
    if isinstance(m, wire.Error):
        return 5, 0, m.code, 0, 0, 0, m.reason.encode()[:1024]
    return 6, m.version, 0, 0, 0, 0, b""


def test_python_replies_decode_in_c(cache):
    rng = np.random.default_rng(1)
    msgs = [_random_reply(rng) for _ in range(300)]
    msgs.append(wire.Error(wire.Code.UNKNOWN_MODEL, "x" * 5000))  # reason clipped to 1024 bytes by the encoder
    outs = _tool(cache, [f"reply {m.encode().hex()}" for m in msgs])
    for m, out in zip(msgs, outs):
        fields = _parse_c_reply(out)
        assert fields == _as_c_fields(m), (m, out)
        if fields[0] in (4, 5):
            assert fields[6].decode("utf-8", errors="replace") == wire.decode(m.encode()).reason


def test_c_and_python_accept_and_refuse_the_same_bytes(cache):
    """Differential fuzzing: mutated replies (and random bytes) are accepted by C exactly when by Python."""
    rng = np.random.default_rng(2)
    seeds = [m.encode() for m in (_random_reply(rng) for _ in range(50))]
    seeds += [bytes([3]) + bytes([0x80] * 9) + b"\x01\x00\x00", bytes([3, 0]) + bytes([0xFF] * 9) + b"\x01\x00"]
    inputs = []
    for _ in range(3000):
        data = bytearray(seeds[int(rng.integers(len(seeds)))] if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 30))))
        for _ in range(int(rng.integers(1, 4))):
            op = rng.random()
            if data and op < 0.5:
                data[int(rng.integers(len(data)))] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.integers(256)]))
            elif data and op < 0.75:
                del data[int(rng.integers(len(data))):]
            else:
                data += rng.bytes(int(rng.integers(1, 4)))
        inputs.append(bytes(data))
    outs = _tool(cache, [f"reply {_hex(d)}" for d in inputs])
    accepted = 0
    for data, out in zip(inputs, outs):
        try:
            ref = wire.decode(data)
        except wire.WireError:
            ref = None
        if isinstance(ref, (wire.Hello, wire.Batch)):
            assert out == "err -6", data.hex()  # cameras never receive these
        elif ref is None:
            assert out.startswith("err "), (data.hex(), out)
        else:
            accepted += 1
            assert _parse_c_reply(out) == _as_c_fields(ref)[:6] + (_parse_c_reply(out)[6],), (data.hex(), out)
            assert _parse_c_reply(out)[6].decode("utf-8", errors="replace") == getattr(ref, "reason", "")
    assert accepted > 300  # the comparison covered many valid replies, not only refusals


def test_varints_and_stream_check_match_python(cache):
    rng = np.random.default_rng(3)
    values = [0, 1, 127, 128, 16383, 16384, 2**32, 2**63, 2**64 - 1] + [int(v) for v in rng.integers(0, 2**62, 50)]
    checks = [(rng.bytes(8), rng.bytes(int(n))) for n in rng.choice([0, 4, 12, 400], 30)] + [(b"", b"\x01\x02")]
    lines = [f"varint 10 {v}" for v in values] + [f"check {_hex(t)} {_hex(p)}" for t, p in checks]
    outs = _tool(cache, lines)
    for v, out in zip(values, outs):
        ref = bytearray()
        wire.put_varint(ref, v)
        assert out == f"ok {ref.hex()}"
    for (tag, payload), out in zip(checks, outs[len(values):]):
        assert out == f"ok {_check(tag, payload).hex()}"


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(build.BuildError, match="no C compiler found"):
        build.find_cc()
    with pytest.raises(build.BuildError, match="not found on PATH"):
        build.find_cc("definitely-not-a-cc")
    with pytest.raises(build.BuildError, match="unknown target"):
        build.build("nope")
