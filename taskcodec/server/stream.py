"""The camera stream (WebSocket /v1/stream) served by picows on the same port as the FastAPI app.

Per message, uvicorn's ASGI WebSocket path (sans-I/O framing, an ASGI receive queue, a Starlette send, a future per
submit) cost 110-170 µs of event-loop CPU (bench/results/serve_load_profile.md). Here a camera's connection is a
picows protocol (WebSocket framing in C) whose frame callback decodes the BATCH and hands it to the micro-batch
queue with a callback (IngestService.submit_nowait): no task, future or timeout per message.

How one port serves both: ``FrontProtocol`` is uvicorn's HTTP protocol class. It reads the request line of a new
connection; ``GET /v1/stream`` goes to picows (``StreamFront.take``), anything else to uvicorn's h11 protocol
(limits.GuardedH11Protocol) with the bytes already read. A WebSocket upgrade on an HTTP keep-alive connection still
reaches the ASGI route in app.py (same behaviour, slower path).

The limits of issue 11 hold here too: the request line within ``http_header_timeout_s`` (then picows' handshake
timeout for the headers), every open connection counts against ``max_connections``, the ConnectionGate refuses
unauthenticated connections per address and in total with HTTP 403 before the upgrade, the first message is at
most ``max_hello_bytes`` — checked from its frame header by ``_FirstMessageGuard`` before picows buffers it (close
1009, nothing read) — and must arrive within ``handshake_timeout_s``; idle sessions re-check their token every
``revocation_check_s``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from http import HTTPStatus

from picows import (WSAutoPingStrategy, WSCloseCode, WSListener, WSMsgType, WSUpgradeResponse,
                    WSUpgradeResponseWithListener)
from picows.picows import WSProtocol

from taskcodec import wire
from taskcodec.server.auth import RateLimitedLog
from taskcodec.server.ingest import connection, kv
from taskcodec.server.limits import GuardedH11Protocol, _limits

log = logging.getLogger("taskcodec.server.stream")
_picows_log = logging.getLogger("taskcodec.server.stream.ws")  # picows' own per-connection lines (INFO): quiet
_over_limit = RateLimitedLog(log)
STREAM_PATH = b"/v1/stream"
# WebSocket close codes (RFC 6455): 1008 policy violation (auth, model), 1003 unacceptable data, 1011 server error.
CLOSE = {wire.Code.UNAUTHORIZED: 1008, wire.Code.UNKNOWN_MODEL: 1008, wire.Code.BAD_MESSAGE: 1003,
         wire.Code.BUSY: 1011}
MAX_REQUEST_LINE = 8192
_ECHO_CODES = frozenset(int(c) for c in WSCloseCode if 1000 <= int(c) <= 1014 and int(c) not in (1005, 1006))
MAX_QUEUED = 4  # messages of one connection waiting before its reading is paused (a camera has one in flight)
# Under load the event loop naps NAP_S once per iteration (LoopNap): at 1000 messages/s one wake-up reads about 8
# of them instead of one (bench/results/serve_load_cpu_r6.md); below NAP_MIN_RATE messages/s it never naps.
NAP_S = 0.008
NAP_MIN_RATE = 300.0


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:120].replace("\r", " ").replace("\n", " ")


def is_stream_request(head: bytes) -> bool:
    if not head.startswith(b"GET " + STREAM_PATH):
        return False
    rest = head[len(b"GET ") + len(STREAM_PATH):]
    return rest[:1] in (b" ", b"?")


_U64 = (1 << 64) - 1
_BINARY = WSMsgType.BINARY
_Ack = wire.Ack


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    value, shift = b & 0x7F, 7
    pos += 1
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_batch(data: bytes, cache: list | None = None) -> wire.Batch | None:
    """A plain BATCH (the message a camera sends once a second), parsed without wire.Reader's per-byte method calls:
    the same Batch as ``wire.decode(data)``, or None for anything else or anything unusual (the caller then asks
    wire.decode, which also says what is wrong). ``cache``: a connection's [type byte + epoch varint, epoch] of its
    previous BATCH (a camera's epoch stays the same for its connection: its 9-byte varint is then not parsed again),
    updated here."""
    if data[:1] != b"\x02":
        return None
    try:
        if cache is not None and cache[0] is not None and data.startswith(cache[0]):
            epoch, pos = cache[1], len(cache[0])
        else:
            epoch, pos = _varint(data, 1)
            if cache is not None and epoch <= wire.MAX_EPOCH:
                cache[0], cache[1] = data[:pos], epoch
        first, pos = _varint(data, pos)
        count, pos = _varint(data, pos)
        if (epoch > wire.MAX_EPOCH or first > wire.MAX_SEQ or not 0 < count <= wire.MAX_FRAMES_PER_BATCH
                or first + count - 1 > wire.MAX_SEQ):
            return None
        z, pos = _varint(data, pos)
        ts = z >> 1 if not z & 1 else -((z + 1) >> 1)
        if z > _U64 or abs(ts) > wire.MAX_ABS_TS_MS:
            return None
        frames = []
        frame = wire.Frame
        for i in range(count):
            z, pos = _varint(data, pos)
            if z > _U64:
                return None
            ts += z >> 1 if not z & 1 else -((z + 1) >> 1)  # |delta| <= 2^63 < 2 * MAX_ABS_TS_MS: checked below
            if abs(ts) > wire.MAX_ABS_TS_MS:
                return None
            n, pos = _varint(data, pos)
            end = pos + n
            if n > wire.MAX_FRAME_BYTES or end > len(data):
                return None
            frames.append(frame(first + i, ts, data[pos:end]))
            pos = end
        if pos != len(data):
            return None
    except (IndexError, ValueError):
        return None
    return wire.Batch(epoch, frames)


def find_front(config) -> "StreamFront | None":
    """The StreamFront of the app uvicorn serves (create_app puts it on app.state), looked up once per config."""
    front = getattr(config, "_taskcodec_stream_front", False)
    if front is False:
        front, app = None, getattr(config, "loaded_app", None)
        for _ in range(16):  # through uvicorn's middleware wrappers (.app) to the FastAPI app
            if app is None:
                break
            state = getattr(app, "state", None)
            if state is not None and getattr(state, "stream_front", None) is not None:
                front = state.stream_front
                break
            app = getattr(app, "app", None)
        config._taskcodec_stream_front = front
    return front


class FrontProtocol(asyncio.Protocol):
    """uvicorn's HTTP protocol class: routes a connection by its request line (module docstring)."""

    def __init__(self, config, server_state, app_state, _loop=None):
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport = None
        self.buffer = bytearray()
        self.timer = None
        self.routed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        limits = _limits(self.config)
        if len(self.server_state.connections) >= limits.max_connections:  # every open connection counts
            _over_limit.warning("max_connections",
                                f"refusing connections: {limits.max_connections} open (limits.max_connections)")
            self.routed = True
            transport.close()
            return
        self.server_state.connections.add(self)
        self.timer = self.loop.call_later(limits.http_header_timeout_s, self._deadline)

    def _deadline(self) -> None:
        self.timer = None
        if not self.routed and not self.transport.is_closing():
            log.info("closing %s: no request line within %.0f s", self._peer(),
                     _limits(self.config).http_header_timeout_s)
            self.transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        if self.routed:
            return
        self.buffer += data
        if b"\r\n" not in self.buffer and len(self.buffer) < MAX_REQUEST_LINE:
            return
        self.routed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server_state.connections.discard(self)
        head, self.buffer = bytes(self.buffer), None
        front = find_front(self.config)
        if front is not None and is_stream_request(head):
            front.take(self.transport, head, self.server_state)
            return
        h11 = GuardedH11Protocol(self.config, self.server_state, self.app_state, self.loop)
        self.transport.set_protocol(h11)
        h11.connection_made(self.transport)
        if not self.transport.is_closing():
            h11.data_received(head)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server_state.connections.discard(self)

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        if self.transport is not None and not self.routed:
            self.transport.close()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class _FirstMessageGuard(asyncio.Protocol):
    """Sits between the transport and picows until the first message has been checked: parses the upgrade head's
    end and the WebSocket frame headers of the first message, and refuses it (close 1009) from a header that makes
    it larger than ``limit``, before picows buffers any of it. Then it steps aside (the transport talks to picows
    directly). Also the connection's entry in uvicorn's connection set (``shutdown``)."""

    def __init__(self, ws: WSProtocol, transport, limit: int, server_state):
        self.ws, self.transport, self.limit, self.server_state = ws, transport, limit, server_state
        self.seen = bytearray()
        self.fed = 0          # bytes of ``seen`` forwarded to picows
        self.pos = -1         # next frame header in ``seen`` (-1: the HTTP head has not ended yet)
        self.message = 0      # data bytes of the first message so far
        self.checked = False  # the first message is complete and within the limit
        self.listener = None  # the _Connection, once picows made it
        self.done = False

    # the connection's entry in server_state.connections
    def shutdown(self) -> None:
        if self.listener is not None:
            self.listener.shutdown()
        else:
            self.transport.close()

    def data_received(self, data) -> None:
        if self.done:
            return
        if self.checked:
            self._feed(data)
            return
        seen = self.seen
        seen += data
        if self.pos < 0:
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self._forward(len(seen))  # picows bounds the head (16 KiB) and answers a bad one
                return
            self.pos = end + 4
        safe = len(seen)
        while self.pos < len(seen):
            pos = self.pos
            if pos + 2 > len(seen):
                safe = pos
                break
            b0, b1 = seen[pos], seen[pos + 1]
            size, hdr = b1 & 0x7F, 2
            if size == 126:
                hdr = 4
            elif size == 127:
                hdr = 10
            hdr += 4 if b1 & 0x80 else 0
            if pos + hdr > len(seen):
                safe = pos
                break
            if size == 126:
                size = int.from_bytes(seen[pos + 2:pos + 4], "big")
            elif size == 127:
                size = int.from_bytes(seen[pos + 2:pos + 10], "big")
            opcode = b0 & 0x0F
            if opcode < 8:  # data frame (control frames are at most 125 bytes: picows checks)
                self.message += size
                if self.message > self.limit:
                    self._forward(pos)
                    self._too_big()
                    return
                if b0 & 0x80:  # FIN: the first message is complete
                    self.checked = True
                    break
            self.pos = pos + hdr + size
        if self.checked:
            safe = len(seen)
        self._forward(safe)
        if self.checked and not self.done:
            self.seen = None
            if not self.transport.is_closing():
                self.transport.set_protocol(self.ws)  # from now on the transport talks to picows directly

    def _forward(self, upto: int) -> None:
        if upto > self.fed:
            chunk = bytes(self.seen[self.fed:upto])
            self.fed = upto
            self._feed(chunk)

    def _feed(self, data) -> None:
        ws, view = self.ws, memoryview(data)
        while view:
            buf = ws.get_buffer(-1)
            n = min(len(buf), len(view))
            if n == 0:
                break
            buf[:n] = view[:n]
            ws.buffer_updated(n)
            view = view[n:]

    def _too_big(self) -> None:
        self.done = True
        transport = self.ws.transport
        if not self.transport.is_closing() and transport is not None:
            transport.send_close(WSCloseCode.MESSAGE_TOO_BIG, f"first message larger than {self.limit} bytes")
        self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.done = True
        self.server_state.connections.discard(self)
        self.ws.connection_lost(exc)
        listener = self.listener
        if listener is not None and not listener.gone:  # admitted, but the upgrade failed (picows said 400)
            listener.on_ws_disconnected(None)

    def pause_writing(self) -> None:
        self.ws.pause_writing()

    def resume_writing(self) -> None:
        self.ws.resume_writing()


class LoopNap:
    """Once per event-loop iteration that read cameras' messages, and only while they arrive at ``min_rate`` per
    second or more: sleep ``nap_s`` there (the GIL released). The sockets that become ready meanwhile are then read by
    one epoll_wait, instead of the loop going to sleep and being woken for every message (a context switch, an
    epoll_wait and the wake-up path per message: at 1000 one-fps cameras ~0.8 context switches of the loop thread per
    message before, ~0.1 with an 8 ms nap). Adds at most ``nap_s`` to a reply under load; a lone camera never waits.
    The embedded server's stream front end and the cluster gateway each have one. Per message the caller does
    ``nap.count += 1`` and, ``if not nap.armed``, ``nap.arm()`` (inline: a method call per message costs more)."""

    __slots__ = ("nap_s", "min_rate", "armed", "napping", "count", "window")

    def __init__(self, nap_s: float = NAP_S, min_rate: float = NAP_MIN_RATE):
        self.nap_s, self.min_rate = nap_s, min_rate
        self.armed = False    # a _nap is scheduled for this loop iteration
        self.napping = False  # the message rate is high enough to nap
        self.count = 0        # messages since ``window`` began
        self.window = 0.0

    def arm(self) -> None:
        self.armed = True
        asyncio.get_running_loop().call_soon(self._nap)

    def _nap(self) -> None:
        self.armed = False
        now = time.monotonic()
        dt = now - self.window
        if dt >= 0.1:
            self.napping = self.count >= self.min_rate * dt
            self.count, self.window = 0, now
        if self.napping and self.nap_s > 0:
            time.sleep(self.nap_s)


class StreamFront:
    """What every stream connection shares: the ingest service, limits, the gate, metrics and logs (create_app)."""

    def __init__(self, service, config, gate, refusals: RateLimitedLog):
        self.service, self.config, self.gate, self.refusals = service, config, gate, refusals
        self.limits = config.limits
        self.metrics = service.metrics
        ping = config.ws_ping_interval or None
        self.ping = ping
        if _picows_log.level == logging.NOTSET:
            _picows_log.setLevel(logging.WARNING)
        self.sessions: set[_Connection] = set()  # authenticated connections (the idle sweep)
        self._sweeper = None
        self._checking = False
        self.nap = LoopNap()

    def authenticated(self, conn: "_Connection") -> None:
        self.sessions.add(conn)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.limits.revocation_check_s / 2, self._sweep)

    def _sweep(self) -> None:
        """Every revocation_check_s / 2: the sessions idle for revocation_check_s re-check their camera's token, all
        in one call on a worker thread (one timer for all connections, not one per connection)."""
        loop = asyncio.get_running_loop()
        interval = self.limits.revocation_check_s
        self._sweeper = loop.call_later(interval / 2, self._sweep) if self.sessions else None
        if self._checking:
            return
        now = loop.time()
        idle = [c for c in self.sessions if not c.inflight and not c.closing and now - c.last_seen >= interval]
        if not idle:
            return
        self._checking = True
        valid = self.service.session_valid

        def check() -> list[bool]:
            return [valid(c.session) for c in idle]

        def done(future) -> None:
            self._checking = False
            if future.exception() is not None:
                return
            now = loop.time()
            for conn, ok in zip(idle, future.result()):
                if conn.closing:
                    continue
                if ok:
                    conn.last_seen = now
                else:
                    conn._refuse(self.service.revoked(conn.session))

        loop.run_in_executor(None, check).add_done_callback(done)

    def take(self, transport, head: bytes, server_state) -> None:
        """A connection whose request line asked for /v1/stream: from now on picows (behind the first-message
        guard) reads it; ``head`` is what FrontProtocol has read so far."""
        limits = self.limits
        guard: _FirstMessageGuard | None = None

        def listener_factory(request):
            return self._admit(request, transport, guard, server_state)

        ws = WSProtocol(None, None, False, listener_factory, _picows_log, True, limits.http_header_timeout_s,
                        self.ping is not None, self.ping or 20.0, self.ping or 20.0,
                        WSAutoPingStrategy.PING_WHEN_IDLE, True, limits.max_message_bytes, None, 2048)
        guard = _FirstMessageGuard(ws, transport, limits.max_hello_bytes, server_state)
        server_state.connections.add(guard)
        transport.set_protocol(guard)
        ws.connection_made(transport)
        guard.data_received(head)

    def _admit(self, request, transport, guard, server_state):
        peer_info = transport.get_extra_info("peername")
        peer = peer_info[0] if peer_info else "?"
        refused = self.gate.admit(peer)
        if refused is not None:  # before the upgrade: HTTP 403, nothing read
            self.metrics.pending_refused.labels(refused).inc()
            self.refusals.warning(f"{refused}:{peer}", f"refused a WebSocket connection from {peer}: limit {refused} "
                                  f"({self.limits.max_pending_per_address} per address, {self.limits.max_pending} "
                                  f"in total unauthenticated)")
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(HTTPStatus.FORBIDDEN, b"too many unauthenticated "
                                                        b"connections"), None)
        listener = _Connection(self, peer, guard, server_state)
        guard.listener = listener
        return listener


