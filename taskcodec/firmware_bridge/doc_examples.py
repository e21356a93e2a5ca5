"""The byte examples in docs/wire-format.md, produced by the reference encoders so the document cannot drift:
``python -m taskcodec.firmware_bridge.doc_examples`` prints the hex dumps (and the payload examples' integer tables),
and tests check the document against them and decode the payload examples from the document's own bytes and
tables (tests/test_coder_doc.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from taskcodec.frame_socket import GRAY8, FrameHeader
from taskcodec import wire
from taskcodec.coding import EntropyTables
from taskcodec.coding.stream import compress

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"
TAG = bytes.fromhex("0123456789abcdef")


def example_tables() -> EntropyTables:
    """The payload examples' tables: 8 dimensions over -4..4 plus the escape, 16-bit integer CDF; dimensions 0-3
    Gaussian-shaped, 4-7 Laplacian-shaped."""
    support = np.arange(-4, 5)
    pmfs = [np.exp(-0.25 * support**2)] * 4 + [np.exp(-0.7 * np.abs(support))] * 4
    return EntropyTables.from_pmfs(np.full(8, -4, np.int32), pmfs, escape_mass=1e-3)


def _stream(symbols: list[int]) -> bytes:
    """A real per-frame payload: 8 latent symbols range-coded with the example tables."""
    return compress(np.array(symbols, np.int32), example_tables(), TAG)


# payload examples decoded by tests from the document alone: name -> symbols
PAYLOAD_EXAMPLES: dict[str, list[int]] = {
    "stream": [0, 1, -1, 0, 2, 0, 0, -1],
    "stream_escape": [0, 0, 7, 0, -1, 0, 0, -300],   # 7 and -300 lie outside -4..4: escapes
}


def tables_text(tables: EntropyTables) -> str:
    lines = [f"precision_bits {tables.precision}", "lower " + " ".join(map(str, tables.lower)),
             "length " + " ".join(map(str, tables.length))]
    lines += [f"cdf[{d}] " + " ".join(map(str, tables.cdf[d, : tables.length[d] + 2])) for d in range(tables.dim)]
    return "\n".join(lines)


def parse_tables(text: str) -> EntropyTables:
    """The inverse of tables_text: lower, length and the integer CDF rows as the document prints them."""
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in text.strip().splitlines()}
    precision, lower, length = rows["precision_bits"][0], rows["lower"], rows["length"]
    width = max(length) + 2
    cdf = np.full((len(lower), width), 1 << precision, np.int64)
    for d in range(len(lower)):
        cdf[d, : length[d] + 2] = rows[f"cdf[{d}]"]
    pmf = np.diff(cdf, axis=1)[:, : width - 1].astype(np.float32)  # only for the estimate; coders use the CDF
    return EntropyTables(np.array(lower), np.array(length), pmf, cdf, precision)


def parse_payload_examples(text: str) -> tuple[EntropyTables, dict[str, tuple[list[int], bytes]]]:
    """From the document: the example tables and each payload example's stated symbols and hex bytes."""
    tables = parse_tables(re.search(r"<!-- tables: payload -->\s*```text\n(.*?)```", text, re.S).group(1))
    found = {}
    for name, symbols, block in re.findall(
            r"<!-- payload: (\w+) symbols=\[([^\]]*)\] -->\s*(?:<!-- example: \w+ -->\s*)?```text\n(.*?)```",
            text, re.S):
        found[name] = ([int(v) for v in symbols.split(",")],
                       bytes.fromhex("".join(line.split(":", 1)[1] for line in block.strip().splitlines())))
    return tables, found


EPOCH = 0x2C5E9B1D4A7F3E61  # an example of the random 63-bit id a camera draws when its spool is created
YEAR_MS = 365 * 86_400_000


def _batch() -> wire.Batch:
    return wire.Batch(EPOCH, [wire.Frame(41, 1_700_000_000_000, _stream([0, 1, -1, 0, 2, 0, 0, -1])),
                              wire.Frame(42, 1_700_000_000_200, _stream([1, 0, 0, -2, 0, 1, 0, 0]))])


def _batch_clock_step() -> wire.Batch:
    """A camera that booted at 1970-01-01 00:00:05 and whose clock NTP sets to 2023-11-14 between two frames, then
    one frame later steps back one year: every frame keeps its true capture time."""
    return wire.Batch(EPOCH, [wire.Frame(7, 5_000, b"\x01\x02"), wire.Frame(8, 1_700_000_000_000, b"\x03"),
                              wire.Frame(9, 1_700_000_000_000 - YEAR_MS, b"")])


