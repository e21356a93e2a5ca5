"""The FastAPI app: WebSocket and HTTP ingest around server.ingest, plus query, health and metrics endpoints.

Security model (issue 11): cameras authenticate with their token in the HELLO; everything else that reads or
administers needs an operator API key (auth.require_operator). Before a camera has authenticated it may send one
small message (stream._FirstMessageGuard; limits.GuardedWebSocketProtocol on the ASGI route), must do so within a
deadline, and only a few such connections per address and in total are admitted (limits.ConnectionGate); over HTTP
the HELLO at the start of the body is checked before the rest is read.

/v1/stream is normally served by server/stream.py (picows, same port, routed by request line before the ASGI app
sees the connection); the WebSocket route below serves it when picows is missing or when the upgrade comes on an
HTTP keep-alive connection.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.websockets import WebSocketDisconnect

from taskcodec.server.auth import RateLimitedLog, require_operator
from taskcodec.server import dashboard, events, query, registry
from taskcodec.server.config import ServerConfig
from taskcodec.server.heads import attach_heads
from taskcodec.server.ingest import IngestService, Session, connection, kv
from taskcodec.server.limits import ConnectionGate, raise_max_size
from taskcodec.server.storage import SQLiteStorage
from taskcodec import __version__, wire
from taskcodec.bundle import Bundle, load_bundle

log = logging.getLogger("taskcodec.server.app")
# WebSocket close codes (RFC 6455): 1008 policy violation (auth, model), 1003 unacceptable data, 1011 server error.
_CLOSE = {wire.Code.UNAUTHORIZED: 1008, wire.Code.UNKNOWN_MODEL: 1008, wire.Code.BAD_MESSAGE: 1003,
          wire.Code.BUSY: 1011}


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:500].replace("\r", " ").replace("\n", " ")


_frozen = False


def _freeze_once() -> None:
    """Everything loaded at startup (the model, the ONNX session, FastAPI's routes: ~10^5 objects) lives as long as
    the server: moved out of the cyclic GC's way, so that a full collection (~60 ms) does not walk it again. Once
    per process (tests build many apps in one)."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def create_app(bundle: Bundle | str | Path | None, db_path: str | Path | None = None, *, microbatch: bool | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    """Build the server for one bundle (its model id is the only one accepted) and one SQLite file. ``config``
    supplies everything else (limits, storage policy); ``db_path``/``microbatch`` given here win over it."""
    config = config or ServerConfig()
    if db_path is not None or microbatch is not None:
        config = config.model_copy(update={k: v for k, v in (("db", Path(db_path) if db_path else None),
                                                             ("microbatch", microbatch)) if v is not None})
    limits, store_cfg = config.limits, config.storage
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    storage = SQLiteStorage(config.db, check=store_cfg.integrity_check_at_start,
                            journal_size_limit=store_cfg.journal_size_limit_bytes,
                            wal_autocheckpoint=store_cfg.wal_autocheckpoint_pages, auto_compact=store_cfg.compact,
                            compact_interval_s=store_cfg.compact_interval_s,
                            compact_settle_s=store_cfg.compact_settle_s)
    service = IngestService(bundle, storage, microbatch=config.microbatch, storage_config=store_cfg,
                            linger_s=config.microbatch_linger_ms / 1000.0,
                            linger_frames=config.microbatch_linger_frames)
    attach_heads(service, config.db)  # heads trained on stored latents label new frames (server/heads.py)
    if store_cfg.integrity_check_at_start:
        service.state.integrity_result([])  # the open above ran quick_check and refuses a damaged file
    metrics = service.metrics
    gate = ConnectionGate(limits.max_pending_per_address, limits.max_pending)
    metrics.pending_connections.set_function(gate.pending)
    refusals = RateLimitedLog(log)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        _freeze_once()
        yield
        await service.aclose()
        try:  # leave an empty WAL behind (other connections may still be open, so close() alone may not)
            storage.checkpoint("TRUNCATE")
        except Exception as exc:  # noqa: BLE001 (shutting down: report, do not fail)
            log.warning("final checkpoint failed: %s", exc)
        storage.close()

    # No /docs or /redoc (their pages cannot send an API key); /openapi.json needs a read key, like every query.
    app = FastAPI(title="taskcodec ingest server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.storage = storage  # require_operator() looks keys up here
    app.state.metrics = metrics
    app.state.config = config
    app.state.gate = gate
    read = [Depends(require_operator("read"))]
    try:  # the camera stream on picows (server/stream.py); without it the ASGI route below serves /v1/stream
        from taskcodec.server.stream import StreamFront

        app.state.stream_front = StreamFront(service, config, gate, refusals)
    except ImportError as exc:
        log.warning("picows not installed (%s): /v1/stream runs on the slower ASGI path", exc)
        app.state.stream_front = None

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        peer = ws.client.host if ws.client else "?"
        refused = gate.admit(peer)
        if refused is not None:  # before the upgrade: HTTP 403, nothing read
            metrics.pending_refused.labels(refused).inc()
            refusals.warning(f"{refused}:{peer}", f"refused a WebSocket connection from {peer}: limit {refused} "
                             f"({limits.max_pending_per_address} per address, {limits.max_pending} in total "
                             f"unauthenticated)")
            await ws.close(1013)
            return
        pending = True

        def authenticated() -> None:
            nonlocal pending
            gate.release(peer)
            pending = False

        await ws.accept()
        metrics.connections.inc()
        who, closed_by = {"peer": peer}, "server"
        connection.set(who)
        try:
            await _serve_stream(ws, service, config, peer, authenticated)
        except WebSocketDisconnect as exc:  # the camera closed the connection
            closed_by = f"camera (close code {exc.code})"
        except OSError as exc:  # the camera went away (uvicorn's ClientDisconnected is an OSError)
            closed_by = f"connection lost ({type(exc).__name__})"
        finally:
            metrics.connections.dec()
            normal = closed_by in ("camera (close code 1000)", "camera (close code 1001)") and "refused" not in who
            line = "event=disconnect " + kv(camera=who.get("camera"), model=who.get("model"), peer=peer,
                                             closed_by=closed_by,
                                             reason=who.get("refused") or ("normal close" if normal else None))
            if pending:  # never authenticated: at most one line per address every 10 s (a flood must not flood logs)
                refusals.warning(f"disconnect:{peer}", line)
            else:
                log.log(logging.INFO if normal else logging.WARNING, line)
            if pending:
                gate.release(peer)

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        connection.set({"peer": peer})
        try:
            async with asyncio.timeout(limits.http_body_timeout_s):
                return await _ingest_http(request, service, config, peer)
        except TimeoutError:
            error = service.refuse(wire.Code.BAD_MESSAGE, f"body not received within {limits.http_body_timeout_s:g} s")
            return Response(error.encode(), 408, headers={"X-Reason": error.reason, "Connection": "close"},
                            media_type="application/octet-stream")

    @app.get("/openapi.json", dependencies=read, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/cameras", dependencies=read)
    def cameras() -> list[dict]:
        counts = storage.frame_counts()
        return [{"id": c.id, "created_ms": c.created, "frames": counts.get(c.id, 0)} for c in storage.list_cameras()]

    @app.get("/v1/cameras/{camera_id}/frames", dependencies=read)
    def frames(camera_id: str, since_seq: int | None = Query(None, ge=-1),
               since_ts: int | None = Query(None), epoch: int | None = Query(None, ge=0),
               limit: int = Query(100, ge=1, le=10000)) -> dict:
        if storage.get_camera(camera_id) is None and not storage.frames(camera_id, limit=1):
            raise HTTPException(404, f"unknown camera {camera_id!r}")
        rows = storage.frames(camera_id, since_seq=since_seq, since_ts=since_ts, epoch=epoch, limit=limit)
        return {"camera_id": camera_id, "model_id": service.model_id, "frames": [
            {"epoch": r.epoch, "seq": r.seq, "ts_capture_ms": r.ts_capture_ms, "ts_stored_ms": r.ts_stored_ms,
             "model_id": r.model_id, "prediction": r.prediction,
             "class_name": service.classifier.class_name(r.prediction), "confidence": r.confidence,
             "payload_bytes": r.payload_bytes} for r in rows]}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        # Open to anyone (load balancers): nothing here that helps an attacker (no version, pid or paths).
        # 503 while the database is unreachable, full, or failed its (periodic, cached) integrity check.
        body = service.health()
        return JSONResponse(body, 200 if body["status"] == "ok" else 503)

    @app.get("/metrics", dependencies=[Depends(require_operator("metrics"))])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    registry.install(app)  # model registry + over-the-air rollout (issue 13): several models, assignments
    query.install(app)  # fleet operations (issue 13): query API, per-camera metrics
    dashboard.install(app)  # operator's dashboard at /dashboard/ (same operator keys)
    events.install(app)  # results out: MQTT / webhook events after each commit (TASKCODEC_EVENTS_*)
    return app


async def _ingest_http(request: Request, service: IngestService, config: ServerConfig, peer: str) -> Response:
    """HELLO first: read at most a HELLO's worth of the body, authenticate, and only then read the rest."""
    limits = config.limits
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_http_body_bytes:
        return _reply(service._http_error(service.refuse(
            wire.Code.BAD_MESSAGE, f"body larger than {limits.max_http_body_bytes} bytes")), 413)
    body = bytearray()
    session: Session | None = None
    hello = None
    async for chunk in request.stream():
        body += chunk
        if session is None and len(body) >= wire.MAX_HELLO_BYTES:
            hello, session, used, error = _http_hello(service, bytes(body), peer)
            if error is not None:
                return _reply(error)
            body = body[used:]
        if len(body) > limits.max_http_body_bytes:
            return _reply(service._http_error(service.refuse(
                wire.Code.BAD_MESSAGE, f"body larger than {limits.max_http_body_bytes} bytes")), 413)
    if session is None:
        hello, session, used, error = _http_hello(service, bytes(body), peer)
        if error is not None:
            return _reply(error)
        body = body[used:]
    return _reply(await service.ingest_http(bytes(body), peer, hello, session))


def _http_hello(service: IngestService, head: bytes, peer: str):
    """(hello, session, bytes the HELLO took, None) or (.., the HttpReply refusing the request)."""
    try:
        hello, rest = wire.split_ingest_body(head)
    except wire.WireError as exc:
        return None, None, 0, service._http_error(service.refuse(wire.Code.BAD_MESSAGE,
                                                                 f"malformed ingest body: {exc}"))
    session, error = service.open_session(hello, peer)
    return hello, session, len(head) - len(rest), None if error is None else service._http_error(error)


def _reply(reply, status: int | None = None) -> Response:
    headers = {"X-Reason": _header_safe(reply.reason)}
    if reply.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(reply.retry_after_s)))
    if (status or reply.status) in (401, 413):
        headers["Connection"] = "close"  # the unread rest of the body is not worth draining
    return Response(reply.body, status or reply.status, headers=headers, media_type="application/octet-stream")


