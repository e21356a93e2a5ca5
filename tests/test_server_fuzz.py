"""10,000 mutated or random ingest packets: every one is answered cleanly (no crash, a reason), the server stays
healthy, and the database holds exactly the frames an independent oracle says are genuine (nothing from the garbage).

Most packets go through the transport-free ingest core in-process (fast); a few hundred go to a real server
subprocess over HTTP (one keep-alive connection) and over WebSocket."""

import asyncio
import sqlite3

import numpy as np

from taskcodec.server.ingest import IngestService
from taskcodec.wire import split_ingest_body
from taskcodec.server.auth import add_camera
from taskcodec.server.storage import SQLiteStorage
from taskcodec.testing import ServerProcess, read_replies
from taskcodec import wire
from taskcodec.coding import RangeCoder, StreamError, compress, decompress
from tiny_bundle import make_tiny_bundle

N_IN_PROCESS = 9000
N_HTTP = 700
N_WS = 300


def _mutate(rng, packet: bytes, protect: int = 0) -> bytes:
    """One random mutation: bit flips, byte overwrites, truncation, insertion, splicing, or pure noise."""
    data = bytearray(packet)
    kind = rng.integers(7)
    lo = protect
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(lo, len(data))
            data[i] ^= 1 << rng.integers(8)
    elif kind == 1:
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(lo, len(data))] = rng.integers(256)
    elif kind == 2:
        data = data[: rng.integers(lo, len(data))]
    elif kind == 3:
        i = rng.integers(lo, len(data) + 1)
        data[i:i] = rng.integers(0, 256, rng.integers(1, 8)).astype(np.uint8).tobytes()
    elif kind == 4:
        i, j = sorted(rng.integers(lo, len(data), 2))
        data[i:i] = data[i:j]
    elif kind == 5:
        i = rng.integers(lo, len(data))
        del data[i: i + rng.integers(1, 8)]
    else:
        data = bytearray(data[:lo]) + rng.integers(0, 256, rng.integers(0, 120)).astype(np.uint8).tobytes()
    return bytes(data)


def _creds(hello):
    return hello.model_tag, hello.camera_id, hello.token


class Oracle:
    """Says, independently of the server, which frames of a packet are genuine and must be stored."""

    def __init__(self, bundle, hello):
        self.coder, self.tag, self.hello = RangeCoder(bundle.tables), bundle.model_tag, hello

    def genuine(self, hello, rest: bytes):
        try:
            batch = wire.decode(rest)
        except wire.WireError:
            return None  # malformed: 400
        if not isinstance(batch, wire.Batch):
            return None
        if _creds(hello) != _creds(self.hello) or isinstance(batch, wire.TemporalBatch):
            return set()  # another camera, token or model (any wire version is fine); no temporal grant here
        keys = set()
        for f in batch.frames:
            try:
                decompress(f.payload, self.coder, self.tag)
            except StreamError:
                continue
            keys.add((hello.camera_id, batch.epoch, f.seq))
        return keys

    def packet(self, packet: bytes):
        try:
            hello, rest = split_ingest_body(packet)
        except wire.WireError:
            return None
        return self.genuine(hello, rest)


def _base(bundle, camera, token, epoch, n=4, seed=0):
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(seed).integers(-5, 6, (n, bundle.latent_dim)).astype(np.int32)
    frames = [wire.Frame(10 + i, 1_700_000_000_000 + 40 * i, compress(s, coder, bundle.model_tag))
              for i, s in enumerate(symbols)]
    hello = wire.Hello(bundle.model_tag, camera, token)
    return hello, wire.Batch(epoch, frames)


def _keys(db):
    with sqlite3.connect(db) as conn:
        return set(conn.execute("SELECT camera_id, epoch, seq FROM frames").fetchall())