RESIDUAL_TAG = bytes.fromhex("86117e7055889966")  # the default bundle's (manifest temporal.residual_tag)


def _tbatch() -> wire.TemporalBatch:
    """v3: a KEY frame, a SAME frame (no payload) and a COND frame (residual symbols coded with the example tables
    standing in for residual tables, the check seeded with the residual tag)."""
    cond = compress(np.array([0, 0, 1, 0, 0, 0, -1, 0], np.int32), example_tables(), RESIDUAL_TAG)
    return wire.TemporalBatch(EPOCH, [wire.Frame(41, 1_700_000_000_000, _stream([0, 1, -1, 0, 2, 0, 0, -1])),
                                      wire.Frame(42, 1_700_000_000_200, b"", wire.SAME),
                                      wire.Frame(43, 1_700_000_000_400, cond, wire.COND)])


def _cbatches() -> tuple[wire.CompactBatch, wire.CompactBatch]:
    """v4: the TBATCH example's three frames as a connection's first CBATCH (every header field), then the next
    CBATCH on the same connection: seq 44..49, five SAME frames (the third captured 2 ms late, the two after it at
    the nominal 200 ms from it) and a COND frame captured 3 ms late."""
    conn = wire.Connection()
    first = conn.batch(EPOCH, _tbatch().frames, 200)
    cond = compress(np.array([0, 0, 0, 0, 1, 0, 0, 0], np.int32), example_tables(), RESIDUAL_TAG)
    t = 1_700_000_000_400
    frames = [wire.Frame(44 + i, t + d, b"", wire.SAME) for i, d in enumerate((200, 400, 602, 802, 1002))]
    frames.append(wire.Frame(49, t + 1205, cond, wire.COND))
    return first, conn.batch(EPOCH, frames, 200)


EXAMPLES: dict[str, Callable[[], bytes]] = {
    "hello": lambda: wire.Hello(TAG, "cam-7", b"secret").encode(),
    "hello_temporal": lambda: wire.Hello(TAG, "cam-7", b"secret", capabilities=wire.CAP_TEMPORAL,
                                         residual_tag=RESIDUAL_TAG).encode(),
    "welcome": lambda: wire.Welcome().encode(),
    "welcome_temporal": lambda: wire.Welcome(4, wire.CAP_TEMPORAL).encode(),
    "welcome_v3": lambda: wire.Welcome(3, wire.CAP_TEMPORAL).encode(),
    "welcome_v2": lambda: wire.Welcome(2).encode(),
    "tbatch": lambda: _tbatch().encode(),
    "cbatch": lambda: _cbatches()[0].encode(),
    "cbatch_next": lambda: _cbatches()[1].encode(),
    "error_resync": lambda: wire.Error(wire.Code.RESYNC, "reconnect").encode(),
    "stream": lambda: _stream([0, 1, -1, 0, 2, 0, 0, -1]),
    "batch": lambda: _batch().encode(),
    "batch_clock_step": lambda: _batch_clock_step().encode(),
    "ack": lambda: wire.Ack(EPOCH, 41, 2).encode(),
    "reject": lambda: wire.Reject(EPOCH, 42, 1, wire.Code.BAD_PAYLOAD, "stream check failed").encode(),
    "error": lambda: wire.Error(wire.Code.UNAUTHORIZED, "unknown camera or wrong token").encode(),
    "frame_header": lambda: FrameHeader(28, 28, GRAY8, 1_700_000_000_000, 9).pack(),
}


def hexdump(data: bytes) -> str:
    return "\n".join(f"{i:04x}: {data[i:i + 16].hex(' ')}" for i in range(0, len(data), 16))


def parse_doc(text: str) -> dict[str, bytes]:
    """``<!-- example: NAME -->`` followed by a fenced hex dump -> {NAME: bytes}."""
    found = {}
    for name, block in re.findall(r"<!-- example: (\w+) -->\s*```text\n(.*?)```", text, re.S):
        found[name] = bytes.fromhex("".join(line.split(":", 1)[1] for line in block.strip().splitlines()))
    return found


def main() -> None:
    for name, make in EXAMPLES.items():
        print(f"<!-- example: {name} -->\n```text\n{hexdump(make())}\n```\n")
    print(f"<!-- tables: payload -->\n```text\n{tables_text(example_tables())}\n```\n")
    for name, symbols in PAYLOAD_EXAMPLES.items():
        print(f"<!-- payload: {name} symbols=[{', '.join(map(str, symbols))}] -->\n```text\n"
              f"{hexdump(_stream(symbols))}\n```\n")


if __name__ == "__main__":
    main()
