"""The embedded server's per-message fast paths (issue 12 item 5) say exactly what the general code says: the stream
front end's cached epoch prefix (decode_batch with a connection's cache, encode_ack) against wire.decode /
Ack.encode, the micro-batch linger that ends once enough frames wait, and the token check of a whole micro-batch in
one statement."""

from __future__ import annotations

import asyncio
import random
import time

from taskcodec import wire
from taskcodec.bundle import load_bundle
from taskcodec.server.ingest import IngestService
from taskcodec.server.storage import NEW, BatchRows, SQLiteStorage
from taskcodec.server.stream import _Connection, decode_batch


def test_decode_batch_with_a_connection_cache_equals_wire_decode():
    rng = random.Random(7)
    cache = [None, 0]  # one connection's cache across all the messages below (epochs change now and then)
    epochs = [0, 1, 127, 128, 1 << 40, wire.MAX_EPOCH]
    epoch = rng.choice(epochs)
    accepted = 0
    for _ in range(4000):
        if rng.random() < 0.1:
            epoch = rng.choice(epochs)
        k = rng.randint(1, 3)
        first = rng.choice([0, 127, 128, 1 << 40])
        frames = [wire.Frame(first + i, 1_700_000_000_000 + 7 * i, rng.randbytes(rng.choice([0, 6, 40])))
                  for i in range(k)]
        data = bytearray(wire.Batch(epoch, frames).encode())
        if rng.random() < 0.3:  # damaged: a byte changed (the epoch's too) or the tail cut
            if rng.random() < 0.5:
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            else:
                del data[rng.randrange(1, len(data)):]
        data = bytes(data)
        fast = decode_batch(data, cache)
        try:
            slow = wire.decode(data)
        except wire.WireError:
            slow = None
        if fast is not None:
            accepted += 1
            assert type(slow) is wire.Batch and slow == fast, (data.hex(), cache)
        else:
            assert slow is None or type(slow) is not wire.Batch
        assert decode_batch(data) == fast  # without a cache: the same answer
    assert accepted > 2500


def test_encode_ack_keeps_the_epoch_prefix_and_equals_ack_encode():
    class Conn:
        ack_epoch, ack_prefix = -1, b""

    conn, rng = Conn(), random.Random(3)
    epoch = 1
    for _ in range(2000):
        if rng.random() < 0.2:
            epoch = rng.choice([0, 1, 300, 1 << 50, wire.MAX_EPOCH])
        ack = wire.Ack(epoch, rng.choice([0, 5, 1 << 20, wire.MAX_SEQ]), rng.randint(1, 1000))
        assert _Connection.encode_ack(conn, ack) == ack.encode()


def test_store_batches_checks_every_token_of_a_micro_batch(tmp_path):
    st = SQLiteStorage(tmp_path / "f.db")
    st.add_camera("a", "ha")
    st.add_camera("b", "hb")
    rows = lambda cam, seq: [(cam, 1, seq, 1000 + seq, 2000, "m", b"p", 0, 0.5)]  # noqa: E731
    out = st.store_batches([BatchRows("a", "ha", rows("a", 0)), BatchRows("b", "wrong", rows("b", 0)),
                            BatchRows("gone", "hg", rows("gone", 0)), BatchRows("b", "hb", rows("b", 1)),
                            BatchRows("a", None, rows("a", 1))])
    assert out == [[NEW], None, None, [NEW], [NEW]]
    assert st.frame_counts() == {"a": 2, "b": 1}
    st.close()


def _service(tmp_path, linger_s: float, linger_frames: int) -> IngestService:
    return IngestService(load_bundle(None), SQLiteStorage(tmp_path / "s.db"), linger_s=linger_s,
                         linger_frames=linger_frames)


def _payload(service: IngestService) -> bytes:
    from taskcodec.bench.server_cpu import _frames

    return _frames(service.bundle, 1)[0]


async def _submit_all(service: IngestService, n: int, later: int = 0, start: int = 0) -> float:
    """n one-frame messages at once (and ``later`` more 0.2 s later); seconds until all are answered."""
    payload = _payload(service)
    t0 = time.monotonic()

    async def one(i: int, delay: float = 0.0):
        await asyncio.sleep(delay)
        return await service.submit(f"cam-{i}", wire.Batch(1, [wire.Frame(i, 1000, payload)]))

    replies = await asyncio.gather(*(one(start + i) for i in range(n)),
                                   *(one(start + n + i, 0.2) for i in range(later)))
    assert all(isinstance(r[0], wire.Ack) for r in replies), replies
    return time.monotonic() - t0


def test_linger_ends_once_enough_frames_wait(tmp_path):
    async def main():
        service = _service(tmp_path, linger_s=5.0, linger_frames=8)
        try:
            # 2 messages: the worker lingers (up to 5 s) for more; 10 more arrive 0.2 s later: it stops lingering
            return await _submit_all(service, 2, later=10)
        finally:
            await service.aclose()

    assert asyncio.run(main()) < 2.0


def test_linger_waits_for_more_below_the_target(tmp_path):
    async def main():
        service = _service(tmp_path, linger_s=0.3, linger_frames=1000)
        try:
            return await _submit_all(service, 3)
        finally:
            await service.aclose()

    assert asyncio.run(main()) >= 0.3
