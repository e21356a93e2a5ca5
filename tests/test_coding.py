"""Range coding with frozen integer tables: exact round trips, escapes, the size bound, and refusal of bad bytes in
bounded time -- each test runs with the C coder (the extension) and with the numpy/Python fallback."""

import time

import numpy as np
import pytest

from taskcodec.coding import EntropyTables, RangeCoder, StreamError, compress, decompress
from taskcodec.coding import range_coder
from taskcodec.coding.tables import TablesError


@pytest.fixture(autouse=True, params=["c", "python"])
def backend(request, monkeypatch):
    if request.param == "c" and not range_coder.c_available():
        pytest.skip("the C extension taskcodec.coding._tcc is not built (no C compiler at install time)")
    monkeypatch.setenv("TASKCODEC_CODER", request.param)
    return request.param


def random_tables(rng, dim=32):
    return EntropyTables.from_pmfs(rng.integers(-6, 1, dim), [rng.random(rng.integers(1, 20)) + 1e-3 for _ in range(dim)])


def test_round_trip_random_tables_and_symbols():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tables = random_tables(rng, int(rng.integers(1, 64)))
        symbols = (tables.lower + rng.integers(0, tables.length)).astype(np.int32)
        data = compress(symbols, tables, b"model-01")
        assert np.array_equal(decompress(data, tables, b"model-01"), symbols)


def test_escapes_round_trip_extreme_values():
    rng = np.random.default_rng(1)
    tables = random_tables(rng, 16)
    symbols = np.zeros(16, np.int32)
    symbols[:4] = [2**31 - 1, -(2**31), 1000, -1000]
    data = compress(symbols, tables)
    assert np.array_equal(decompress(data, tables), symbols)
    idx, escaped = tables.indices(symbols)
    assert escaped[:4].all()


def test_estimate_matches_coded_size_on_long_vectors():
    rng = np.random.default_rng(2)
    tables = random_tables(rng, 512)
    p = tables.pmf[:, :-1].astype(np.float64)
    symbols = np.array([tables.lower[d] + rng.choice(tables.length[d], p=p[d, : tables.length[d]] / p[d, : tables.length[d]].sum())
                        for d in range(512)], np.int32)
    coded = 8 * (len(compress(symbols, tables)) - 2)
    estimate = tables.estimated_bits(symbols[None])[0]
    assert coded <= estimate * 1.01 + 8


def test_bad_bytes_are_refused_quickly():
    rng = np.random.default_rng(3)
    tables = random_tables(rng, 24)
    coder = RangeCoder(tables)
    symbols = (tables.lower + rng.integers(0, tables.length)).astype(np.int32)
    good = compress(symbols, coder, b"AAAAAAAA")
    bad = [b"", good[:1], good[:-1], good + b"\0", good + b"\0\0\0\0", bytes(len(good))]
    bad += [good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1:] for i in range(len(good)) for bit in range(8)]
    start = time.monotonic()
    for data in bad:
        with pytest.raises(StreamError):
            decompress(data, coder, b"AAAAAAAA")
    with pytest.raises(StreamError):
        decompress(good, coder, b"BBBBBBBB")  # another model's stream
    for _ in range(3000):
        data = rng.bytes(int(rng.integers(0, 40)))
        try:
            decompress(data, coder, b"AAAAAAAA")
        except StreamError:
            pass
    assert time.monotonic() - start < 60


def test_tables_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    tables = random_tables(rng, 8)
    tables.save(tmp_path / "t.npz")
    again = EntropyTables.load(tmp_path / "t.npz")
    assert again.digest() == tables.digest()
    with pytest.raises(TablesError, match="not found"):
        EntropyTables.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(TablesError, match="not a valid"):
        EntropyTables.load(tmp_path / "junk.npz")
    with pytest.raises(TablesError, match="escape"):
        EntropyTables(np.zeros(1), np.ones(1), np.array([[1.0, 0.0]]))


