"""A small in-memory ingest server speaking the /v1/stream protocol, for runtime tests and offline demos.

It is *not* the real server (server/ stores to SQLite and classifies); it only checks the token and model tag,
optionally verifies payloads with the bundle's tables, deduplicates by (camera, epoch, seq) and acks. Knobs let tests
break the connection every few batches or refuse the camera.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from taskcodec import wire


@dataclass
class FakeIngestServer:
    model_tag: bytes
    tokens: set[bytes] = field(default_factory=lambda: {b"secret"})
    tables: object | None = None            # EntropyTables: when given, undecodable payloads are rejected
    close_after_batches: int | None = None  # drop the connection after this many batches (per connection)
    port: int = 0
    frames: dict[tuple[str, int, int], tuple[int, bytes]] = field(default_factory=dict)
    batches: int = 0
    duplicates: int = 0
    rejected: int = 0
    hellos: int = 0
    connections: int = 0

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeIngestServer":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="fake-ingest", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("fake ingest server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> "FakeIngestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", self.port, compression=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._started.set()
            await self._stop.wait()

    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        try:
            await self._session(ws)
        except ConnectionClosed:
            pass

    async def _session(self, ws) -> None:
        if ws.request.path != "/v1/stream":
            await ws.close(1008, "unknown path")
            return
        try:
            hello = wire.decode(await ws.recv())
        except wire.WireError as exc:
            await ws.send(wire.Error(wire.Code.BAD_MESSAGE, str(exc)).encode())
            return
        if not isinstance(hello, wire.Hello):
            await ws.send(wire.Error(wire.Code.BAD_MESSAGE, "expected HELLO").encode())
            return
        self.hellos += 1
        if hello.token not in self.tokens:
            await ws.send(wire.Error(wire.Code.UNAUTHORIZED, "bad token").encode())
            return
        if hello.model_tag != self.model_tag:
            await ws.send(wire.Error(wire.Code.UNKNOWN_MODEL,
                                     f"unknown model {hello.model_tag.hex()}; expected {self.model_tag.hex()}").encode())
            return
        await ws.send(wire.Welcome().encode())
        seen = 0
        async for raw in ws:
            msg = wire.decode(raw)
            if not isinstance(msg, wire.Batch):
                await ws.send(wire.Error(wire.Code.BAD_MESSAGE, "expected BATCH").encode())
                return
            self.batches += 1
            seen += 1
            if self.close_after_batches is not None and seen > self.close_after_batches:
                await ws.close(1011, "test: connection dropped")
                return
            await self._store(ws, hello.camera_id, msg)

    async def _store(self, ws, camera: str, batch: wire.Batch) -> None:
        from taskcodec.coding import StreamError, decompress

        bad = []
        for f in batch.frames:
            key = (camera, batch.epoch, f.seq)
            if key in self.frames:
                self.duplicates += 1
                continue
            if self.tables is not None:
                try:
                    decompress(f.payload, self.tables, self.model_tag)
                except StreamError:
                    bad.append(f.seq)
                    continue
            self.frames[key] = (f.ts_ms, f.payload)
        for seq in bad:
            self.rejected += 1
            await ws.send(wire.Reject(batch.epoch, seq, 1, wire.Code.BAD_PAYLOAD, "undecodable payload").encode())
        good = [f.seq for f in batch.frames if f.seq not in bad]
        # ack each run of accepted seqs
        start = prev = None
        for seq in good + [None]:
            if seq is not None and prev is not None and seq == prev + 1:
                prev = seq
                continue
            if start is not None:
                await ws.send(wire.Ack(batch.epoch, start, prev - start + 1).encode())
            start = prev = seq