class _Connection(WSListener):
    """One camera's WebSocket connection: HELLO, then BATCHes answered in order, one in flight at a time."""

    def __init__(self, front: StreamFront, peer: str, guard: _FirstMessageGuard, server_state):
        super().__init__()
        self.front, self.peer, self.guard, self.server_state = front, peer, guard, server_state
        self.service = front.service
        self.loop = asyncio.get_running_loop()
        self.t = None
        self.session = None
        self.pending = True   # holds a ConnectionGate slot until authenticated
        self.who = {"peer": peer}
        self.closed_by = "server"
        self.closing = False
        self.gone = False
        self.inflight = False
        self.backlog: collections.deque = collections.deque()
        self.paused = False
        self.parts: list | None = None  # a fragmented message being reassembled: [type, size, chunks]
        self.timer = None
        self.last_seen = 0.0
        self.connected = False
        self.batch_cache = [None, 0]  # decode_batch's cache: this connection's epoch prefix
        self.ack_epoch = -1  # the epoch of ack_prefix: ACK type byte + epoch varint (encode_ack)
        self.ack_prefix = b""
        self.received = front.metrics.bytes_received  # a LocalCounter (event loop only)
        self.nap = front.nap
        self.submit = self.service.submit_nowait

    # picows callbacks --------------------------------------------------------------------------------------------
    def on_ws_connected(self, transport) -> None:
        self.t = transport
        self.connected = True
        self.front.metrics.connections.inc()
        self.timer = self.loop.call_later(self.front.limits.handshake_timeout_s, self._hello_deadline)

    def on_ws_frame(self, transport, frame) -> None:
        mt = frame.msg_type
        if mt == _BINARY and frame.fin and self.parts is None:
            data = frame.get_payload_as_bytes()
        elif mt == WSMsgType.CLOSE:
            self._peer_closed(frame)
            return
        elif mt == WSMsgType.PING or mt == WSMsgType.PONG:
            return
        else:
            data = self._fragment(frame)
            if data is False:
                return
        if self.closing:
            return
        nap = self.nap
        nap.count += 1
        if not nap.armed:
            nap.arm()
        self.received.value += len(data) if data is not None else 0
        if self.session is None:
            self._hello(data)
        elif self.inflight:
            self.backlog.append(data)
            if len(self.backlog) >= MAX_QUEUED and not self.paused:
                self.paused = True
                self.t.underlying_transport.pause_reading()
        else:
            self._batch(data)

    def on_ws_disconnected(self, transport) -> None:
        self.gone = True
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server_state.connections.discard(self.guard)
        self.front.sessions.discard(self)
        if self.connected:
            self.front.metrics.connections.dec()
        who = self.who
        normal = self.closed_by in ("camera (close code 1000)", "camera (close code 1001)") and "refused" not in who
        line = "event=disconnect " + kv(camera=who.get("camera"), model=who.get("model"), peer=self.peer,
                                         closed_by=self.closed_by,
                                         reason=who.get("refused") or ("normal close" if normal else None))
        if self.pending:  # never authenticated: at most one line per address every 10 s (a flood must not flood logs)
            self.front.refusals.warning(f"disconnect:{self.peer}", line)
            self.front.gate.release(self.peer)
            self.pending = False
        else:
            log.log(logging.INFO if normal else logging.WARNING, line)

    # messages ----------------------------------------------------------------------------------------------------
    def _fragment(self, frame):
        """Reassemble a fragmented message; its bytes when complete, None for a complete text message, False while
        more is to come (or after refusing it)."""
        mt = frame.msg_type
        if mt == WSMsgType.CONTINUATION:
            if self.parts is None:
                self._refuse(self.service.refuse(wire.Code.BAD_MESSAGE, "continuation frame without a message"))
                return False
        else:
            if self.parts is not None:
                self._refuse(self.service.refuse(wire.Code.BAD_MESSAGE, "new message inside a fragmented one"))
                return False
            self.parts = [mt, 0, []]
        parts = self.parts
        parts[1] += frame.payload_size
        limit = self.front.limits.max_message_bytes if self.session is not None else self.front.limits.max_hello_bytes
        if parts[1] > limit:
            self.parts = None
            self._close(1009, f"message larger than {limit} bytes")
            return False
        if parts[0] == WSMsgType.BINARY:
            parts[2].append(frame.get_payload_as_bytes())
        if not frame.fin:
            return False
        self.parts = None
        return b"".join(parts[2]) if parts[0] == WSMsgType.BINARY else None

    def _hello(self, data: bytes | None) -> None:
        token = connection.set(self.who)
        try:
            hello = self._expect(data, wire.Hello)
            if hello is None:
                return
            session, error = self.service.open_session(hello, self.peer)
            if error is not None:
                self._refuse(error)
                return
        finally:
            connection.reset(token)
        self.session = session
        self.front.gate.release(self.peer)
        self.pending = False
        self.t.send(WSMsgType.BINARY,
                    wire.Welcome(hello.version, self.service.temporal.capabilities(session.temporal)).encode())
        self.last_seen = self.loop.time()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.front.authenticated(self)

    def _expect(self, data: bytes | None, kind: type):
        """The message if it is a binary ``kind``; otherwise refuse the connection with a reason and return None."""
        try:
            return wire.expect(data, kind)
        except wire.WireError as exc:
            self._refuse(self.service.refuse(wire.Code.BAD_MESSAGE, str(exc)))
            return None

    def _batch(self, data: bytes | None) -> None:
        batch = decode_batch(data, self.batch_cache) if data is not None else None
        if batch is None:  # TBATCH, or something to refuse: wire.decode says what is wrong
            token = connection.set(self.who)
            try:
                batch = self._expect(data, wire.Batch)
            finally:
                connection.reset(token)
            if batch is None:
                return
        self.inflight = True
        self.submit(self.session, batch, self._replied)

    def _replied(self, replies: list) -> None:
        self.inflight = False
        self.last_seen = self.loop.time()
        if self.gone:
            return
        if len(replies) == 1 and type(replies[0]) is _Ack:  # the usual case: one ACK
            self.t.send(_BINARY, self.encode_ack(replies[0]))
        else:
            send = self.t.send
            for reply in replies:
                send(_BINARY, self.encode_ack(reply) if type(reply) is _Ack else reply.encode())
            for reply in replies:
                if type(reply) is wire.Error:
                    self._close(CLOSE.get(reply.code, 1011), reply.reason)
                    return
        if self.closing:  # shutting down: the in-flight batch has its answer
            self._close(1012, "server restarting")
            return
        if self.backlog:
            data = self.backlog.popleft()
            if self.paused and len(self.backlog) < MAX_QUEUED:
                self.paused = False
                self.t.underlying_transport.resume_reading()
            self._batch(data)

    def encode_ack(self, ack: wire.Ack) -> bytes:
        """``ack.encode()``, with this connection's ACK type byte + epoch varint kept from its previous ACK."""
        if ack.epoch != self.ack_epoch:
            prefix = bytearray(b"\x03")
            wire.put_varint(prefix, ack.epoch)
            self.ack_epoch, self.ack_prefix = ack.epoch, bytes(prefix)
        out = bytearray(self.ack_prefix)
        wire.put_varint(out, ack.first_seq)
        count = ack.count
        if count < 0x80:
            out.append(count)
        else:
            wire.put_varint(out, count)
        return bytes(out)

    # closing -----------------------------------------------------------------------------------------------------
    def _refuse(self, error: wire.Error) -> None:
        if self.gone or self.t is None:
            return
        self.t.send(WSMsgType.BINARY, error.encode())
        self._close(CLOSE.get(error.code, 1008), error.reason)

    def _close(self, code: int, reason: str) -> None:
        self.closing = True
        if self.gone:
            return
        self.t.send_close(WSCloseCode(code), _header_safe(reason))
        self.t.disconnect()

    def _peer_closed(self, frame) -> None:
        code = int(frame.get_close_code()) or 1005  # picows: 0 for a CLOSE without a code (RFC 6455: 1005)
        self.closed_by = f"camera (close code {code})"
        self.closing = True
        if not self.gone:
            self.t.send_close(WSCloseCode(code) if code in _ECHO_CODES else WSCloseCode.OK)  # echo it
            self.t.disconnect()

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        if self.inflight:
            self.closing = True  # closed once its answer is out (_replied)
        elif not self.closing:
            self._close(1012, "server restarting")

    # timers ------------------------------------------------------------------------------------------------------
    def _hello_deadline(self) -> None:
        self.timer = None
        if self.session is None and not self.closing:
            token = connection.set(self.who)
            try:
                self._refuse(self.service.refuse(wire.Code.BAD_MESSAGE, f"no HELLO within "
                                                                        f"{self.front.limits.handshake_timeout_s:g} s"))
            finally:
                connection.reset(token)
