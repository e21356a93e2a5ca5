"""The transport-free ingest core: authenticate a HELLO into a session, then decode, classify and durably store
BATCHes, and say what to reply. The WebSocket and HTTP endpoints (app.py) are thin shells around it, and tests and
fuzzing call it directly.

Throughput comes from micro-batching across connections: every connection puts its batch on one queue; the loop
hands everything waiting to a single worker thread, which decodes it, runs *one* classifier call and *one* SQLite
transaction (one fsync) for all of it; the loop then answers each connection. Under light load a micro-batch is one
message (no added wait); under heavy load batches grow by themselves while the previous one is committing.

Replies, per frame: ACK once durably stored (a re-sent frame with the same payload is acked again as a duplicate);
REJECT BAD_PAYLOAD for a payload that does not decode; REJECT CONFLICT when the same (camera, epoch, seq) is already
stored with another payload (logged, counted, never acked: the stored frame stays). Per connection: ERROR BUSY (with
``retry_after_s=N`` in the reason and Retry-After over HTTP) while the storage is full, ERROR UNAUTHORIZED once the
camera has been removed or its token rotated (checked inside the storing transaction).

Storage full is an *episode*: one log line when it starts, one when it ends, /healthz 503 in between, HELLOs
answered BUSY at once (no batch is read), and a small probe write every few seconds to notice the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from taskcodec.server.auth import RateLimitedLog, authenticate_camera
from taskcodec.server.classify import Classifier
from taskcodec.server.config import StorageConfig
from taskcodec.server.metrics import ServerMetrics
from taskcodec.server.temporal import TemporalIngest
from taskcodec.server.storage import (CONFLICT, DUPLICATE, NEW, BatchRows, Storage, StorageDamaged, StorageError,
                                      StorageFull, now_ms)
from taskcodec import wire
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, StreamError, decompress

log = logging.getLogger("taskcodec.server.ingest")
# Who the current connection is ({peer, camera, model, refused}), set by app.py per WebSocket / HTTP request, so that
# every refusal and disconnect is logged as one key=value line naming camera, model and reason.
connection: contextvars.ContextVar[dict | None] = contextvars.ContextVar("taskcodec_connection", default=None)


def kv(**fields) -> str:
    """key=value log fields; values with spaces, quotes or = are JSON-quoted, absent ones are '-'."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else str(value)
        if not text or not text.isprintable() or any(c in text for c in ' "='):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)

HTTP_STATUS = {wire.Code.BAD_MESSAGE: 400, wire.Code.UNAUTHORIZED: 401, wire.Code.UNKNOWN_MODEL: 409,
               wire.Code.BAD_PAYLOAD: 422, wire.Code.BUSY: 503, wire.Code.CONFLICT: 409}
REASON_NAMES = wire.CODE_NAMES


@dataclass(frozen=True)
class Session:
    """An authenticated camera connection: the token hash it proved, so a rotation or removal ends it."""
    camera_id: str
    token_hash: str | None
    peer: str = "?"
    temporal: Any = field(default=None, compare=False, repr=False)  # server/temporal.py: this connection's reference
    model: Any = field(default=None, compare=False, repr=False)  # the ServedModel its HELLO named (None: the default)


