"""Camera-facing gateway of the scale-out mode: the same wire protocol as `taskcodec serve`, no local state.

A camera's BATCH is published to JetStream (subject ``tc.ingest``) with the message id ``camera/epoch/seq/count``;
only when JetStream answers that it stored the message (R3: on a quorum of nodes) does the gateway ACK the camera.
A gateway killed at any moment loses nothing acked: un-acked batches stay in the camera's spool and are re-sent, and
JetStream's duplicate window plus the workers' unique key drop the copies. Decoding and classification happen in the
workers, so a gateway's CPU per frame is the wire handling alone.

Per message cheaply: the WebSocket side is picows (C framing, a callback per message, the first message checked from
its frame header like the embedded server's, server/stream.py); the JetStream side is pipelined. Instead of one
``js.publish`` per message (a request with its own inbox future and timeout, awaited before the next), the messages
arriving within PUBLISH_LINGER_S (2 ms) of a group's first are published with ``nc.publish(reply=<inbox>.<n>)`` in
one task and one flush, and the PubAcks come back on one subscription; the camera's ACK is sent when its own PubAck
says stored (a duplicate counts: stored before). One timer per group answers BUSY to those whose PubAck did not
come within PUBLISH_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import psycopg
from nats.js.errors import NoStreamResponseError
from picows import WSAutoPingStrategy, WSCloseCode, WSListener, WSMsgType
from picows.picows import WSProtocol

from taskcodec import wire
from taskcodec.server.auth import verify_token
from taskcodec.server.cluster.pgstore import PgStore, PgStoreError
from taskcodec.server.stream import LoopNap, _FirstMessageGuard, decode_batch

log = logging.getLogger("taskcodec.gateway")

STREAM = "TCINGEST"
SUBJECT = "tc.ingest"
MAX_HELLO_BYTES = 1024
HANDSHAKE_TIMEOUT_S = 10.0
AUTH_CACHE_S = 30.0
PUBLISH_TIMEOUT_S = 10.0
# Messages arriving within this of a group's first are published (and their PubAcks read) together: one write and
# about one read per group instead of per message (at 1000 one-fps cameras ~3 messages per group; +2 ms latency).
PUBLISH_LINGER_S = 0.002
MAX_MESSAGE_BYTES = wire.MAX_FRAMES_PER_BATCH * (wire.MAX_FRAME_BYTES + 16)
MAX_QUEUED = 4  # messages of one connection waiting before its reading is paused
_picows_log = logging.getLogger("taskcodec.gateway.ws")


async def ensure_stream(js, replicas: int = 3, timeout: float = 60.0) -> None:
    """Create the ingest stream if it does not exist: file storage, ``replicas`` copies, 10-minute dedup window.
    Retries while the JetStream cluster elects its leader (a freshly started cluster answers nothing for seconds)."""
    from nats.js.api import StorageType, StreamConfig

    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                await js.stream_info(STREAM)
            except nats.js.errors.NotFoundError:
                await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE,
                                                 num_replicas=replicas, duplicate_window=600.0))
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError, NoStreamResponseError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"JetStream did not become available within {timeout:.0f} s: {exc!r}") from exc
            await asyncio.sleep(0.5)


class _Connections:
    """What _FirstMessageGuard expects of uvicorn's server state: the set of open connections."""

    def __init__(self):
        self.connections: set = set()


