"""Limits before authentication, on the real server subprocess: 200 concurrent unauthenticated connections each
trying to send 60 MiB (WebSocket first messages and HTTP bodies, from one address and from many) cost the server
less than 100 MB of RSS while a camera streaming at the same time loses nothing; a HELLO that never comes and a
request head or an ingest body that never ends are cut off by their deadlines."""

import asyncio
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.testing import ServerProcess
from taskcodec.testing.flood import UPGRADE, flood
from tiny_bundle import make_tiny_bundle

FLOODERS = 200
FLOOD_BYTES = 60 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    bundle = make_tiny_bundle(root / "bundle")
    cfg = root / "server.yaml"
    cfg.write_text("limits:\n  handshake_timeout_s: 1.5\n  http_header_timeout_s: 1.5\n  http_body_timeout_s: 1.5\n")
    with ServerProcess(bundle.path, root / "frames.db", "--config", str(cfg)) as srv:
        yield bundle, srv


async def _flood(port: int) -> dict:
    return await flood(port, FLOODERS, FLOOD_BYTES)


def test_200_unauthenticated_60mib_senders_cost_little_and_a_camera_loses_nothing(env):
    bundle, srv = env
    token = srv.add_camera("cam-live")
    proc = psutil.Process(srv.proc.pid)
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(0).integers(-6, 7, (64, bundle.latent_dim)).astype(np.int32)
    payloads = [compress(s, coder, bundle.model_tag) for s in symbols]
    acked, sent, stop, problems = set(), [], threading.Event(), []

    def camera():
        seq = 0
        try:
            with srv.stream(timeout=30) as c:
                assert c.hello(wire.Hello(bundle.model_tag, "cam-live", token)) == wire.Welcome()
                while not stop.is_set():
                    frames = [wire.Frame(seq + k, 1_700_000_000_000 + seq + k, payloads[(seq + k) % 64])
                              for k in range(5)]
                    sent.extend(f.seq for f in frames)
                    for r in c.send(wire.Batch(42, frames)):
                        if not isinstance(r, wire.Ack):
                            problems.append(r)
                        else:
                            acked.update(range(r.first_seq, r.first_seq + r.count))
                    seq += 5
                    time.sleep(0.01)
        except Exception as exc:  # reported below
            problems.append(exc)

    rss = []

    def sample():
        while not stop.is_set():
            rss.append(proc.memory_info().rss)
            time.sleep(0.02)

    baseline = proc.memory_info().rss
    threads = [threading.Thread(target=camera), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    try:
        t0 = time.monotonic()
        stats = asyncio.run(asyncio.wait_for(_flood(srv.port), 120))
        flood_s = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    growth_mb = (max(rss) - baseline) / 1e6
    print(f"flood: {stats}, {flood_s:.1f} s, server RSS {baseline / 1e6:.0f} MB -> peak {max(rss) / 1e6:.0f} MB")
    assert stats["sent_everything"] == 0, stats  # nobody got 60 MiB in
    assert stats["refused_before_upgrade"] > 0 and stats["cut_off"] > 0, stats
    assert stats["bytes"] < FLOODERS * FLOOD_BYTES / 10, stats
    assert growth_mb < 100, (growth_mb, stats)
    assert not problems, problems[:3]
    assert len(sent) > 50 and acked == set(sent)
    stored = srv.get_json("/v1/cameras/cam-live/frames?limit=10000")["frames"]
    assert {f["seq"] for f in stored} == set(sent)
    assert srv.alive() and srv.health()["status"] == "ok"
    metrics = srv.get_text("/metrics")
    assert 'taskcodec_server_connections_refused_total{limit="pending_per_address"}' in metrics
    assert "taskcodec_server_pending_connections 0.0" in metrics  # every pending slot was given back
    full_log = srv.log_path.read_text(errors="replace")
    assert full_log.count("event=disconnect") < FLOODERS / 2  # unauthenticated disconnects: rate-limited per address
    full_log = srv.log_path.read_text(errors="replace")
    assert "camera authentication failed" in full_log and "flood-" in full_log


def test_hello_and_request_head_deadlines(env):
    bundle, srv = env
    with srv.stream(timeout=10) as c:  # upgrade done, no HELLO: refused after handshake_timeout_s
        t0 = time.monotonic()
        replies = c.receive()
        assert replies and replies[0].code == wire.Code.BAD_MESSAGE and "no HELLO within" in replies[0].reason
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # a request head that never ends
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # an ingest body that never ends
        s.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n\x01\x02")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408") and b"not received within" in data, data[:300]
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # a first message over 1 KiB
        s.sendall(UPGRADE)
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.sendall(bytes([0x82, 0x80 | 126]) + (2000).to_bytes(2, "big") + b"mask" + bytes(2000))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data[:1] == b"\x88" and data[2:4] == (1009).to_bytes(2, "big")  # close: message too big


def test_connections_over_max_connections_are_closed_at_once(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    cfg = tmp_path / "server.yaml"
    cfg.write_text("limits:\n  max_connections: 16\n")
    with ServerProcess(bundle.path, tmp_path / "frames.db", "--config", str(cfg)) as srv:
        token = srv.add_camera("cam-m")
        with srv.stream() as camera:
            assert camera.hello(wire.Hello(bundle.model_tag, "cam-m", token)) == wire.Welcome()
            idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(20)]
            try:
                closed = 0
                for s in idle:
                    s.settimeout(0.5)
                    try:
                        closed += s.recv(1) == b""
                    except (socket.timeout, ConnectionResetError):
                        pass
                assert 4 <= closed <= 5, closed  # 1 camera + 20 idle > 16: the newest are closed at once
                coder = RangeCoder(bundle.tables)
                frame = wire.Frame(0, 1, compress(np.zeros(bundle.latent_dim, np.int32), coder, bundle.model_tag))
                assert camera.send(wire.Batch(1, [frame])) == [wire.Ack(1, 0, 1)]  # the camera is unaffected
            finally:
                for s in idle:
                    s.close()
        assert "limits.max_connections" in srv.log()
