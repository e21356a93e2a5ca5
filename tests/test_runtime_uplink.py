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
