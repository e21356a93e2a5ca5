"""Camera-facing gateway of the scale-out mode: the same wire protocol as `taskcodec serve`, no local state.

A camera's BATCH is published to JetStream (subject ``tc.ingest``) with the message id ``camera/epoch/seq/count``;
only when JetStream answers that it stored the message (R3: on a quorum of nodes) does the gateway ACK the camera.
A gateway killed at any moment loses nothing acked: un-acked batches stay in the camera's spool and are re-sent, and
JetStream's duplicate window plus the workers' unique key drop the copies. Decoding and classification happen in the
workers, so a gateway's CPU per frame is the wire handling alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import nats
import psycopg
import websockets
from nats.js.errors import NoStreamResponseError
from websockets.asyncio.server import ServerConnection, serve

from taskcodec import wire
from taskcodec.server.auth import verify_token
from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

log = logging.getLogger("taskcodec.gateway")

STREAM = "TCINGEST"
SUBJECT = "tc.ingest"
MAX_HELLO_BYTES = 1024
HANDSHAKE_TIMEOUT_S = 10.0
AUTH_CACHE_S = 30.0


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


class Gateway:
    def __init__(self, nats_urls: list[str], pg_dsn: str, model_tags: set[bytes]):
        self.nats_urls = nats_urls
        self.pg_dsn = pg_dsn
        self.model_tags = model_tags
        self._auth: dict[str, tuple[str, float]] = {}
        self.nc = self.js = self.pg = None

    async def start(self) -> None:
        self.nc = await nats.connect(servers=self.nats_urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self.js = self.nc.jetstream(timeout=10.0)
        self.pg = PgStore(self.pg_dsn)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()
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

    async def handle(self, ws: ServerConnection) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
        except (asyncio.TimeoutError, websockets.ConnectionClosed):
            return
        if isinstance(first, bytes) and len(first) > MAX_HELLO_BYTES:
            await self._refuse(ws, wire.Code.BAD_MESSAGE, f"a HELLO is at most {MAX_HELLO_BYTES} bytes")
            return
        hello = await self._expect(ws, first, wire.Hello)
        if hello is None:
            return
        try:
            stored = await asyncio.to_thread(self._token_hash, hello.camera_id)
        except (psycopg.Error, PgStoreError) as exc:
            log.warning("busy camera=%s reason=camera-store-unavailable error=%s", hello.camera_id, exc)
            await self._refuse(ws, wire.Code.BUSY, "camera store unavailable, retry later")
            return
        if stored is None or not verify_token(hello.token, stored):
            log.warning("refused camera=%s reason=unauthorized address=%s", hello.camera_id, ws.remote_address)
            await self._refuse(ws, wire.Code.UNAUTHORIZED, "unknown camera or wrong token")
            return
        if hello.model_tag not in self.model_tags:
            log.warning("refused camera=%s reason=unknown-model model=%s", hello.camera_id, hello.model_tag.hex())
            await self._refuse(ws, wire.Code.UNKNOWN_MODEL, f"model {hello.model_tag.hex()} is not served here")
            return
        await ws.send(wire.Welcome(hello.version).encode())  # v2 cameras get a v2 WELCOME; no temporal here
        headers_base = {"camera": hello.camera_id, "model": hello.model_tag.hex()}
        try:
            async for raw in ws:
                batch = await self._expect(ws, raw, wire.Batch)
                if batch is None:
                    return
                first_seq, count = batch.frames[0].seq, len(batch.frames)
                digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
                msg_id = f"{hello.camera_id}/{batch.epoch}/{first_seq}/{count}/{digest}"
                try:
                    await self.js.publish(SUBJECT, raw, headers={**headers_base, "Nats-Msg-Id": msg_id})
                except (nats.errors.TimeoutError, NoStreamResponseError, nats.errors.ConnectionClosedError) as exc:
                    # Not stored on a quorum: tell the camera to keep the frames and come back later.
                    log.warning("busy camera=%s reason=jetstream-unavailable error=%s", hello.camera_id, exc)
                    await self._refuse(ws, wire.Code.BUSY, "ingest log unavailable, retry later")
                    return
                await ws.send(wire.Ack(batch.epoch, first_seq, count).encode())
        except websockets.ConnectionClosed:
            return

    async def _expect(self, ws: ServerConnection, raw, kind: type):
        """The message decoded if it is a binary ``kind`` message; else the connection is refused and None returned."""
        try:
            message = wire.decode(raw) if isinstance(raw, bytes) else None
        except wire.WireError as exc:
            await self._refuse(ws, wire.Code.BAD_MESSAGE, f"bad {kind.__name__.upper()}: {exc}")
            return None
        if not isinstance(message, kind):
            await self._refuse(ws, wire.Code.BAD_MESSAGE, f"expected a binary {kind.__name__.upper()} message")
            return None
        return message

    @staticmethod
    async def _refuse(ws: ServerConnection, code: int, reason: str) -> None:
        try:
            await ws.send(wire.Error(code, reason).encode())
            await ws.close()
        except websockets.ConnectionClosed:
            pass


async def run_gateway(nats_urls: list[str], pg_dsn: str, model_tags: set[bytes], host: str, port: int,
                      port_file: str | None = None, stop: asyncio.Event | None = None) -> None:
    gw = Gateway(nats_urls, pg_dsn, model_tags)
    await gw.start()
    await ensure_stream(gw.js)
    # No permessage-deflate: payloads are a few bytes of range-coded data, compressing them only costs CPU.
    async with serve(gw.handle, host, port, max_size=wire.MAX_FRAMES_PER_BATCH * (wire.MAX_FRAME_BYTES + 16),
                     compression=None) as server:
        bound = server.sockets[0].getsockname()[1]
        if port_file:
            from pathlib import Path

            tmp = Path(port_file + ".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        log.info("gateway listening on %s:%d", host, bound)
        await (stop or asyncio.Event()).wait()
    await gw.close()
