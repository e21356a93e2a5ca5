"""The FastAPI app: WebSocket and HTTP ingest around server.ingest, plus query, health and metrics endpoints."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.websockets import WebSocketDisconnect

from taskcodec.server.auth import require_operator
from taskcodec.server import dashboard, events, query
from taskcodec.server.ingest import IngestService
from taskcodec.server.storage import SQLiteStorage
from taskcodec import __version__, wire
from taskcodec.bundle import Bundle, load_bundle

HELLO_TIMEOUT_S = 30.0
MAX_HTTP_BODY = 16 << 20
# WebSocket close codes (RFC 6455): 1008 policy violation (auth, model), 1003 unacceptable data, 1011 server error.
_CLOSE = {wire.Code.UNAUTHORIZED: 1008, wire.Code.UNKNOWN_MODEL: 1008, wire.Code.BAD_MESSAGE: 1003,
          wire.Code.BUSY: 1011}


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:500].replace("\r", " ").replace("\n", " ")


def create_app(bundle: Bundle | str | Path | None, db_path: str | Path, *, microbatch: bool = True) -> FastAPI:
    """Build the server for one bundle (its model id is the only one accepted) and one SQLite file."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    storage = SQLiteStorage(db_path)
    service = IngestService(bundle, storage, microbatch=microbatch)
    metrics = service.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.aclose()
        storage.close()

    # No /docs or /redoc (their pages cannot send an API key); /openapi.json needs a read key, like every query.
    app = FastAPI(title="taskcodec ingest server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.storage = storage  # require_operator() looks keys up here
    app.state.metrics = metrics
    read = [Depends(require_operator("read"))]

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        metrics.connections.inc()
        try:
            await _serve_stream(ws, service)
        except (WebSocketDisconnect, OSError):  # the camera went away (uvicorn's ClientDisconnected is an OSError)
            pass
        finally:
            metrics.connections.dec()

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_HTTP_BODY:
                error = service.refuse(wire.Code.BAD_MESSAGE, f"body larger than {MAX_HTTP_BODY} bytes")
                return Response(error.encode(), 413, headers={"X-Reason": error.reason},
                                media_type="application/octet-stream")
        reply = await service.ingest_http(bytes(body))
        return Response(reply.body, reply.status, headers={"X-Reason": _header_safe(reply.reason)},
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
               since_ts: int | None = Query(None, ge=0), epoch: int | None = Query(None, ge=0),
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
        db_ok = storage.ping()
        # Open to anyone (load balancers): nothing here that helps an attacker (no version, pid or paths).
        body = {"status": "ok" if db_ok else "degraded", "model_id": service.model_id, "db_ok": db_ok,
                "uptime_s": round(service.uptime_s(), 3)}
        return JSONResponse(body, 200 if db_ok else 503)

    @app.get("/metrics", dependencies=[Depends(require_operator("metrics"))])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    query.install(app)  # fleet operations (issue 13): query API, per-camera metrics
    dashboard.install(app)  # operator's dashboard at /dashboard/ (same operator keys)
    events.install(app)  # results out: MQTT / webhook events after each commit (TASKCODEC_EVENTS_*)
    return app


async def _receive_bytes(ws: WebSocket, timeout: float | None = None) -> bytes | None:
    """The next binary message; None for a text message; raises WebSocketDisconnect when the peer has gone."""
    message = await asyncio.wait_for(ws.receive(), timeout)
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("bytes")


async def _refuse(ws: WebSocket, error: wire.Error) -> None:
    await ws.send_bytes(error.encode())
    await ws.close(_CLOSE.get(error.code, 1008), reason=_header_safe(error.reason)[:120])


async def _expect(ws: WebSocket, service: IngestService, kind: type, timeout: float | None = None):
    """The next message if it is a binary ``kind``; otherwise refuse the connection with a reason and return None."""
    name = kind.__name__.upper()
    try:
        data = await _receive_bytes(ws, timeout)
    except asyncio.TimeoutError:
        await _refuse(ws, service.refuse(wire.Code.BAD_MESSAGE, f"no {name} within {timeout:.0f} s"))
        return None
    service.metrics.bytes_received.inc(len(data or b""))
    try:
        message = wire.decode(data) if data is not None else None
    except wire.WireError as exc:
        await _refuse(ws, service.refuse(wire.Code.BAD_MESSAGE, f"malformed {name}: {exc}"))
        return None
    if not isinstance(message, kind):
        what = type(message).__name__.upper() if message is not None else "a text message"
        await _refuse(ws, service.refuse(wire.Code.BAD_MESSAGE, f"expected a binary {name}, got {what}"))
        return None
    return message


async def _serve_stream(ws: WebSocket, service: IngestService) -> None:
    hello = await _expect(ws, service, wire.Hello, HELLO_TIMEOUT_S)
    if hello is None:
        return
    error = service.check_hello(hello)
    if error is not None:
        await _refuse(ws, error)
        return
    await ws.send_bytes(wire.Welcome().encode())
    while True:
        batch = await _expect(ws, service, wire.Batch)
        if batch is None:
            return
        replies = await service.submit(hello.camera_id, batch)
        for reply in replies:
            await ws.send_bytes(reply.encode())
        if any(isinstance(r, wire.Error) for r in replies):
            await ws.close(_CLOSE.get(wire.Code.BUSY, 1011))
            return
