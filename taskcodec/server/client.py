"""A minimal pure-Python client of the ingest protocol, for tests, fuzzing and benchmarks (the camera runtime has its
own). WebSocket via websockets' sync client; HTTP via the standard library."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from taskcodec import wire


def read_replies(data: bytes) -> list[wire.Message]:
    """Split an HTTP ingest response body (one or more concatenated ACK/REJECT/ERROR messages): wire.decode_replies."""
    return wire.decode_replies(data)


class StreamClient:
    """One WebSocket connection: ``hello()`` then ``send(batch)`` -> replies. Raw ``send_raw`` is for fuzzing."""

    def __init__(self, url: str, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None):
        ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/") + "/v1/stream"
        self.timeout = timeout
        extra = {"ssl": ssl_context} if ssl_context is not None else {}
        # __enter__ keeps websockets >= 17.1 from warning about connect() outside a with-block; close() exits it.
        self.ws = connect(ws_url, open_timeout=timeout, close_timeout=5, max_size=None, **extra).__enter__()

    def hello(self, hello: wire.Hello) -> wire.Message:
        return self.send_raw(hello.encode())[0]

    def send(self, batch: wire.Batch) -> list[wire.Message]:
        """Send a batch; read replies until they cover every frame of it (or an Error, or the connection closes)."""
        return self.send_raw(batch.encode(), frames=len(batch.frames))

    def send_raw(self, data: bytes | str, frames: int = 0) -> list[wire.Message]:
        self.ws.send(data)
        return self.receive(frames)

    def send_only(self, data: bytes) -> None:
        self.ws.send(data)

    def receive(self, frames: int = 0) -> list[wire.Message]:
        replies: list[wire.Message] = []
        covered = 0
        try:
            while True:
                msg = wire.decode(self.ws.recv(timeout=self.timeout))
                replies.append(msg)
                if isinstance(msg, (wire.Ack, wire.Reject)):
                    covered += msg.count
                if not isinstance(msg, (wire.Ack, wire.Reject)) or covered >= frames:
                    return replies
        except ConnectionClosed:
            return replies

    def closed(self) -> bool:
        try:
            self.ws.recv(timeout=self.timeout)
        except ConnectionClosed:
            return True
        return False

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class HttpResult:
    status: int
    reason: str
    replies: list[wire.Message]
    body: bytes
    retry_after: str | None = None


class HttpIngestClient:
    """POST /v1/ingest on one keep-alive connection."""

    def __init__(self, url: str, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None):
        u = urllib.parse.urlsplit(url)
        if u.scheme == "https":
            self.conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ssl_context)
        else:
            self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)

    def post_raw(self, body: bytes) -> HttpResult:
        self.conn.request("POST", "/v1/ingest", body=body, headers={"Content-Type": "application/octet-stream"})
        resp = self.conn.getresponse()
        data = resp.read()
        try:
            replies = read_replies(data)
        except wire.WireError:
            replies = []
        return HttpResult(resp.status, resp.getheader("X-Reason", ""), replies, data, resp.getheader("Retry-After"))

    def post(self, hello: wire.Hello, batch: wire.Batch) -> HttpResult:
        return self.post_raw(wire.encode_ingest_body(hello, batch))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "HttpIngestClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
