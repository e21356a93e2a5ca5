"""The uplink against a local WebSocket server speaking the protocol (runtime.fakeserver): every spooled frame arrives
exactly once at the server even when the connection keeps breaking, the client waits for a server that is not up
yet, rejected frames are dropped, and a refused camera stops at once instead of retrying."""

import random
import socket
import time

import pytest

from taskcodec.testing.fake_ingest import FakeIngestServer
from taskcodec.runtime.spool import Spool
from taskcodec.runtime.uplink import Uplink, UplinkConfig, backoff_delay, stream_url
from taskcodec import wire
from taskcodec.coding import EntropyTables, compress
import numpy as np

TAG = bytes.fromhex("0123456789abcdef")
TIMEOUT = 60


def _wait(cond, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _fill(spool, n, start=0):
    for i in range(start, start + n):
        spool.append(1_000_000 + 10 * i, b"payload-%d" % i)


def _uplink(spool, url, token=b"secret", tag=TAG, **kw):
    cfg = UplinkConfig(url, "cam-1", token, backoff_initial=0.05, backoff_max=0.5, **kw)
    return Uplink(spool, tag, cfg).start()


def test_stream_url():
    assert stream_url("http://h:8000") == "ws://h:8000/v1/stream"
    assert stream_url("ws://h:8000/") == "ws://h:8000/v1/stream"
    assert stream_url("https://h") == "wss://h/v1/stream"
    assert stream_url("h:9") == "ws://h:9/v1/stream"
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        stream_url("ftp://h:1")
    with pytest.raises(ValueError, match="camera id"):
        UplinkConfig("http://h:1", "")


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.25, 15.0, rng) for a in range(12)]
    assert all(0 < d <= 15.0 for d in delays)
    assert max(delays[:2]) <= 0.5 and min(delays[8:]) >= 15.0 / 4
    assert len({round(backoff_delay(3, 0.25, 15.0, rng), 6) for _ in range(20)}) > 1  # jittered


@pytest.mark.parametrize("max_delay", [0.0, 0.05])
def test_all_frames_acked_and_removed(tmp_path, max_delay):
    with FakeIngestServer(TAG) as server, Spool(tmp_path, 1000) as spool:
        up = _uplink(spool, server.url, max_delay=max_delay, max_batch=16)
        _fill(spool, 100)
        up.notify()
        assert up.wait_drained(TIMEOUT), f"spool still holds {spool.depth()}"
        up.stop()
        assert len(server.frames) == 100 and up.stats.acked == 100
        assert server.frames[("cam-1", spool.epoch, 7)] == (1_000_070, b"payload-7")
        if max_delay == 0:
            assert server.batches >= 1
        assert up.fatal is None


def test_reconnects_and_resends_until_everything_arrives_once(tmp_path):
    with FakeIngestServer(TAG, close_after_batches=3) as server, Spool(tmp_path, 1000) as spool:
        up = _uplink(spool, server.url, max_delay=0.0, max_batch=5, max_in_flight=2)
        for k in range(4):  # frames keep coming while the link breaks every 3 batches
            _fill(spool, 20, start=20 * k)
            up.notify()
        assert up.wait_drained(TIMEOUT), f"spool still holds {spool.depth()}"
        up.stop()
        assert sorted(s for (_, _, s) in server.frames) == list(range(80))
        assert up.sessions >= 2 and up.stats.reconnects >= 1
        assert server.connections == up.attempts or server.connections >= up.sessions