class Gateway:
    def __init__(self, nats_urls: list[str], pg_dsn: str, model_tags: set[bytes]):
        self.nats_urls = nats_urls
        self.pg_dsn = pg_dsn
        self.model_tags = model_tags
        self._auth: dict[str, tuple[str, float]] = {}
        # One thread for the camera-store look-ups: they share one PostgreSQL connection, which must not be used from
        # several threads at once (many cameras connecting together broke its transaction state)
        self._auth_pool = ThreadPoolExecutor(1, thread_name_prefix="camera-auth")
        self.nc = self.js = self.pg = None
        self.state = _Connections()
        self._inbox = ""
        self._n = 0
        self._waiting: dict[int, _Camera] = {}   # publish number -> the connection waiting for its PubAck
        self._out: list[tuple[_Camera, int, bytes, dict]] = []
        self._flush_task: asyncio.TimerHandle | None = None
        self.nap = LoopNap()  # under load one event-loop wake-up reads many cameras' messages (server/stream.py)

    async def start(self) -> None:
        # subjects are ours (SUBJECT and our inbox + a number), never a camera's: no per-publish subject check
        self.nc = await nats.connect(servers=self.nats_urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                     skip_subject_validation=True)
        self.js = self.nc.jetstream(timeout=10.0)
        self.pg = PgStore(self.pg_dsn)
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(self._inbox + ".*", cb=self._on_puback)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()
        self._auth_pool.shutdown(wait=False, cancel_futures=True)
        if self.pg is not None:
            self.pg.close()

    def _token_hash(self, camera_id: str) -> str | None:
        cached = self._auth.get(camera_id)
        if cached and time.monotonic() - cached[1] < AUTH_CACHE_S:
            return cached[0]
        try:
            stored = self.pg.token_hash(camera_id)
        except psycopg.Error:
            # PostgreSQL restarted under us: one fresh connection, else the caller answers BUSY
            self.pg.close()
            self.pg = PgStore(self.pg_dsn)
            stored = self.pg.token_hash(camera_id)
        if stored is not None:
            self._auth[camera_id] = (stored, time.monotonic())
        return stored

    # connections ---------------------------------------------------------------------------------------------------
    def protocol(self) -> asyncio.Protocol:
        """A new connection: picows behind the first-message guard (a HELLO is at most MAX_HELLO_BYTES)."""
        ws = WSProtocol(None, None, False, lambda request: self._new_camera(guard), _picows_log, True,
                        HANDSHAKE_TIMEOUT_S, False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE, True,
                        MAX_MESSAGE_BYTES, None, 2048)
        guard = _GatewayGuard(ws, None, MAX_HELLO_BYTES, self.state)
        return guard

    def _new_camera(self, guard) -> "_Camera":
        camera = _Camera(self, guard)
        guard.listener = camera
        return camera

    # JetStream, pipelined -------------------------------------------------------------------------------------------
    def publish(self, camera: "_Camera", raw: bytes, msg_id: str) -> None:
        """Queue one message for JetStream; ``camera.stored()`` or ``camera.failed()`` follows on the loop."""
        self._n += 1
        n = self._n
        self._waiting[n] = camera
        self._out.append((camera, n, raw, {**camera.headers, "Nats-Msg-Id": msg_id}))
        if self._flush_task is None:  # the first of a group: publish the group PUBLISH_LINGER_S from now
            self._flush_task = asyncio.get_running_loop().call_later(PUBLISH_LINGER_S, self._start_publish)

    def _start_publish(self) -> None:
        self._flush_task = None
        asyncio.get_running_loop().create_task(self._publish_out())

    async def _publish_out(self) -> None:
        """Publish everything queued since the group's first message, one flush, one timeout for the group."""
        out, self._out = self._out, []
        nc, inbox, group = self.nc, self._inbox, []
        for camera, n, raw, headers in out:
            try:
                await nc.publish(SUBJECT, raw, reply=f"{inbox}.{n}", headers=headers)
                group.append(n)
            except Exception as exc:  # noqa: BLE001 (closed, draining, buffer full...: that camera gets BUSY)
                self._fail(n, f"publish failed: {exc!r}")
        if group:
            asyncio.get_running_loop().call_later(PUBLISH_TIMEOUT_S, self._expire, group)

    async def _on_puback(self, msg) -> None:
        try:
            n = int(msg.subject.rpartition(".")[2])
        except ValueError:
            return
        camera = self._waiting.pop(n, None)
        if camera is None:  # timed out meanwhile (that camera got BUSY and re-sends: deduplicated)
            return
        data = msg.data
        # {"stream":"TCINGEST","seq":N[,"duplicate":true]} when stored; {"error":...} or a 503 status (no
        # responders: the stream has no leader) when not
        if data[:10] == b'{"stream":' and b'"error"' not in data and not (msg.headers or {}).get("Status"):
            camera.stored()
        else:
            camera.failed(f"JetStream did not store the message: {data[:200]!r} {msg.headers or ''}")

    def _fail(self, n: int, reason: str) -> None:
        camera = self._waiting.pop(n, None)
        if camera is not None:
            camera.failed(reason)

    def _expire(self, group: list[int]) -> None:
        for n in group:
            self._fail(n, f"no PubAck within {PUBLISH_TIMEOUT_S:g} s")