class _Idle(Exception):
    """No message within the idle check interval (not an error)."""


async def _receive_bytes(ws: WebSocket, timeout: float | None = None) -> bytes | None:
    """The next binary message; None for a text message; raises WebSocketDisconnect when the peer has gone."""
    # asyncio.timeout, not wait_for: wait_for wraps every receive in a new Task (measurable per message)
    if timeout is None:
        message = await ws.receive()
    else:
        async with asyncio.timeout(timeout):
            message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("bytes")


async def _refuse(ws: WebSocket, error: wire.Error) -> None:
    await ws.send_bytes(error.encode())
    await ws.close(_CLOSE.get(error.code, 1008), reason=_header_safe(error.reason)[:120])


async def _expect(ws: WebSocket, service: IngestService, kind: type, timeout: float | None = None,
                  idle_ok: bool = False):
    """The next message if it is a binary ``kind``; otherwise refuse the connection with a reason and return None.
    On ``timeout``: raise _Idle if ``idle_ok``, else refuse."""
    name = kind.__name__.upper()
    try:
        data = await _receive_bytes(ws, timeout)
    except asyncio.TimeoutError:
        if idle_ok:
            raise _Idle from None
        await _refuse(ws, service.refuse(wire.Code.BAD_MESSAGE, f"no {name} within {timeout:g} s"))
        return None
    service.metrics.bytes_received.inc(len(data or b""))
    try:
        return wire.expect(data, kind)
    except wire.WireError as exc:
        await _refuse(ws, service.refuse(wire.Code.BAD_MESSAGE, str(exc)))
        return None


async def _serve_stream(ws: WebSocket, service: IngestService, config: ServerConfig, peer: str,
                        authenticated) -> None:
    limits = config.limits
    hello = await _expect(ws, service, wire.Hello, limits.handshake_timeout_s)
    if hello is None:
        return
    session, error = service.open_session(hello, peer)
    if error is not None:
        await _refuse(ws, error)
        return
    authenticated()
    raise_max_size(ws.scope, limits.max_message_bytes)
    await ws.send_bytes(wire.Welcome(hello.version, service.temporal.capabilities(session.temporal)).encode())
    while True:
        try:
            batch = await _expect(ws, service, wire.Batch, limits.revocation_check_s, idle_ok=True)
        except _Idle:
            if not await asyncio.to_thread(service.session_valid, session):
                await _refuse(ws, service.revoked(session))
                return
            continue
        if batch is None:
            return
        replies = await service.submit(session, batch)
        for reply in replies:
            await ws.send_bytes(reply.encode())
        errors = [r for r in replies if isinstance(r, wire.Error)]
        if errors:
            await ws.close(_CLOSE.get(errors[0].code, 1011), reason=_header_safe(errors[0].reason)[:120])
            return