def test_short_streams_stay_within_a_byte_of_the_estimate():
    """The regime of real latents (tens of bits): byte-level termination keeps coded <= estimate * 1.01 + 8."""
    rng = np.random.default_rng(5)
    support = np.arange(-3, 4)
    tables = EntropyTables.from_pmfs(np.full(64, -3), [np.exp(-np.abs(support) * rng.uniform(1.5, 6)) for _ in range(64)])
    coder = RangeCoder(tables)
    p = tables.pmf[:, :7].astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    excess = []
    for _ in range(400):
        symbols = np.array([rng.choice(7, p=p[d]) - 3 for d in range(64)], np.int32)
        data = compress(symbols, coder)
        assert np.array_equal(decompress(data, coder), symbols)
        estimate = tables.estimated_bits(symbols[None])[0]
        assert 8 * (len(data) - 2) <= estimate * 1.01 + 8
        excess.append(8 * (len(data) - 2) - estimate)
    assert np.mean(excess) < 5  # byte-level termination: on average about half a byte above the ideal length


def test_interval_termination_decodes_exactly_across_many_streams():
    """The encoder writes the shortest point of the coder's final interval and does not decode to check it; this test
    is the check: many random tables and vectors (escapes included), every stream exact."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        dim = int(rng.integers(1, 96))
        tables = random_tables(rng, dim)
        coder = RangeCoder(tables)
        for _ in range(250):
            symbols = (tables.lower + rng.integers(0, tables.length)).astype(np.int32)
            if rng.random() < 0.2:
                k = int(rng.integers(0, dim))
                symbols[k] = int(rng.integers(-(2**31), 2**31 - 1))
            data = compress(symbols, coder, b"tag")
            assert np.array_equal(decompress(data, coder, b"tag"), symbols)
            assert data[2:] == coder.encode(symbols) and (len(data) == 2 or data[-1] != 0)


def test_integer_cdf_is_quantised_once_valid_and_close_to_the_float_model(tmp_path):
    from taskcodec.coding.tables import quantize_cdf

    rng = np.random.default_rng(7)
    tables = random_tables(rng, 40)
    for d in range(tables.dim):
        f = tables.frequencies(d)
        assert len(f) == tables.length[d] + 1 and (f >= 1).all() and f.sum() == 1 << tables.precision
        assert (tables.cdf[d, tables.length[d] + 1:] == 1 << tables.precision).all()  # padding
    # the shipped CDF is what loads, even where re-quantising the pmf would give something else
    cdf = tables.cdf.copy()
    cdf[0, 1] += 1
    EntropyTables(tables.lower, tables.length, tables.pmf, cdf).save(tmp_path / "t.npz")
    assert np.array_equal(EntropyTables.load(tmp_path / "t.npz", require_cdf=True).cdf, cdf)
    assert not np.array_equal(quantize_cdf(tables.pmf, tables.length), cdf)
    # a file without the integer CDF (a training run's) gets it quantised; a bundle demands it
    np.savez(tmp_path / "float.npz", lower=tables.lower, length=tables.length, pmf=tables.pmf)
    assert np.array_equal(EntropyTables.load(tmp_path / "float.npz").cdf, tables.cdf)
    with pytest.raises(TablesError, match="no integer CDF"):
        EntropyTables.load(tmp_path / "float.npz", require_cdf=True)
    # invalid rows are refused: a zero frequency, a wrong total, a bad precision
    bad = tables.cdf.copy()
    bad[1, 2] = bad[1, 1]
    with pytest.raises(TablesError, match="row 1"):
        EntropyTables(tables.lower, tables.length, tables.pmf, bad)
    with pytest.raises(TablesError, match=r"0\.\.2\*\*17"):
        EntropyTables(tables.lower, tables.length, tables.pmf, tables.cdf.astype(np.int64) * 4, precision=17)
    with pytest.raises(TablesError, match="row 0"):
        EntropyTables(tables.lower, tables.length, tables.pmf, tables.cdf, precision=17)  # rows end at 2**16
    with pytest.raises(TablesError, match="precision"):
        EntropyTables(tables.lower, tables.length, tables.pmf, precision=25)
    # the integer model costs almost nothing over the float model on typical symbols
    symbols = (tables.lower + rng.integers(0, tables.length, (200, tables.dim))).astype(np.int32)
    assert np.abs(tables.model_bits(symbols) - tables.estimated_bits(symbols)).mean() < 0.01 * tables.dim
