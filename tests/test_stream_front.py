"""The picows stream front end of `taskcodec serve` (server/stream.py), on the real server subprocess: messages sent
back to back are answered in order, a fragmented first message is bounded by the HELLO limit from its frame headers,
a text HELLO is refused with a reason, an upgrade after an HTTP request on a keep-alive connection still reaches the
ASGI route, per-frame metrics are exported, a graceful stop closes streams with 1012; and the fast BATCH decoder
agrees with wire.decode on valid and mangled messages."""

import os
import random
import signal
import socket
import time

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.server.stream import decode_batch, is_stream_request
from taskcodec.testing import ServerProcess
from taskcodec.testing.flood import UPGRADE
from tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    bundle = make_tiny_bundle(root / "bundle")
    with ServerProcess(bundle.path, root / "frames.db") as srv:
        yield bundle, srv


def _payloads(bundle, n=8):
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(1).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    return [compress(s, coder, bundle.model_tag) for s in symbols]


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame (masked with a zero mask: the payload bytes stay as they are)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def _upgraded(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.settimeout(10)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 2 <= len(data):
        op, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        out.append((op, data[pos:pos + n]))
        pos += n
    return out


def test_messages_sent_back_to_back_are_acked_in_order_and_counted(env):
    bundle, srv = env
    token = srv.add_camera("cam-pipe")
    payloads = _payloads(bundle)
    s = _upgraded(srv.port)
    try:
        s.sendall(_frame(2, wire.Hello(bundle.model_tag, "cam-pipe", token).encode()))
        batches = [wire.Batch(5, [wire.Frame(k, 1_700_000_000_000 + k, payloads[k % 8])]) for k in range(40)]
        s.sendall(b"".join(_frame(2, b.encode()) for b in batches))  # 40 messages without waiting for an answer
        data = b""
        deadline = time.monotonic() + 20
        while len([f for f in _server_frames(data) if f[1][:1] == b"\x03"]) < 40 and time.monotonic() < deadline:
            data += s.recv(65536)
    finally:
        s.close()
    replies = [wire.decode(p) for op, p in _server_frames(data) if op == 2]
    assert isinstance(replies[0], wire.Welcome)
    assert replies[1:] == [wire.Ack(5, k, 1) for k in range(40)]
    stored = srv.get_json("/v1/cameras/cam-pipe/frames?limit=100")["frames"]
    assert sorted(f["seq"] for f in stored) == list(range(40))
    metrics = srv.get_text("/metrics")
    received = float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith("taskcodec_server_frames_received_total ")))
    assert received >= 40
    count = float(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("taskcodec_server_capture_to_stored_seconds_count ")))
    assert count >= 40


def test_a_fragmented_first_message_is_bounded_by_the_hello_limit(env):
    bundle, srv = env
    token = srv.add_camera("cam-frag")
    hello = wire.Hello(bundle.model_tag, "cam-frag", token).encode()
    s = _upgraded(srv.port)  # a HELLO in three fragments within the limit: accepted
    try:
        s.sendall(_frame(2, hello[:5], fin=False) + _frame(0, hello[5:9], fin=False) + _frame(0, hello[9:]))
        data = s.recv(4096)
        assert _server_frames(data)[0] == (2, wire.Welcome().encode())
    finally:
        s.close()
    s = _upgraded(srv.port)  # fragments of 600 bytes each: the second passes the 1 KiB HELLO limit
    try:
        s.sendall(_frame(2, bytes(600), fin=False))
        s.sendall(_frame(0, bytes(600), fin=False))
        frames = _server_frames(_read_all(s))
    finally:
        s.close()
    assert frames and frames[-1][0] == 8 and frames[-1][1][:2] == (1009).to_bytes(2, "big"), frames


def test_a_text_hello_is_refused_with_a_reason(env):
    bundle, srv = env
    s = _upgraded(srv.port)
    try:
        s.sendall(_frame(1, b"hello"))
        frames = _server_frames(_read_all(s))
    finally:
        s.close()
    error = wire.decode(frames[0][1])
    assert isinstance(error, wire.Error) and error.code == wire.Code.BAD_MESSAGE and "text message" in error.reason
    assert frames[-1][0] == 8 and frames[-1][1][:2] == (1003).to_bytes(2, "big")


def test_an_upgrade_after_an_http_request_on_the_same_connection_still_works(env):
    bundle, srv = env
    token = srv.add_camera("cam-ka")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b'"status"' not in data:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200")
        s.sendall(UPGRADE)  # the ASGI route (uvicorn's WebSocket protocol) answers this one
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        s.sendall(_frame(2, wire.Hello(bundle.model_tag, "cam-ka", token).encode()))
        assert _server_frames(s.recv(4096))[0] == (2, wire.Welcome().encode())


def test_request_line_routing():
    assert is_stream_request(b"GET /v1/stream HTTP/1.1\r\n")
    assert is_stream_request(b"GET /v1/stream?x=1 HTTP/1.1\r\n")
    assert not is_stream_request(b"GET /v1/streams HTTP/1.1\r\n")
    assert not is_stream_request(b"POST /v1/stream HTTP/1.1\r\n")
    assert not is_stream_request(b"GET /healthz HTTP/1.1\r\n")


def test_a_graceful_stop_closes_streams_with_1012(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    srv = ServerProcess(bundle.path, tmp_path / "frames.db").start()
    try:
        token = srv.add_camera("cam-stop")
        c = srv.stream(timeout=10)
        assert c.hello(wire.Hello(bundle.model_tag, "cam-stop", token)) == wire.Welcome()
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert c.closed()
        assert c.ws.close_code == 1012
        srv.proc.wait(timeout=20)
        # uvicorn re-raises the signal once it has shut down gracefully
        assert srv.proc.returncode in (0, -signal.SIGTERM) and time.monotonic() - t0 < 15
    finally:
        srv.stop()


def test_fast_batch_decode_agrees_with_wire_decode():
    rng = random.Random(0)
    accepted = 0
    for _ in range(5000):
        k = rng.randint(1, 4)
        first = rng.choice([0, 127, 128, 1 << 40, wire.MAX_SEQ - k + 1])
        ts = rng.choice([0, -5, 1_700_000_000_000, wire.MAX_ABS_TS_MS, -wire.MAX_ABS_TS_MS])
        frames = [wire.Frame(first + i, max(-wire.MAX_ABS_TS_MS, min(wire.MAX_ABS_TS_MS, ts + 7 * i)),
                             rng.randbytes(rng.choice([0, 6, 200]))) for i in range(k)]
        data = bytearray(wire.Batch(rng.choice([0, 1 << 62]), frames).encode())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                if not data:
                    break
                if rng.random() < 0.5:
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                else:
                    del data[rng.randrange(len(data)):]
        data = bytes(data)
        fast = decode_batch(data)
        try:
            slow = wire.decode(data)
        except wire.WireError:
            slow = None
        if fast is not None:
            accepted += 1
            assert type(slow) is wire.Batch and slow == fast
        else:
            assert slow is None or type(slow) is not wire.Batch
    assert accepted > 2000