def test_fuzz_ingest_core_in_process(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    storage = SQLiteStorage(tmp_path / "fuzz.db")
    token = add_camera(storage, "cam-f").encode()
    add_camera(storage, "cam-g")
    hello, batch = _base(bundle, "cam-f", token, epoch=3)
    oracle = Oracle(bundle, hello)
    packet = hello.encode() + batch.encode()
    rng = np.random.default_rng(1234)
    expected: set = set()
    statuses: dict[int, int] = {}

    async def run():
        service = IngestService(bundle, storage)
        try:
            for i in range(N_IN_PROCESS):
                # a third of the mutations keep the HELLO intact, so payload decoding gets fuzzed too
                protect = len(hello.encode()) if i % 3 == 0 else 0
                fuzzed = _mutate(rng, packet, protect)
                want = oracle.packet(fuzzed)
                reply = await service.ingest_http(fuzzed)
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if any(isinstance(m, wire.Reject) for m in read_replies(reply.body)):
                    statuses["with_reject"] = statuses.get("with_reject", 0) + 1
                assert reply.reason and reply.body, fuzzed
                if want is None:
                    assert reply.status == 400, (fuzzed, reply)
                elif want:
                    assert reply.status == 200, (fuzzed, reply)
                    expected.update(want)
                else:
                    assert 400 <= reply.status < 500, (fuzzed, reply)
        finally:
            await service.aclose()

    asyncio.run(run())
    assert _keys(tmp_path / "fuzz.db") == expected
    assert statuses.get(400, 0) > 1000 and statuses.get(401, 0) > 100 and statuses.get(200, 0) > 100 \
        and statuses.get("with_reject", 0) > 100, statuses
    # still fully working afterwards
    hello2, batch2 = _base(bundle, "cam-f", token, epoch=99, seed=5)

    async def after():
        service = IngestService(bundle, storage)
        try:
            return await service.ingest_http(hello2.encode() + batch2.encode())
        finally:
            await service.aclose()

    assert asyncio.run(after()).status == 200
    storage.close()


def test_fuzz_real_server_over_http_and_websocket(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    db = tmp_path / "fuzz.db"
    rng = np.random.default_rng(99)
    with ServerProcess(bundle.path, db) as srv:
        token = srv.add_camera("cam-f")
        hello, batch = _base(bundle, "cam-f", token, epoch=4)
        oracle = Oracle(bundle, hello)
        packet = hello.encode() + batch.encode()
        expected: set = set()
        with srv.http() as h:
            for i in range(N_HTTP):
                fuzzed = _mutate(rng, packet, len(hello.encode()) if i % 2 else 0)
                want = oracle.packet(fuzzed)
                r = h.post_raw(fuzzed)
                assert r.reason and r.replies, fuzzed
                try:
                    other_hello = _creds(split_ingest_body(fuzzed)[0]) != _creds(hello)
                except wire.WireError:
                    other_hello = False
                # the HELLO is authenticated before the batch is parsed: a bad batch behind a bad HELLO is a 401/409
                allowed = ({400, 401, 409} if other_hello else {400}) if want is None else {200} if want else None
                assert allowed is None or r.status in allowed, (fuzzed, r)
                assert r.status == 200 or 400 <= r.status < 500
                expected |= want or set()
        raw_batch = batch.encode()
        for i in range(N_WS):
            fuzzed = _mutate(rng, raw_batch)
            want = oracle.genuine(hello, fuzzed)
            with srv.stream() as c:
                assert c.hello(hello) == wire.Welcome()
                n = len(wire.decode(fuzzed).frames) if want is not None else 0
                replies = c.send_raw(fuzzed, frames=n)
                assert replies and all(getattr(r, "reason", "ok") for r in replies), fuzzed
                if want is None:
                    assert isinstance(replies[0], wire.Error) and c.closed()
                else:
                    acked = {(hello.camera_id, r.epoch, r.first_seq + k) for r in replies if isinstance(r, wire.Ack)
                             for k in range(r.count)}
                    assert acked == want, (fuzzed, replies)
                    expected |= want
        assert srv.alive() and srv.health()["status"] == "ok"
        assert _keys(db) == expected