class _GatewayGuard(_FirstMessageGuard):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server_state.connections.add(self)
        self.ws.connection_made(transport)


class _Camera(WSListener):
    """One camera connection: HELLO (checked against PostgreSQL in a thread), then BATCHes, one in flight."""

    def __init__(self, gw: Gateway, guard):
        super().__init__()
        self.gw, self.guard = gw, guard
        self.loop = asyncio.get_running_loop()
        self.t = None
        self.hello: wire.Hello | None = None
        self.ready = False
        self.headers: dict[str, str] = {}
        self.inflight: wire.Batch | None = None
        self.backlog: collections.deque = collections.deque()
        self.paused = False
        self.closing = self.gone = False
        self.timer = None
        self.peer = "?"
        self.nap = gw.nap

    def on_ws_connected(self, transport) -> None:
        self.t = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.timer = self.loop.call_later(HANDSHAKE_TIMEOUT_S, self._hello_deadline)

    def on_ws_disconnected(self, transport) -> None:
        self.gone = self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        self.gw.state.connections.discard(self.guard)

    def shutdown(self) -> None:
        self._close(WSCloseCode.GOING_AWAY)

    def on_ws_frame(self, transport, frame) -> None:
        mt = frame.msg_type
        if mt == WSMsgType.CLOSE:
            self.closing = True
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if mt == WSMsgType.PING or mt == WSMsgType.PONG or self.closing:
            return
        if mt != WSMsgType.BINARY or not frame.fin:  # cameras send whole binary messages
            self._refuse(wire.Code.BAD_MESSAGE, "expected a binary message in one frame")
            return
        raw = frame.get_payload_as_bytes()
        nap = self.nap
        nap.count += 1
        if not nap.armed:
            nap.arm()
        if self.hello is None:
            self._on_hello(raw)
        elif not self.ready or self.inflight is not None:
            self.backlog.append(raw)
            if len(self.backlog) >= MAX_QUEUED and not self.paused:
                self.paused = True
                transport.underlying_transport.pause_reading()
        else:
            self._on_batch(raw)

    def _on_hello(self, raw: bytes) -> None:
        try:
            hello = wire.expect(raw, wire.Hello)
        except wire.WireError as exc:
            self._refuse(wire.Code.BAD_MESSAGE, str(exc))
            return
        self.hello = hello
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.run_in_executor(self.gw._auth_pool, self.gw._token_hash, hello.camera_id).add_done_callback(
            self._authenticated)

    def _authenticated(self, future) -> None:
        if self.closing:
            return
        hello = self.hello
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, (psycopg.Error, PgStoreError)):
                log.error("authentication of camera %s failed: %r", hello.camera_id, exc)
            log.warning("busy camera=%s reason=camera-store-unavailable error=%s", hello.camera_id, exc)
            self._refuse(wire.Code.BUSY, "camera store unavailable, retry later")
            return
        stored = future.result()
        if stored is None or not verify_token(hello.token, stored):
            log.warning("refused camera=%s reason=unauthorized address=%s", hello.camera_id, self.peer)
            self._refuse(wire.Code.UNAUTHORIZED, "unknown camera or wrong token")
            return
        if hello.model_tag not in self.gw.model_tags:
            log.warning("refused camera=%s reason=unknown-model model=%s", hello.camera_id, hello.model_tag.hex())
            self._refuse(wire.Code.UNKNOWN_MODEL, f"model {hello.model_tag.hex()} is not served here")
            return
        self.headers = {"camera": hello.camera_id, "model": hello.model_tag.hex()}
        self.ready = True
        self.t.send(WSMsgType.BINARY, wire.Welcome(hello.version).encode())  # v2 cameras get v2; no temporal here
        self._next()

    def _on_batch(self, raw: bytes) -> None:
        batch = decode_batch(raw)
        if batch is None:
            try:
                batch = wire.expect(raw, wire.Batch)
            except wire.WireError as exc:
                self._refuse(wire.Code.BAD_MESSAGE, str(exc))
                return
            if isinstance(batch, wire.TemporalBatch):  # never granted here (WELCOME offers no temporal coding)
                self._refuse(wire.Code.BAD_MESSAGE, "temporal batches are not served by the cluster gateway; "
                                                    "send plain BATCH messages (runtime capture without --temporal)")
                return
        first_seq, count = batch.frames[0].seq, len(batch.frames)
        digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
        self.inflight = batch
        self.gw.publish(self, raw, f"{self.hello.camera_id}/{batch.epoch}/{first_seq}/{count}/{digest}")

    def stored(self) -> None:
        batch, self.inflight = self.inflight, None
        if self.gone or batch is None:
            return
        self.t.send(WSMsgType.BINARY, wire.Ack(batch.epoch, batch.frames[0].seq, len(batch.frames)).encode())
        self._next()

    def failed(self, reason: str) -> None:
        self.inflight = None
        if self.gone:
            return
        # Not stored on a quorum: tell the camera to keep the frames and come back later.
        log.warning("busy camera=%s reason=jetstream-unavailable error=%s", self.hello.camera_id, reason)
        self._refuse(wire.Code.BUSY, "ingest log unavailable, retry later")

    def _next(self) -> None:
        if self.backlog and not self.closing:
            raw = self.backlog.popleft()
            if self.paused and len(self.backlog) < MAX_QUEUED:
                self.paused = False
                self.t.underlying_transport.resume_reading()
            self._on_batch(raw)

    def _hello_deadline(self) -> None:
        self.timer = None
        if self.hello is None and not self.closing:
            self._refuse(wire.Code.BAD_MESSAGE, f"no HELLO within {HANDSHAKE_TIMEOUT_S:g} s")

    def _refuse(self, code: int, reason: str) -> None:
        if self.gone or self.t is None:
            return
        self.t.send(WSMsgType.BINARY, wire.Error(code, reason).encode())
        self._close(WSCloseCode.OK)

    def _close(self, code) -> None:
        self.closing = True
        if not self.gone and self.t is not None:
            self.t.send_close(code)
            self.t.disconnect()


async def run_gateway(nats_urls: list[str], pg_dsn: str, model_tags: set[bytes], host: str, port: int,
                      port_file: str | None = None, stop: asyncio.Event | None = None) -> None:
    gw = Gateway(nats_urls, pg_dsn, model_tags)
    await gw.start()
    await ensure_stream(gw.js)
    if _picows_log.level == logging.NOTSET:
        _picows_log.setLevel(logging.WARNING)  # picows logs every connection at INFO
    server = await asyncio.get_running_loop().create_server(gw.protocol, host, port, reuse_address=True)
    try:
        bound = server.sockets[0].getsockname()[1]
        if port_file:
            from pathlib import Path

            tmp = Path(port_file + ".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        log.info("gateway listening on %s:%d", host, bound)
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        for conn in list(gw.state.connections):
            conn.shutdown()
        await asyncio.sleep(0.1)
    await gw.close()
