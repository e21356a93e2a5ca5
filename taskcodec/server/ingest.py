"""The transport-free ingest core: check a HELLO, then decode, classify and durably store BATCHes, and say what to
reply. The WebSocket and HTTP endpoints (app.py) are thin shells around it, and tests and fuzzing call it directly.

Throughput comes from micro-batching across connections: every connection puts its batch on one asyncio queue; a
single worker takes everything waiting, decodes it, runs *one* classifier call and *one* SQLite transaction (one
fsync) for all of it, in a worker thread, and then answers each connection. Under light load a micro-batch is one
message (no added wait); under heavy load batches grow by themselves while the previous one is committing.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from taskcodec.server.auth import authenticate
from taskcodec.server.classify import Classifier
from taskcodec.server.metrics import ServerMetrics
from taskcodec.server.storage import Storage, now_ms
from taskcodec import wire
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, StreamError, decompress

MAX_INT64 = (1 << 63) - 1
HTTP_STATUS = {wire.Code.BAD_MESSAGE: 400, wire.Code.UNAUTHORIZED: 401, wire.Code.UNKNOWN_MODEL: 409,
               wire.Code.BAD_PAYLOAD: 422, wire.Code.BUSY: 503}
REASON_NAMES = {wire.Code.BAD_MESSAGE: "bad_message", wire.Code.UNAUTHORIZED: "unauthorized",
                wire.Code.UNKNOWN_MODEL: "unknown_model", wire.Code.BAD_PAYLOAD: "bad_payload",
                wire.Code.BUSY: "busy"}


@dataclass
class _Job:
    camera_id: str
    batch: wire.Batch
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class HttpReply:
    status: int
    reason: str
    body: bytes


def split_ingest_body(body: bytes) -> tuple[wire.Hello, bytes]:
    """An HTTP ingest body is HELLO || BATCH; find where the HELLO ends (type, version, 8-byte tag, 2 short strings)."""
    if not body or body[0] != wire.Hello.TYPE:
        raise wire.WireError("an ingest body starts with a HELLO message")
    if len(body) < 11:
        raise wire.WireError("message ends early")
    token_at = 11 + body[10]
    if token_at >= len(body):
        raise wire.WireError("message ends early")
    end = token_at + 1 + body[token_at]
    hello = wire.decode(body[:end])
    assert isinstance(hello, wire.Hello)
    return hello, body[end:]


class IngestService:
    def __init__(self, bundle: Bundle, storage: Storage, *, microbatch: bool = True,
                 max_microbatch_frames: int = 8192, metrics: ServerMetrics | None = None):
        self.bundle = bundle
        self.storage = storage
        self.model_id = bundle.model_id
        self.model_tag = bundle.model_tag
        self.coder = RangeCoder(bundle.tables)
        self.classifier = Classifier(bundle)
        self.metrics = metrics or ServerMetrics()
        self.microbatch = microbatch
        self.max_microbatch_frames = max_microbatch_frames
        self.started = time.monotonic()
        # One thread: decode holds the GIL anyway, and a single writer keeps SQLite transactions simple.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self.stored_hooks: list = []  # called with the rows after each commit (server/events.py); must not block

    # handshake ---------------------------------------------------------------------------------------------------
    def check_hello(self, hello: wire.Hello) -> wire.Error | None:
        """None when the camera may upload on this connection, else the Error to send before closing."""
        if not authenticate(self.storage, hello.camera_id, hello.token):
            return self.refuse(wire.Code.UNAUTHORIZED,
                               f"camera {hello.camera_id!r}: unknown camera or wrong token")
        if hello.model_tag != self.model_tag:
            return self.refuse(wire.Code.UNKNOWN_MODEL,
                               f"server expects model {self.model_id}, camera sent model {hello.model_tag.hex()}; "
                               f"install bundle {self.model_id} on the camera")
        return None

    def refuse(self, code: int, reason: str) -> wire.Error:
        self.metrics.messages_refused.labels(REASON_NAMES.get(code, str(code))).inc()
        return wire.Error(code, reason)

    # batches -----------------------------------------------------------------------------------------------------
    async def submit(self, camera_id: str, batch: wire.Batch) -> list[wire.Message]:
        """Store a batch of an authenticated camera; returns the Ack/Reject replies (or one Error if storage fails)."""
        self.metrics.frames_received.inc(len(batch.frames))
        loop = asyncio.get_running_loop()
        if not self.microbatch:
            return (await loop.run_in_executor(self._pool, self._process_safe, [(camera_id, batch)]))[0]
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run_worker())
        job = _Job(camera_id, batch, loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _run_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            frames = len(jobs[0].batch.frames)
            while frames < self.max_microbatch_frames and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                frames += len(jobs[-1].batch.frames)
            results = await loop.run_in_executor(self._pool, self._process_safe,
                                                 [(j.camera_id, j.batch) for j in jobs])
            for job, replies in zip(jobs, results):
                if not job.future.done():  # the connection may have gone away meanwhile
                    job.future.set_result(replies)

    def _process_safe(self, jobs: list[tuple[str, wire.Batch]]) -> list[list[wire.Message]]:
        try:
            return self.process(jobs)
        except Exception as exc:  # storage full, disk error...: nothing acked, the camera keeps its frames and retries
            error = self.refuse(wire.Code.BUSY, f"server could not store frames, retry later: {exc}")
            return [[error] for _ in jobs]

    def process(self, jobs: list[tuple[str, wire.Batch]]) -> list[list[wire.Message]]:
        """Decode, classify and store several batches in one transaction (runs in the worker thread)."""
        t0 = time.perf_counter()
        coder, tag, model_id = self.coder, self.model_tag, self.model_id
        symbols, keep, outcomes = [], [], []
        for camera_id, batch in jobs:
            frames = batch.frames
            last = frames[-1]
            if last.seq > MAX_INT64 or last.ts_ms > MAX_INT64:
                outcomes.append([(False, "sequence number or timestamp beyond 2^63-1", wire.Code.BAD_MESSAGE)]
                                * len(frames))
                continue
            outcome = []
            for f in frames:
                try:
                    symbols.append(decompress(f.payload, coder, tag))
                except StreamError as exc:
                    outcome.append((False, str(exc), wire.Code.BAD_PAYLOAD))
                    continue
                keep.append((camera_id, batch.epoch, f))
                outcome.append((True, "", 0))
            outcomes.append(outcome)
        inserted = 0
        if keep:
            pred, conf = self.classifier.predict(np.stack(symbols))
            stored_ms = now_ms()
            rows = [(cam, epoch, f.seq, f.ts_ms, stored_ms, model_id, f.payload, p, c)
                    for (cam, epoch, f), p, c in zip(keep, pred.tolist(), conf.tolist())]
            inserted = self.storage.store_frames(rows)
            for hook in self.stored_hooks:
                hook(rows)
            m = self.metrics
            m.frames_stored.inc(inserted)
            m.frames_duplicate.inc(len(rows) - inserted)
            observe = m.capture_to_stored.observe
            for _, _, f in keep:
                observe(max(0, stored_ms - f.ts_ms) / 1000.0)
        replies = []
        for (_, batch), outcome in zip(jobs, outcomes):
            replies.append(self._replies(batch, outcome))
        self.metrics.process_seconds.observe(time.perf_counter() - t0)
        self.metrics.microbatch_frames.observe(sum(len(b.frames) for _, b in jobs))
        return replies

    def _replies(self, batch: wire.Batch, outcome: list[tuple[bool, str, int]]) -> list[wire.Message]:
        """Consecutive runs of stored frames become Acks, runs of refused frames Rejects (with the first reason)."""
        out: list[wire.Message] = []
        seq = batch.frames[0].seq
        for ok, run in itertools.groupby(outcome, key=lambda o: o[0]):
            run = list(run)
            if ok:
                out.append(wire.Ack(batch.epoch, seq, len(run)))
            else:
                _, reason, code = run[0]
                self.metrics.frames_rejected.labels(REASON_NAMES.get(code, str(code))).inc(len(run))
                out.append(wire.Reject(batch.epoch, seq, len(run), code, reason))
            seq += len(run)
        return out

    # HTTP --------------------------------------------------------------------------------------------------------
    async def ingest_http(self, body: bytes) -> HttpReply:
        """POST /v1/ingest: HELLO || BATCH in, the replies (concatenated; usually one message) out."""
        self.metrics.bytes_received.inc(len(body))
        try:
            hello, rest = split_ingest_body(body)
            batch = wire.decode(rest)
            if not isinstance(batch, wire.Batch):
                raise wire.WireError(f"expected a BATCH after the HELLO, got {type(batch).__name__.upper()}")
        except wire.WireError as exc:
            return self._http_error(self.refuse(wire.Code.BAD_MESSAGE, f"malformed ingest body: {exc}"))
        error = self.check_hello(hello)
        if error is not None:
            return self._http_error(error)
        replies = await self.submit(hello.camera_id, batch)
        acked = sum(m.count for m in replies if isinstance(m, wire.Ack))
        body = b"".join(m.encode() for m in replies)
        first_problem = next((m for m in replies if not isinstance(m, wire.Ack)), None)
        if isinstance(first_problem, wire.Error):
            return HttpReply(HTTP_STATUS[first_problem.code], first_problem.reason, body)
        if acked:
            rejected = len(batch.frames) - acked
            reason = f"stored {acked} frames" + (f", rejected {rejected}: {first_problem.reason}" if rejected else "")
            return HttpReply(200, reason, body)
        return HttpReply(HTTP_STATUS.get(first_problem.code, 422), first_problem.reason, body)

    @staticmethod
    def _http_error(error: wire.Error) -> HttpReply:
        return HttpReply(HTTP_STATUS.get(error.code, 400), error.reason, error.encode())

    # lifecycle ---------------------------------------------------------------------------------------------------
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