def test_waits_for_a_server_that_is_not_up_yet(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Spool(tmp_path, 1000) as spool:
        _fill(spool, 10)
        up = _uplink(spool, f"http://127.0.0.1:{port}")
        assert _wait(lambda: up.attempts >= 2), "no retry while the server is down"
        assert spool.depth() == 10 and up.fatal is None
        with FakeIngestServer(TAG, port=port) as server:
            assert up.wait_drained(TIMEOUT)
            up.stop()
            assert len(server.frames) == 10


def test_rejected_frames_are_dropped_and_counted(tmp_path):
    tables = EntropyTables.from_pmfs(np.zeros(4, np.int32), [np.ones(3)] * 4)
    good = compress(np.array([0, 1, 2, 1]), tables, TAG)
    with FakeIngestServer(TAG, tables=tables) as server, Spool(tmp_path, 100) as spool:
        spool.append(1, good)
        spool.append(2, b"garbage!")
        spool.append(3, good)
        up = _uplink(spool, server.url, max_delay=0.0)
        assert up.wait_drained(TIMEOUT)
        up.stop()
        assert up.stats.rejected == 1 and up.stats.acked == 2 and spool.dropped == 1
        assert len(server.frames) == 2


@pytest.mark.parametrize("token,tag,match", [(b"wrong", TAG, "unauthorized"), (b"secret", bytes(8), "unknown model")])
def test_refused_camera_stops_without_retrying(tmp_path, token, tag, match):
    with FakeIngestServer(TAG) as server, Spool(tmp_path, 100) as spool:
        _fill(spool, 3)
        up = _uplink(spool, server.url, token=token, tag=tag)
        assert _wait(lambda: up.fatal is not None)
        assert match in str(up.fatal)
        if match == "unknown model":
            assert TAG.hex() in str(up.fatal)  # the server's expected id is passed on
        time.sleep(0.5)  # several backoff periods: a retrying client would have reconnected by now
        assert server.hellos == 1 and up.attempts == 1
        assert not up.running and spool.depth() == 3  # nothing lost
        up.stop()


class ScriptedServer:
    """A protocol server whose answer to each BATCH is scripted: ``answer(batch) -> list of replies`` (an Error
    closes the connection). Counts connections, to measure the camera's reconnect rate."""

    def __init__(self, answer):
        import asyncio
        import threading

        self.answer = answer
        self.connections = 0
        self.batches: list[wire.Batch] = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _main(self):
        import asyncio

        from websockets.asyncio.server import serve

        async def handle(ws):
            self.connections += 1
            hello = wire.decode(await ws.recv())
            assert isinstance(hello, wire.Hello)
            await ws.send(wire.Welcome().encode())
            async for raw in ws:
                batch = wire.decode(raw)
                self.batches.append(batch)
                for reply in self.answer(batch):
                    await ws.send(reply.encode())
                    if isinstance(reply, wire.Error):
                        await ws.close(1011)
                        return

        async def main():
            async with serve(handle, "127.0.0.1", 0) as server:
                self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
                self.stop_event = asyncio.Event()
                self.ready.set()
                await self.stop_event.wait()

        self.loop.run_until_complete(main())

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


def test_busy_backs_off_although_every_handshake_succeeds(tmp_path):
    """A server that WELCOMEs the camera and answers every batch with BUSY (disk full): the backoff keeps growing
    (it resets only on an ACK), so the camera reconnects a few times, not hundreds."""
    server = ScriptedServer(lambda b: [wire.Error(wire.Code.BUSY, "disk full")])
    try:
        with Spool(tmp_path, 1000) as spool:
            _fill(spool, 20)
            cfg = UplinkConfig(server.url, "cam-1", b"secret", backoff_initial=0.1, backoff_max=30.0, max_delay=0)
            up = Uplink(spool, TAG, cfg).start()
            time.sleep(4.0)
            up.stop()
            # full jitter in [cap/4, cap], cap = 0.1 * 2^n: at most 0.1/4 + 0.2/4 + ... -> at most 8 connections in 4 s
            assert 2 <= server.connections <= 8, server.connections
            assert up.failures >= 2 and spool.depth() == 20 and up.fatal is None and up.crashed is None
    finally:
        server.stop()


def test_a_batch_refused_as_malformed_is_split_and_the_bad_frame_dropped(tmp_path):
    """ERROR BAD_MESSAGE after WELCOME for any batch holding the poison frame: the camera halves the batch until the
    frame is alone, drops it (counted, reason 'malformed') and delivers all the others: never wedged."""

    def answer(batch):
        if any(f.payload == b"poison" for f in batch.frames):
            return [wire.Error(wire.Code.BAD_MESSAGE, "cannot parse this batch")]
        return [wire.Ack(batch.epoch, batch.frames[0].seq, len(batch.frames))]

    server = ScriptedServer(answer)
    try:
        with Spool(tmp_path, 1000) as spool:
            for i in range(16):
                spool.append(i, b"poison" if i == 11 else b"ok-%d" % i)
            cfg = UplinkConfig(server.url, "cam-1", b"secret", backoff_initial=0.01, backoff_max=0.05, max_delay=0,
                               max_batch=16, max_in_flight=1)
            up = Uplink(spool, TAG, cfg).start()
            assert up.wait_drained(TIMEOUT), spool.depth()
            up.stop()
            acked = sorted(f.seq for b in server.batches for f in b.frames if f.payload != b"poison")
            assert set(acked) == set(range(16)) - {11}
            assert up.stats.drops == {"malformed": 1} and spool.counters()["dropped_rejected"] == 1
            assert up.fatal is None and up.crashed is None
    finally:
        server.stop()


def test_a_programming_error_crashes_loudly_instead_of_retrying(tmp_path, monkeypatch, caplog):
    with FakeIngestServer(TAG) as server, Spool(tmp_path, 100) as spool:
        _fill(spool, 3)
        monkeypatch.setattr(Uplink, "_next_run", lambda self, rows: 1 / 0)
        up = _uplink(spool, server.url, max_delay=0)
        assert _wait(lambda: up.crashed is not None)
        time.sleep(0.3)
        assert isinstance(up.crashed, ZeroDivisionError) and up.attempts == 1 and not up.running
        assert "uplink crashed" in caplog.text and "Traceback" in caplog.text
        up.stop()