class ServedModel:
    """One model the server decodes and classifies with (issue 13: several at once, by the HELLO's model tag)."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model_id, self.model_tag = bundle.model_id, bundle.model_tag
        self.coder = RangeCoder(bundle.tables)
        self.temporal = TemporalIngest(bundle, self.coder)  # wire v3 TBATCH decoding (KEY / COND / SAME)
        self.classifier = Classifier(bundle)




@dataclass(frozen=True)
class HttpReply:
    status: int
    reason: str
    body: bytes
    retry_after_s: float | None = None


class StorageState:
    """Whether the store can take writes: 'ok', 'full' (an episode that ends by itself) or 'damaged' (needs an
    operator). Logs one line per change of state, never one per message."""

    def __init__(self, metrics: ServerMetrics, path: str):
        self.metrics, self.path = metrics, path
        self.full_since: float | None = None
        self.damaged: str | None = None
        self.busy_replies = 0
        self.integrity: str = "unchecked"
        self.integrity_checked_at: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return "damaged" if self.damaged else "full" if self.full_since is not None else "ok"

    def full(self) -> None:
        with self._lock:
            if self.full_since is None:
                self.full_since = time.monotonic()
                self.busy_replies = 0
                self.metrics.storage_full.set(1)
                self.metrics.storage_full_episodes.inc()
                log.error("storage full: %s has no room (database or disk is full); cameras get BUSY and keep their "
                          "frames until space frees up; /healthz reports 503 meanwhile", self.path)

    def writable(self) -> None:
        with self._lock:
            if self.full_since is not None:
                log.warning("storage writable again after %.1f s of storage full (%d BUSY replies meanwhile)",
                            time.monotonic() - self.full_since, self.busy_replies)
                self.full_since = None
                self.metrics.storage_full.set(0)

    def damage(self, reason: str) -> None:
        with self._lock:
            if self.damaged is None:
                self.damaged = reason
                self.metrics.storage_damaged.set(1)
                log.error("storage damaged: %s; refusing frames (BUSY); restore a backup or run sqlite3 .recover, "
                          "then restart", reason)

    def integrity_result(self, problems: list[str]) -> None:
        self.integrity_checked_at = time.monotonic()
        if problems:
            self.integrity = "damaged"
            self.damage(f"PRAGMA quick_check: {'; '.join(problems[:3])}")
        else:
            self.integrity = "ok"


class IngestService:
    def __init__(self, bundle: Bundle, storage: Storage, *, microbatch: bool = True,
                 max_microbatch_frames: int = 8192, metrics: ServerMetrics | None = None,
                 storage_config: StorageConfig | None = None, linger_s: float = 0.05, linger_frames: int = 256):
        self.bundle = bundle
        self.storage = storage
        self.model_id = bundle.model_id
        self.model_tag = bundle.model_tag
        default = ServedModel(bundle)
        self.coder, self.temporal, self.classifier = default.coder, default.temporal, default.classifier
        # model tag -> ServedModel: the default bundle, plus registry models loaded when a HELLO first names them
        self.models: dict[bytes, ServedModel] = {self.model_tag: default}
        self.model_loader = None  # server/registry.py: model id -> Bundle | None (registered bundles)
        self._model_lock = threading.Lock()
        self.metrics = metrics or ServerMetrics()
        self.microbatch = microbatch
        self.max_microbatch_frames = max_microbatch_frames
        self.linger_s = linger_s
        self.linger_frames = linger_frames  # a linger ends early once this many frames wait
        self.config = storage_config or StorageConfig()
        self.started = time.monotonic()
        self.state = StorageState(self.metrics, str(getattr(storage, "path", "?")))
        self.failed_logins = RateLimitedLog(log)
        self.conflicts_log = RateLimitedLog(log)
        self.refusals_log = RateLimitedLog(log, interval=1.0)  # one line per camera and reason per second at most
        # One thread: decode holds the GIL anyway, and a single writer keeps SQLite transactions simple.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        # Waiting jobs: (session, batch, done) tuples; ``done(replies)`` is called on the event loop. A plain deque and
        # loop callbacks: no asyncio.Queue, no task, no future per message or per micro-batch.
        self._jobs: collections.deque = collections.deque()
        self._queued_frames = 0  # frames in self._jobs
        # The micro-batch cycle is callbacks on the loop (_next, _dispatch, _delivered), not a task: each await of a
        # task is another loop iteration between the commit and the replies.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = False  # a micro-batch is in the ingest thread
        self._scheduled = False  # a _dispatch_soon is scheduled
        self._busy = False  # the previous micro-batch held several messages
        self._linger: asyncio.Handle | None = None  # set while lingering for more messages
        self._ending = False  # the linger ends in this loop iteration (linger_frames wait)
        self._closed = False
        self._maintenance: asyncio.Task | None = None
        self._integrity_thread: threading.Thread | None = None
        self.stored_hooks: list = []  # called with the rows after each commit (server/events.py); must not block

    # handshake ---------------------------------------------------------------------------------------------------
    def open_session(self, hello: wire.Hello, peer: str = "?") -> tuple[Session | None, wire.Error | None]:
        """(session, None) when the camera may upload on this connection, else (None, the Error to send)."""
        who = connection.get()
        if who is not None:
            who.update(camera=hello.camera_id, model=hello.model_tag.hex())
        camera = authenticate_camera(self.storage, hello.camera_id, hello.token)
        if camera is None:
            self.metrics.auth_failures.labels("camera").inc()
            self.failed_logins.warning(f"cam:{peer}:{hello.camera_id}",
                                       f"camera authentication failed: camera {hello.camera_id!r} from {peer} "
                                       f"(unknown camera or wrong token)")
            return None, self.refuse(wire.Code.UNAUTHORIZED,
                                     f"camera {hello.camera_id!r}: unknown camera or wrong token")
        model = self.models.get(hello.model_tag) or self._load_model(hello.model_tag)
        if model is None:
            return None, self.refuse(wire.Code.UNKNOWN_MODEL,
                                     f"server expects model {self.model_id}, camera sent model "
                                     f"{hello.model_tag.hex()}; install bundle {self.model_id} on the camera "
                                     f"(or add that bundle to the server: taskcodec models add BUNDLE)")
        if self.state.state != "ok":
            return None, self.busy()
        return Session(camera.id, camera.token_hash, peer, model.temporal.grant(hello), model), None

    def _load_model(self, tag: bytes) -> ServedModel | None:
        """A registered model not loaded yet (added while the server runs): load it once; None if unknown."""
        if self.model_loader is None:
            return None
        with self._model_lock:
            if tag in self.models:
                return self.models[tag]
            try:
                bundle = self.model_loader(tag.hex())
                if bundle is None:
                    return None
                model = ServedModel(bundle)
            except Exception as exc:  # noqa: BLE001 (a broken registry entry refuses the camera, never the server)
                log.error("event=model_load_failed " + kv(model=tag.hex(), reason=str(exc)))
                return None
            self.models = {**self.models, tag: model}  # copy-on-write: readers never see a dict being resized
            log.info("event=model_loaded " + kv(model=model.model_id, bundle=str(bundle.path)))
            return model

    def check_hello(self, hello: wire.Hello, peer: str = "?") -> wire.Error | None:
        """None when the camera may upload on this connection, else the Error to send before closing."""
        return self.open_session(hello, peer)[1]

    def session_valid(self, session: Session) -> bool:
        """Is the camera's token still the one this session authenticated with (not removed, not rotated)?"""
        if session.token_hash is None:
            return True
        try:
            camera = self.storage.get_camera(session.camera_id)
        except Exception:  # a reader error is not a revocation; the next batch's transaction decides
            return True
        return camera is not None and camera.token_hash == session.token_hash

    def refuse(self, code: int, reason: str) -> wire.Error:
        self.metrics.messages_refused.labels(REASON_NAMES.get(code, str(code))).inc()
        who = connection.get() or {}
        who["refused"] = reason
        name = REASON_NAMES.get(code, str(code))
        self.refusals_log.warning(f"{who.get('camera') or who.get('peer')}:{name}", "event=refused " + kv(
            camera=who.get("camera"), model=who.get("model"), peer=who.get("peer"), code=name, reason=reason))
        return wire.Error(code, reason)

    def busy(self) -> wire.Error:
        self.state.busy_replies += 1
        what = "damaged" if self.state.damaged else "full"
        return self.refuse(wire.Code.BUSY, f"server storage is {what}; nothing was stored; "
                                           f"retry_after_s={self.config.busy_retry_after_s:g}")

    def revoked(self, session: Session) -> wire.Error:
        log.warning("camera %r (%s): token removed or rotated; session closed", session.camera_id, session.peer)
        return self.refuse(wire.Code.UNAUTHORIZED,
                           f"camera {session.camera_id!r}: removed or token rotated; session closed")

    # batches -----------------------------------------------------------------------------------------------------
    async def submit(self, session: Session | str, batch: wire.Batch) -> list[wire.Message]:
        """Store a batch of an authenticated session (a bare camera id: no token re-check; tools and benches);
        returns the Ack/Reject replies, or one Error (storage full or damaged, camera revoked)."""
        session = Session(session, None) if isinstance(session, str) else session
        future = asyncio.get_running_loop().create_future()

        def done(replies: list[wire.Message]) -> None:
            if not future.done():  # the connection may have gone away meanwhile
                future.set_result(replies)

        self.submit_nowait(session, batch, done)
        return await future

    def submit_nowait(self, session: Session, batch: wire.Batch, done) -> None:
        """The callback form of submit (the stream front end, server/stream.py): ``done(replies)`` is called later
        on the event loop, never from inside this call."""
        nframes = len(batch.frames)
        self.metrics.frames_received.inc(nframes)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first message (or a new loop: tests run several)
            self._loop, self._inflight, self._scheduled, self._linger, self._ending = loop, False, False, None, False
            self.start()
        state = self.state
        if state.full_since is not None or state.damaged:
            loop.call_soon(done, [self.busy()])
            return
        if not self.microbatch:
            future = loop.run_in_executor(self._pool, self._process_safe, [(session, batch)])
            future.add_done_callback(lambda f: done(f.result()[0]))
            return
        self._jobs.append((session, batch, done))
        self._queued_frames += nframes
        if self._inflight:
            return  # _delivered dispatches what waits once the micro-batch in the ingest thread is answered
        if self._linger is not None:
            if self._queued_frames >= self.linger_frames and not self._ending:  # enough waits: end the linger
                self._ending = True  # (the messages read in this loop iteration still join)
                self._linger.cancel()
                self._linger = loop.call_soon(self._linger_over)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch_soon)  # the messages read in this loop iteration join it

    def _dispatch_soon(self) -> None:
        self._scheduled = False
        if not self._inflight and self._linger is None:
            self._next()

    def _next(self) -> None:
        """Start the next micro-batch, or linger for more first. Under load (many one-frame messages), wait up to
        linger_s for more, until linger_frames wait: the per-micro-batch costs (the commit's fsync, the classifier
        call, the hop to the worker thread) are then shared by many more frames. A lone camera never waits (its
        micro-batch is one message, the queue stays empty); under heavy load the queue holds linger_frames already
        and nobody waits."""
        if not self._jobs or self._closed:
            return
        if self.linger_s and (self._busy or len(self._jobs) > 1) and self._queued_frames < self.linger_frames:
            self._linger = self._loop.call_later(self.linger_s, self._linger_over)
            return
        self._dispatch()

    def _linger_over(self) -> None:
        self._linger, self._ending = None, False
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand everything waiting (up to max_microbatch_frames) to the ingest thread as one micro-batch; its replies
        come back to the loop in one call_soon_threadsafe (_delivered): no task or future per micro-batch."""
        queue = self._jobs
        if not queue or self._inflight or self._closed:
            return
        jobs = [queue.popleft()]
        frames = len(jobs[0][1].frames)
        while queue and frames < self.max_microbatch_frames:
            jobs.append(queue.popleft())
            frames += len(jobs[-1][1].frames)
        self._queued_frames -= frames
        self._busy = len(jobs) > 1
        self._inflight = True
        loop = self._loop

        def finished(future) -> None:  # in the ingest thread
            try:
                loop.call_soon_threadsafe(self._delivered, jobs, future)
            except RuntimeError:  # the loop is closed (shutting down): nobody waits for these replies
                pass

        self._pool.submit(self._process_safe, [(s, b) for s, b, _ in jobs]).add_done_callback(finished)

    def _delivered(self, jobs: list, future) -> None:
        self._inflight = False
        exc = future.exception()
        if exc is None:
            results = future.result()
        else:  # a bug in process must not stop ingest: answer BUSY
            log.error("micro-batch failed", exc_info=exc)
            results = [[self.refuse(wire.Code.BUSY, f"server error ({type(exc).__name__}); retry_after_s="
                                                    f"{self.config.busy_retry_after_s:g}")] for _ in jobs]
        for (_, _, done), replies in zip(jobs, results):
            try:
                done(replies)
            except Exception:  # noqa: BLE001 (one connection's failure is not the others')
                log.exception("delivering replies failed")
        self._next()

    def _process_safe(self, jobs: list[tuple[Session, wire.Batch]]) -> list[list[wire.Message]]:
        try:
            return self.process(jobs)
        except StorageFull:
            self.state.full()
        except StorageDamaged as exc:
            self.state.damage(str(exc))
        except StorageError as exc:  # locked, I/O error...: nothing acked, the camera keeps its frames and retries
            self.conflicts_log.warning("storage-error", f"storage error, batches answered BUSY: {exc}")
            return [[self.refuse(wire.Code.BUSY, f"server could not store frames ({exc}); retry_after_s="
                                                 f"{self.config.busy_retry_after_s:g}")] for _ in jobs]
        return [[self.busy()] for _ in jobs]

    def process(self, jobs: list[tuple[Session | str, wire.Batch]]) -> list[list[wire.Message]]:
        """Decode, classify and store several batches in one transaction (runs in the worker thread)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        default = self.models[self.model_tag]
        jobs = [(Session(s, None) if isinstance(s, str) else s, b) for s, b in jobs]
        # symbols per model (one classifier call per model in the micro-batch); a frame's index is into its model's
        symbols: dict[bytes, list[np.ndarray]] = {}
        decoded: list[list[tuple[wire.Frame, int] | tuple[wire.Frame, StreamError]]] = []
        endings: list[wire.Error | None] = []  # server/temporal.py: RESYNC after the frames decoded
        for session, batch in jobs:
            m = session.model or default
            sym = symbols.setdefault(m.model_tag, [])
            out = []
            frames, ending = m.temporal.decode(session.temporal, batch, m.model_tag)  # KEY-equivalent payloads
            for f, s in frames:
                if isinstance(s, StreamError):
                    out.append((f, s))
                else:
                    sym.append(s)
                    out.append((f, len(sym) - 1))
            decoded.append(out)
            endings.append(ending)
        predictions: dict[bytes, tuple[list, list]] = {}
        for tag, sym in symbols.items():
            if sym:
                p, c = self.models[tag].classifier.predict(np.stack(sym))
                predictions[tag] = (p.tolist(), c.tolist())
        stored_ms = now_ms()
        items = []
        for (session, batch), out in zip(jobs, decoded):
            m = session.model or default
            model_id = m.model_id
            pred, conf = predictions.get(m.model_tag, ([], []))
            rows = [(session.camera_id, batch.epoch, f.seq, f.ts_ms, stored_ms, model_id, f.payload, pred[i], conf[i])
                    for f, i in out if isinstance(i, int)]
            items.append(BatchRows(session.camera_id, session.token_hash, rows))
        store0 = time.thread_time()
        statuses = self.storage.store_batches(items)
        m = self.metrics
        m.store_cpu.inc(time.thread_time() - store0)
        self.state.writable()
        new_rows = []
        replies = []
        for (session, batch), out, item, status, ending in zip(jobs, decoded, items, statuses, endings):
            if status is None:
                replies.append([self.revoked(session)])
                continue
            if out and len(status) == len(out) and status.count(NEW) == len(status):
                # the usual case: every frame decoded and new: one ACK for the run (what _replies gives then)
                new_rows.extend(item.rows)
                replies.append([wire.Ack(batch.epoch, batch.frames[0].seq, len(out))])
                if ending is not None:
                    replies[-1].append(self.refuse(ending.code, ending.reason))
                continue
            row_status = iter(zip(item.rows, status))
            outcome = []
            for f, i in out:
                if not isinstance(i, int):
                    outcome.append((False, str(i), wire.Code.BAD_PAYLOAD))
                    continue
                row, st = next(row_status)
                if st == NEW:
                    new_rows.append(row)
                    outcome.append((True, "", 0))
                elif st == DUPLICATE:
                    m.frames_duplicate.inc()
                    outcome.append((True, "", 0))
                else:
                    assert st == CONFLICT
                    m.frames_conflict.inc()
                    outcome.append((False, f"frame (epoch {batch.epoch}, seq {f.seq}) is already stored with a "
                                           f"different payload; refused", wire.Code.CONFLICT))
            conflicts = [f.seq for (f, _), o in zip(out, outcome) if o[2] == wire.Code.CONFLICT]
            if conflicts:
                self.conflicts_log.warning(
                    f"conflict:{session.camera_id}",
                    f"camera {session.camera_id!r} ({session.peer}) sent {len(conflicts)} frame(s) whose key is "
                    f"already stored with a different payload (epoch {batch.epoch}, seq {conflicts[0]}"
                    f"{'..' + str(conflicts[-1]) if len(conflicts) > 1 else ''}): refused, not acked; the stored "
                    f"frames are kept (a reused epoch? a camera that lost its spool must draw a new one)")
            rejected = [o for o in outcome if not o[0]]
            if rejected:  # frames refused (undecodable, conflicting): one key=value line per batch
                name = REASON_NAMES.get(rejected[0][2], str(rejected[0][2]))
                self.refusals_log.warning(f"{session.camera_id}:frames:{name}", "event=rejected " + kv(
                    camera=session.camera_id, model=(session.model or default).model_id, peer=session.peer,
                    epoch=batch.epoch,
                    frames=len(rejected), code=name, reason=rejected[0][1]))
            replies.append(self._replies(batch, outcome) if outcome else [])
            if ending is not None:
                replies[-1].append(self.refuse(ending.code, ending.reason))
        if new_rows:
            m.frames_stored.inc(len(new_rows))
            m.capture_to_stored.observe_many(
                np.maximum(0, stored_ms - np.fromiter((row[3] for row in new_rows), float, len(new_rows))) / 1000.0)
            for hook in self.stored_hooks:
                hook(new_rows)
        m.process_seconds.observe(time.perf_counter() - t0)
        m.process_cpu.inc(time.thread_time() - cpu0)
        m.microbatch_frames.observe(sum(len(b.frames) for _, b in jobs))
        return replies

    def _replies(self, batch: wire.Batch, outcome: list[tuple[bool, str, int]]) -> list[wire.Message]:
        """Consecutive runs of stored frames become Acks, runs of refused frames with one code Rejects (first
        reason)."""
        out: list[wire.Message] = []
        seq = batch.frames[0].seq
        if all(o[0] for o in outcome):  # the usual case: everything stored
            return [wire.Ack(batch.epoch, seq, len(outcome))]
        for (ok, code), run in itertools.groupby(outcome, key=lambda o: (o[0], o[2])):
            run = list(run)
            if ok:
                out.append(wire.Ack(batch.epoch, seq, len(run)))
            else:
                self.metrics.frames_rejected.labels(REASON_NAMES.get(code, str(code))).inc(len(run))
                out.append(wire.Reject(batch.epoch, seq, len(run), code, run[0][1]))
            seq += len(run)
        return out

    # HTTP --------------------------------------------------------------------------------------------------------
    async def ingest_http(self, body: bytes, peer: str = "?", hello: wire.Hello | None = None,
                          session: Session | None = None) -> HttpReply:
        """POST /v1/ingest: HELLO || BATCH in, the replies (concatenated; usually one message) out. The endpoint
        may have authenticated the HELLO already (``session``, ``body`` then the BATCH bytes only)."""
        self.metrics.bytes_received.inc(len(body))
        try:
            if session is None:
                hello, body = wire.split_ingest_body(body)
            batch = wire.decode(body)
            if not isinstance(batch, wire.Batch):
                raise wire.WireError(f"expected a BATCH after the HELLO, got {type(batch).__name__.upper()}")
        except wire.WireError as exc:
            return self._http_error(self.refuse(wire.Code.BAD_MESSAGE, f"malformed ingest body: {exc}"))
        if session is None:
            session, error = self.open_session(hello, peer)
            if error is not None:
                return self._http_error(error)
        replies = await self.submit(session, batch)
        acked = sum(m.count for m in replies if isinstance(m, wire.Ack))
        body = wire.encode_replies(replies)
        first_problem = next((m for m in replies if not isinstance(m, wire.Ack)), None)
        if isinstance(first_problem, wire.Error):
            return self._http_error(first_problem)
        if acked:
            rejected = len(batch.frames) - acked
            reason = f"stored {acked} frames" + (f", rejected {rejected}: {first_problem.reason}" if rejected else "")
            return HttpReply(200, reason, body)
        return HttpReply(HTTP_STATUS.get(first_problem.code, 422), first_problem.reason, body)

    def _http_error(self, error: wire.Error) -> HttpReply:
        retry = self.config.busy_retry_after_s if error.code == wire.Code.BUSY else None
        return HttpReply(HTTP_STATUS.get(error.code, 400), error.reason, error.encode(), retry)

    # storage upkeep ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the upkeep task (checkpoints, the storage-full probe, periodic integrity checks) on this loop."""
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._upkeep())

    async def _upkeep(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        last_checkpoint = last_probe = time.monotonic()
        last_integrity = time.monotonic() if self.state.integrity_checked_at is not None else -1e18
        while True:
            await asyncio.sleep(min(1.0, cfg.full_probe_interval_s))
            now = time.monotonic()
            try:
                if self.state.full_since is not None and now - last_probe >= cfg.full_probe_interval_s:
                    last_probe = now
                    try:
                        await loop.run_in_executor(self._pool, self.storage.probe_write)
                        self.state.writable()
                    except StorageFull:
                        pass
                elif self.state.state == "ok" and now - last_checkpoint >= cfg.checkpoint_interval_s:
                    last_checkpoint = now
                    await loop.run_in_executor(self._pool, self.storage.checkpoint, "TRUNCATE")
                if cfg.integrity_check_interval_s and now - last_integrity >= cfg.integrity_check_interval_s:
                    last_integrity = now
                    self.check_integrity_in_background()
            except StorageFull:
                self.state.full()
            except StorageDamaged as exc:
                self.state.damage(str(exc))
            except StorageError as exc:
                log.debug("storage upkeep: %s", exc)

    def check_integrity_in_background(self) -> None:
        """PRAGMA quick_check on its own connection and thread (it reads the whole file); /healthz shows the result."""
        if self._integrity_thread is not None and self._integrity_thread.is_alive():
            return

        def run() -> None:
            try:
                self.state.integrity_result(self.storage.quick_check())
            except Exception as exc:  # noqa: BLE001 (a check that cannot run is reported, not raised)
                self.state.integrity_result([f"quick_check failed: {exc}"])

        self._integrity_thread = threading.Thread(target=run, name="integrity-check", daemon=True)
        self._integrity_thread.start()

    def health(self) -> dict:
        db_ok = self.storage.ping()
        state = self.state.state
        ok = db_ok and state == "ok"
        return {"status": "ok" if ok else "degraded", "model_id": self.model_id, "db_ok": db_ok, "storage": state,
                "integrity": self.state.integrity, "uptime_s": round(self.uptime_s(), 3)}

    # lifecycle ---------------------------------------------------------------------------------------------------
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    async def aclose(self) -> None:
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        for task in (self._maintenance,):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._pool.shutdown(wait=True)
