"""docs/wire-format.md specifies the payload completely: a decoder and an encoder written only from the document's
pseudo-code (below, independent of taskcodec.coding) reproduce the document's own example bytes from the document's
own tables and symbols, and so do the C coder (extension and firmware library) and the numpy/Python fallback."""

from __future__ import annotations

import binascii
import struct
import subprocess

import numpy as np
import pytest

from taskcodec.coding import RangeCoder, decompress
from taskcodec.coding import range_coder
from taskcodec.firmware_bridge import build
from taskcodec.firmware_bridge.doc_examples import DOC, PAYLOAD_EXAMPLES, example_tables, parse_payload_examples

TAG = bytes.fromhex("0123456789abcdef")


def _check(tag: bytes, coded: bytes) -> bytes:
    crc = binascii.crc_hqx(struct.pack("<I", len(coded)) + coded, binascii.crc_hqx(tag, 0xFFFF)) ^ 0xFFFF
    return struct.pack("<H", crc)


def doc_decode(lower, length, cdf, precision, payload: bytes, tag: bytes) -> list[int]:
    """The document's decoder, line by line."""
    assert payload[:2] == _check(tag, payload[2:]), "check"
    data = payload[2:]
    byte = lambda i: data[i] if i < len(data) else 0  # noqa: E731
    code, rng, pos = int.from_bytes(bytes(byte(i) for i in range(7)), "big"), 1 << 56, 7

    def decode(row, bits):
        nonlocal code, rng, pos
        r = rng >> bits
        q = code // r
        assert q < 1 << bits, "refuse"
        e = max(i for i in range(len(row) - 1) if row[i] <= q)
        code -= r * row[e]
        rng = r * (row[e + 1] - row[e])
        while rng < 1 << 48:
            rng <<= 8
            code = (code << 8) | byte(pos)
            pos += 1
        return e

    out = []
    for d in range(len(lower)):
        e = decode(cdf[d], precision)
        if e < length[d]:
            out.append(lower[d] + e)
        else:
            hi = decode(range((1 << 16) + 1), 16)
            lo = decode(range((1 << 16) + 1), 16)
            u = (hi << 16) | lo
            v = (u >> 1) ^ -(u & 1)
            assert not lower[d] <= v < lower[d] + length[d], "escape inside the support"
            out.append(v)
    assert len(data) <= pos and (not data or data[-1] != 0), "trailing bytes"
    return out


def doc_encode(lower, length, cdf, precision, symbols, tag: bytes) -> bytes:
    """The document's encoder in its exact-integer form, and its termination."""
    V, rng, k = 0, 1 << 56, 0

    def code(cum, freq, bits):
        nonlocal V, rng, k
        r = rng >> bits
        V += r * cum
        rng = r * freq
        while rng < 1 << 48:
            rng <<= 8
            V <<= 8
            k += 1

    for d, v in enumerate(symbols):
        row = cdf[d]
        if lower[d] <= v < lower[d] + length[d]:
            e = v - lower[d]
            code(row[e], row[e + 1] - row[e], precision)
        else:
            e = length[d]
            code(row[e], row[e + 1] - row[e], precision)
            u = ((v << 1) ^ (v >> 31)) & 0xFFFFFFFF
            code(u >> 16, 1, 16)
            code(u & 0xFFFF, 1, 16)
    T = 56 + 8 * k
    for z in range(T // 8, -1, -1):
        X = -(-V // (1 << 8 * z)) * (1 << 8 * z)
        if X < V + rng:
            break
    coded = X.to_bytes(T // 8, "big").rstrip(b"\0")
    return _check(tag, coded) + coded


@pytest.fixture(scope="module")
def documented():
    tables, examples = parse_payload_examples(DOC.read_text())
    assert set(examples) == set(PAYLOAD_EXAMPLES), "docs/wire-format.md payload examples are stale"
    return tables, examples


def _rows(tables):
    return ([int(v) for v in tables.lower], [int(v) for v in tables.length],
            [[int(c) for c in tables.cdf[d, : tables.length[d] + 2]] for d in range(tables.dim)], tables.precision)


def test_a_decoder_written_from_the_document_decodes_its_examples(documented):
    tables, examples = documented
    for name, (symbols, payload) in examples.items():
        assert doc_decode(*_rows(tables), payload, TAG) == symbols, name
        assert doc_encode(*_rows(tables), symbols, TAG) == payload, name
    assert tables.indices(np.array(examples["stream_escape"][0]))[1].sum() == 2  # the escape example escapes twice


def test_the_documents_tables_and_bytes_are_the_reference_coders(documented):
    tables, examples = documented
    ref = example_tables()
    assert np.array_equal(tables.cdf, ref.cdf) and np.array_equal(tables.lower, ref.lower)
    backends = ["python"] + (["c"] if range_coder.c_available() else [])
    for backend in backends:
        coder = RangeCoder(tables, backend)
        for name, (symbols, payload) in examples.items():
            assert coder.compress(np.array(symbols, np.int32), TAG) == payload, (backend, name)
            assert decompress(payload, coder, TAG).tolist() == symbols, (backend, name)


def test_the_firmware_library_decodes_and_encodes_the_documents_examples(documented, tmp_path):
    try:
        exe = build.build("tcc_tool", out_dir=tmp_path)
    except build.BuildError as exc:
        pytest.skip(str(exc))
    tables, examples = documented
    (tmp_path / "t.tcct").write_bytes(tables.to_blob())
    lines = []
    for symbols, payload in examples.values():
        lines += [f"dec {TAG.hex()} {payload.hex()}", f"enc {TAG.hex()} " + " ".join(map(str, symbols))]
    out = subprocess.run([str(exe), str(tmp_path / "t.tcct")], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, timeout=60).stdout.splitlines()
    for i, (symbols, payload) in enumerate(examples.values()):
        assert out[2 * i] == "ok " + " ".join(map(str, symbols))
        assert out[2 * i + 1] == "ok " + payload.hex()
