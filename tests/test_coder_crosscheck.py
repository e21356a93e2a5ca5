"""The entropy coder's implementations against each other and against constriction, on random and real tables,
escapes included: the C library as firmware builds it (tcc_tool, under AddressSanitizer + UBSan, tables loaded from
the blob `taskcodec firmware tables` writes), the Python extension (same C file), and the numpy/Python fallback (an
independent formulation of the encoder). constriction, an unrelated range coder, codes the same integer model:
it must decode the same table indices and reach the same code length to within a byte. Bad bytes: refused in bounded
time in C (fuzzed under sanitizers) and in both Python backends."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from taskcodec.bundle import load_bundle
from taskcodec.coding import EntropyTables, RangeCoder, StreamError, compress, decompress
from taskcodec.coding import range_coder
from taskcodec.firmware_bridge import build

TAG = bytes.fromhex("0123456789abcdef")


@pytest.fixture(scope="module")
def tool_exe(tmp_path_factory):
    try:
        build.find_cc()
    except build.BuildError as exc:
        pytest.skip(str(exc))
    if not build.sanitizers_work():
        pytest.skip("this C compiler cannot build AddressSanitizer/UBSan programs here")
    return str(build.build("tcc_tool", sanitize=True, werror=True, out_dir=tmp_path_factory.mktemp("fw")))


def _tool(exe: str, tables: EntropyTables, tmp_path, lines: list[str]) -> list[str]:
    blob = tmp_path / f"tables-{tables.digest()[:8]}.tcct"
    blob.write_bytes(tables.to_blob())
    proc = subprocess.run([exe, str(blob)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          env=build.sanitizer_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == len(lines), proc.stderr[-3000:]
    return out


def _random_tables(rng, dim: int, precision: int = 16) -> EntropyTables:
    pmfs = []
    for _ in range(dim):
        p = rng.random(int(rng.integers(1, 40))) ** 3 + 1e-7   # skewed rows, some nearly-zero entries
        pmfs.append(p)
    return EntropyTables(*_from_pmfs(rng, pmfs), precision=precision)


def _from_pmfs(rng, pmfs):
    t = EntropyTables.from_pmfs(rng.integers(-20, 3, len(pmfs)), pmfs, escape_mass=float(rng.choice([1e-6, 1e-3])))
    return t.lower, t.length, t.pmf


def _sample(rng, tables: EntropyTables, n: int, escape_rate: float) -> np.ndarray:
    out = np.empty((n, tables.dim), np.int32)
    for d in range(tables.dim):
        f = tables.frequencies(d)[:-1].astype(np.float64)
        out[:, d] = tables.lower[d] + rng.choice(len(f), size=n, p=f / f.sum())
    mask = rng.random(out.shape) < escape_rate
    wild = rng.choice([2**31 - 1, -(2**31), 0, 1, -1], size=out.shape).astype(np.int64)
    wild = np.where(rng.random(out.shape) < 0.5, wild, rng.integers(-(2**31), 2**31, out.shape))
    out[mask] = wild[mask].astype(np.int32)
    return out


def _real_cases(rng):
    bundle = load_bundle()
    with np.load(bundle.file("golden")) as z:
        golden = z["symbols"]
    return bundle.tables, np.concatenate([golden, _sample(rng, bundle.tables, 200, 0.02)])


def _cases():
    rng = np.random.default_rng(0)
    cases = [("default bundle", *_real_cases(rng))]
    for i, (dim, precision) in enumerate([(1, 16), (8, 16), (64, 16), (300, 16), (16, 12), (16, 24)]):
        t = _random_tables(rng, dim, precision)
        cases.append((f"random {dim}x{precision}b", t, _sample(rng, t, 150, 0.05)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, tables, symbols", CASES, ids=[c[0] for c in CASES])
def test_c_library_extension_and_python_fallback_write_and_read_the_same_bytes(name, tables, symbols, tool_exe,
                                                                              tmp_path):
    py = RangeCoder(tables, "python")
    coders = [py] + ([RangeCoder(tables, "c")] if range_coder.c_available() else [])
    expected = [py.compress(s, TAG) for s in symbols]
    for coder in coders[1:]:
        assert [coder.compress(s, TAG) for s in symbols] == expected, coder.backend
    # firmware C (tables from the blob), with and without the check
    lines = [f"enc {TAG.hex()} " + " ".join(map(str, s)) for s in symbols]
    lines += ["enc - " + " ".join(map(str, s)) for s in symbols]
    lines += [f"dec {TAG.hex()} {p.hex()}" for p in expected]
    out = _tool(tool_exe, tables, tmp_path, lines)
    n = len(symbols)
    assert [bytes.fromhex(o[3:].replace("-", "")) for o in out[:n]] == expected
    assert [bytes.fromhex(o[3:].replace("-", "")) for o in out[n: 2 * n]] == [p[2:] for p in expected]
    assert all(o.startswith("ok ") for o in out[2 * n:])
    assert np.array_equal(np.array([o.split()[1:] for o in out[2 * n:]], np.int64), symbols)
    # every implementation decodes every payload
    for coder in coders:
        for s, p in zip(symbols, expected):
            assert np.array_equal(coder.decode(p[2:]), s)
            assert np.array_equal(decompress(p, coder, TAG), s)
    assert tables.indices(symbols)[1].any()  # escapes were exercised


@pytest.mark.parametrize("name, tables, symbols", CASES, ids=[c[0] for c in CASES])
def test_constriction_codes_the_same_integer_model_to_the_same_length(name, tables, symbols):
    constriction = pytest.importorskip("constriction", reason="constriction is an optional cross-check "
                                                              "(pip install 'taskcodec[crosscheck]', x86_64 wheels)")
    freq = np.zeros((tables.dim, tables.stride - 1), np.float64)
    for d in range(tables.dim):
        f = tables.frequencies(d)
        freq[d, : len(f)] = f
    probabilities = freq / (1 << tables.precision)  # exactly the coder's integer model (dyadic)
    family = constriction.stream.model.Categorical(perfect=True)
    half = constriction.stream.model.Uniform(1 << 16)
    coder = RangeCoder(tables, "python")
    diffs = []
    for s in symbols:
        idx, escaped = tables.indices(s)
        z = ((s[escaped].astype(np.int64) << 1) ^ (s[escaped].astype(np.int64) >> 63)) & 0xFFFFFFFF
        halves = np.stack([z >> 16, z & 0xFFFF], axis=1).reshape(-1).astype(np.int32)
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(idx, family, probabilities)
        if len(halves):
            enc.encode(halves, half)
        emitted, (lower, width) = enc.pos()
        words = enc.get_compressed()
        dec = constriction.stream.queue.RangeDecoder(words)
        assert np.array_equal(dec.decode(family, probabilities), idx)  # same model, same indices
        ours = coder.decode(coder.encode(s))
        assert np.array_equal(tables.indices(ours)[0], idx)
        # constriction's code length: -log2 of its final interval's width (the interval's position and width in bits)
        c_bits = 32 * emitted + 64 - np.log2(float(width))
        # same model, same information (constriction's 24-bit-precision arithmetic loses < 0.006 bits per symbol)
        assert abs(c_bits - tables.model_bits(s[None])[0]) < 0.006 * (len(idx) + len(halves)) + 1e-6
        diffs.append(8 * len(coder.encode(s)) - c_bits)
    diffs = np.array(diffs)
    # ours: the shortest whole-byte point of an interval of that width: at most a byte above, on average less
    assert diffs.max() <= 8 + 0.01, diffs.max()
    assert -8 < diffs.mean() < 8, diffs.mean()


def test_c_decoder_refuses_fuzzed_bytes_in_bounded_time_under_sanitizers(tool_exe, tmp_path):
    rng = np.random.default_rng(3)
    for tables in (load_bundle().tables, _random_tables(rng, 40)):
        start = time.monotonic()
        (out,) = _tool(tool_exe, tables, tmp_path, ["fuzz 200000 7"])
        tried, refused = map(int, out.split()[1:])
        assert tried == 200000 and refused > 50000, out
        assert time.monotonic() - start < 120


@pytest.mark.parametrize("backend", ["c", "python"])
def test_bad_bytes_refused_in_bounded_time_by_both_python_backends(backend):
    if backend == "c" and not range_coder.c_available():
        pytest.skip("the C extension is not built")
    bundle = load_bundle()
    coder = RangeCoder(bundle.tables, backend)
    rng = np.random.default_rng(4)
    symbols = _sample(rng, bundle.tables, 30, 0.02)
    good = [coder.compress(s, bundle.model_tag) for s in symbols]
    refused = 0
    start = time.monotonic()
    for g in good:
        body = g[2:]
        for bad_body in (body + b"\x01", body + b"\0", body[:-1], bytes(len(body)), body[::-1], b"\xff" * 40):
            # a valid check on bad bytes: the coder itself must refuse or decode to *some* symbols, never hang/crash
            try:
                decompress(range_coder.check_bytes(bundle.model_tag, bad_body) + bad_body, coder, bundle.model_tag)
            except StreamError:
                refused += 1
        for i in range(len(g)):
            with pytest.raises(StreamError):
                decompress(g[:i] + bytes([g[i] ^ 0x10]) + g[i + 1:], coder, bundle.model_tag)
    for _ in range(2000):
        data = rng.bytes(int(rng.integers(0, 60)))
        body = data[2:]
        try:
            decompress(range_coder.check_bytes(bundle.model_tag, body) + body, coder, bundle.model_tag)
        except StreamError:
            refused += 1
    assert refused > 1000
    assert time.monotonic() - start < 30


def test_c_unit_tests_of_the_coder_pass_under_sanitizers(tool_exe, tmp_path):
    exe = build.build("test_coder", sanitize=True, werror=True, out_dir=tmp_path)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=build.sanitizer_env(), timeout=120)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_firmware_library_carries_the_payload_coder(tool_exe, tmp_path):
    import shutil

    lib = build.build_library(out_dir=tmp_path)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not found")
    symbols = subprocess.run([nm, "-g", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for fn in ("tcc_payload_encode", "tcc_payload_decode", "tcc_blob_load", "tcw_encode_batch"):
        assert fn in symbols, fn


def test_firmware_reproduces_the_default_bundles_golden_payloads_from_the_exported_tables(tool_exe, tmp_path):
    """`taskcodec firmware tables` -> the C library alone writes the bundle's golden payloads byte for byte."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "taskcodec.cli", "firmware", "tables", "--out",
                           str(tmp_path / "default.tcct")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle()
    with np.load(bundle.file("golden")) as z:
        symbols, blob, offsets = z["symbols"], z["streams"].tobytes(), z["offsets"]
    lines = [f"enc {bundle.model_id} " + " ".join(map(str, s)) for s in symbols]
    out = subprocess.run([tool_exe, str(tmp_path / "default.tcct")], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, env=build.sanitizer_env(), timeout=120).stdout.splitlines()
    assert [bytes.fromhex(o[3:]) for o in out] == [blob[offsets[i]: offsets[i + 1]] for i in range(len(symbols))]
