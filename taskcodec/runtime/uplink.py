"""The uplink: one persistent WebSocket to the ingest server, fed from the spool, in its own asyncio thread.

Protocol (taskcodec.wire): HELLO -> WELCOME | ERROR, then BATCH -> ACK | REJECT. Frames are sent in batches of
consecutive seqs (``max_batch`` frames, or whatever arrived within ``max_delay`` seconds; 0 sends each frame at once)
with up to ``max_in_flight`` batches unacknowledged. Frames leave the spool only when acked (or rejected: those are
dropped and counted by reason).

Failures, by kind:
- retryable (network errors, timeouts, the server closing, ERROR BUSY): reconnect after an exponential backoff with
  jitter and re-send everything still in the spool (the server deduplicates by (epoch, seq)). The backoff grows with
  every failed connection and resets only when the server ACKs frames — not on a successful handshake, so a server
  that answers every batch with BUSY (disk full) sees this camera back at most a few times a minute;
- fatal (HELLO refused: UNAUTHORIZED, UNKNOWN_MODEL, BAD_MESSAGE such as a wire version the server does not speak;
  HTTP 401/403): the uplink stops with the server's reason (``fatal``) instead of hammering it;
- a batch refused as malformed (ERROR BAD_MESSAGE after WELCOME): the oldest batch in flight is split in halves and
  re-sent; a single frame still refused is dropped and counted (reason ``malformed``), so one bad frame can never
  wedge the camera; frames this runtime cannot even encode are dropped the same way (``unencodable``);
- anything else is a programming error: logged with its traceback, kept in ``crashed`` and the uplink stops, so the
  runtime exits non-zero instead of retrying a bug forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass

from taskcodec import wire
from taskcodec.runtime.spool import Spool, SpooledFrame
from taskcodec.runtime.status import RuntimeStats

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
FATAL_CODES = {wire.Code.UNAUTHORIZED: "unauthorized", wire.Code.UNKNOWN_MODEL: "unknown model",
               wire.Code.BAD_MESSAGE: "protocol mismatch"}   # fatal when they answer the HELLO
MAX_BATCH_BYTES = 512 * 1024


class UplinkFatal(RuntimeError):
    """The server refused this camera for a reason retrying cannot fix."""


class _Retry(Exception):
    """Drop this connection and reconnect after a backoff."""


class _Malformed(_Retry):
    """The server refused a batch as malformed (ERROR BAD_MESSAGE after WELCOME)."""


class _ModelSwitch(Exception):
    """The next spooled frames were captured under another model (a rollout switched it): this connection's frames
    are all acked; reconnect at once with a HELLO naming that model."""


def stream_url(server: str) -> str:
    """``http://host:port`` / ``ws://host:port`` (optionally with a path) -> ``ws://host:port/v1/stream``."""
    parts = urllib.parse.urlsplit(server.strip() if "://" in server else "http://" + server.strip())
    scheme = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"server must be http://HOST:PORT or ws://HOST:PORT, got {server!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in server URL {server!r}") from None
    path = parts.path.rstrip("/")
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass
class UplinkConfig:
    server: str
    camera_id: str
    token: bytes = b""
    # seconds to wait for a batch to fill; 0 sends each frame at once. Each batch costs the uplink thread one wake-up,
    # one send, one ack and one spool read; at 30 fps 0.2 s makes batches of ~6 frames (uplink CPU per frame about a
    # quarter of 0.05 s's: bench/results/runtime/) for up to 0.2 s more capture-to-server latency
    max_delay: float = 0.2
    max_batch: int = 64          # frames per batch
    max_in_flight: int = 8       # unacked batches on the wire
    backoff_initial: float = 0.25
    backoff_max: float = 15.0
    open_timeout: float = 10.0
    ack_timeout: float = 60.0    # no ack for this long with batches outstanding -> reconnect and resend
    # Keepalive pings cost ~4 packets each on a link that otherwise carries a few bytes per frame; acks already prove
    # liveness while frames flow, so ping rarely (often enough for NAT tables, which keep idle TCP for minutes).
    ping_interval: float = 60.0

    def __post_init__(self) -> None:
        self.url = stream_url(self.server)
        self.token = wire.check_identity(self.camera_id, self.token)
        if self.max_delay < 0:
            raise ValueError(f"max delay must be >= 0 seconds, got {self.max_delay}")
        if not 1 <= self.max_batch <= wire.MAX_FRAMES_PER_BATCH:
            raise ValueError(f"max batch must be 1..{wire.MAX_FRAMES_PER_BATCH}, got {self.max_batch}")
        if self.max_in_flight < 1:
            raise ValueError("max in flight must be at least 1")


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform in [cap/4, cap], cap = min(max, initial * 2**attempt), so a fleet
    that lost its server together does not come back in lockstep, yet no camera retries in a tight loop."""
    cap = min(maximum, initial * (2 ** min(attempt, 30)))
    return (rng or random).uniform(cap / 4, cap)


def _runs(frames: list[SpooledFrame]) -> list[list[SpooledFrame]]:
    """Split spool rows into runs of consecutive seqs within one epoch (a BATCH carries one run)."""
    runs: list[list[SpooledFrame]] = []
    for f in frames:
        if runs and runs[-1][-1].epoch == f.epoch and runs[-1][-1].seq + 1 == f.seq:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


class Uplink:
    """Call :meth:`start`, then :meth:`notify` after each spool append; :meth:`stop` when done."""

    def __init__(self, spool: Spool, model_tag: bytes, config: UplinkConfig, stats: RuntimeStats | None = None):
        self.spool = spool
        self.model_tag = model_tag
        self.config = config
        self.stats = stats or RuntimeStats(camera_id=config.camera_id)
        self.fatal: UplinkFatal | None = None
        self.attempts = 0          # connection attempts made
        self.sessions = 0          # HELLOs answered with WELCOME
        self.crashed: BaseException | None = None  # a programming error stopped the uplink
        self.last_error: str | None = None
        self.failures = 0          # consecutive connections without an ACK (drives the backoff)
        self._acked_in_connection = 0
        self._split: tuple[int, int, int, int] | None = None  # (epoch, first_seq, count, batch limit) of a suspect
        self._in_flight_order: list[tuple[int, int, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ws = None
        self._active = False
        self._stop_requested = False
        self._ready = threading.Event()
        self._idle = False
        self._rng = random.Random()
        self.temporal = None       # runtime/temporal_uplink.py TemporalTranscoder: per-connection temporal coding
        self._conn_model = ""      # the model id this connection's HELLO named (one model per connection)

    # -- thread-side API -------------------------------------------------------------------------------------------
    def start(self) -> "Uplink":
        self._thread = threading.Thread(target=self._thread_main, name=f"uplink-{self.config.camera_id}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def notify(self) -> None:
        """A frame was appended to the spool: wake the sender if it is idle (a no-op while it is busy or batching,
        which saves a loop wake-up per frame)."""
        loop, wake = self._loop, self._wake
        if self._idle and loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def wait_drained(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Block until the spool is empty (everything acked or dropped), a fatal error, ``stop``, or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.spool.depth() == 0:
                return True
            if self.fatal is not None or self.crashed is not None or not self.running:
                return False
            time.sleep(0.02)
        return self.spool.depth() == 0

    @property
    def running(self) -> bool:
        return self._active

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_requested = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the event loop ----------------------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        asyncio.run(self.run_async())

    async def run_async(self) -> None:
        """The uplink as a coroutine, for callers that run many uplinks in one event loop (the fleet benchmark)
        instead of :meth:`start`'s thread; :meth:`notify` and :meth:`stop` work the same from other threads."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        self._active = True
        self._ready.set()
        try:
            await self._until_stopped()
        finally:
            self._active = False
            self.stats.set_connected(False)

    async def _until_stopped(self) -> None:
        runner = asyncio.create_task(self._run())
        stopper = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        ws = self._ws
        if ws is not None and not runner.done():
            try:  # say goodbye properly, so the server logs a clean close rather than an error
                await asyncio.wait_for(ws.close(1000, "camera stopping"), 5)
            except Exception:  # noqa: BLE001 - closing a connection that is already broken
                pass
        for task in (runner, stopper):
            task.cancel()
        await asyncio.gather(runner, stopper, return_exceptions=True)

    _main = run_async  # the name the fleet benchmark first used

    async def _run(self) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException

        retryable = (OSError, asyncio.TimeoutError, wire.WireError, _Retry, WebSocketException, EOFError)
        while True:
            self.attempts += 1
            if self.attempts > 1:
                self.stats.reconnect()
            self._acked_in_connection = 0
            try:
                await self._connection()
                raise _Retry("session ended")
            except _ModelSwitch as exc:  # not a failure: reconnect now, under the model of the next frames
                log.info("uplink: %s", exc)
                continue
            except UplinkFatal as exc:
                self.fatal = exc
                log.error("uplink stopped: %s", exc)
                return
            except retryable as exc:
                error = f"{type(exc).__name__}: {exc}"
                repeated = self.last_error == error
                self.last_error = error
                if isinstance(exc, (InvalidURI, InvalidHandshake)) and _is_fatal_handshake(exc):
                    self.fatal = UplinkFatal(f"server {self.config.url} refused the connection: {exc}")
                    log.error("uplink stopped: %s", self.fatal)
                    return
                if isinstance(exc, _Malformed):
                    self._split_suspect(str(exc))
                # one warning per new error (and every 20th repeat), not a log line per retry of a long outage
                log.log(logging.DEBUG if repeated and self.failures % 20 else logging.WARNING,
                        "uplink to %s: %s; retrying (attempt %d)", self.config.url, error, self.attempts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a programming error: crash loudly, never retry it forever
                self.crashed = exc
                log.critical("uplink crashed (a bug, not a network problem): %r", exc, exc_info=True)
                return
            finally:
                self.stats.set_connected(False)
            if self._acked_in_connection:
                self.failures = 0  # only frames the server stored prove the link works
            delay = backoff_delay(self.failures, self.config.backoff_initial, self.config.backoff_max, self._rng)
            self.failures += 1
            await asyncio.sleep(delay)

    def _split_suspect(self, reason: str) -> None:
        """The server refused a batch as malformed: halve the oldest batch in flight, or drop it if a single frame."""
        if not self._in_flight_order:
            return
        epoch, first, count = self._in_flight_order[0]
        if count <= 1:
            n = self.spool.drop(epoch, first, 1, reason=f"malformed: {reason}")
            self.stats.drop(n, "malformed")
            log.error("server refuses frame epoch %d seq %d as malformed (%s): dropped", epoch, first, reason)
            self._split = None
        else:
            self._split = (epoch, first, count, max(1, count // 2))
            log.warning("server refused a batch as malformed (%s): re-sending epoch %d seq %d+%d in halves",
                        reason, epoch, first, count)

    async def _connection(self) -> None:
        from websockets.asyncio.client import connect

        cfg = self.config
        async with connect(cfg.url, open_timeout=cfg.open_timeout, compression=None, max_size=1 << 20,
                           proxy=None, ping_interval=cfg.ping_interval, ping_timeout=cfg.ping_interval,
                           close_timeout=5) as ws:
            tag = self._connection_tag()
            self._conn_model = tag.hex()
            hello = wire.Hello(tag, cfg.camera_id, cfg.token,
                               **(self.temporal.hello_fields(tag) if self.temporal is not None else {}))
            await ws.send(hello.encode())
            reply = wire.decode(await asyncio.wait_for(ws.recv(), cfg.open_timeout))
            if isinstance(reply, wire.Error):
                _raise_error(reply, cfg.url)
            if not isinstance(reply, wire.Welcome):
                raise _Retry(f"expected WELCOME, got {type(reply).__name__}")
            self.sessions += 1
            if self.temporal is not None:
                self.temporal.start_connection(reply, tag)  # a new connection: the next frame is a KEY frame
            self.stats.set_connected(True)
            log.info("uplink connected to %s as %s", cfg.url, cfg.camera_id)
            self._ws = ws
            try:
                await self._session(ws)
            except _ModelSwitch:
                await ws.close(1000, "switching model")  # a normal close, not an error, in the server's log
                raise
            finally:
                self._ws = None

    async def _session(self, ws) -> None:
        cfg = self.config
        # (epoch, first_seq) -> (seqs not yet acked, send time, count), in send order
        outstanding: dict[tuple[int, int], tuple[set[int], float, int]] = {}
        window = asyncio.Event()
        window.set()
        progress = [time.monotonic()]

        async def sender() -> None:
            sent_upto: tuple[int, int] | None = None
            while True:
                while len(outstanding) >= cfg.max_in_flight:
                    window.clear()
                    await window.wait()
                appended = self.spool.next_seq
                if sent_upto is not None and sent_upto == (self.spool.epoch, appended - 1):
                    rows = []  # everything appended so far is on the wire: no query needed
                else:
                    rows = self.spool.pending(cfg.max_batch, after=sent_upto)
                rows, switch = self._same_model(rows)
                if switch:  # frames of another model are next: finish this connection's, then reconnect under it
                    while outstanding:
                        window.clear()
                        await window.wait()
                    raise _ModelSwitch(f"next frames were captured under model {switch}; reconnecting under it")
                if not rows:
                    # Idle: notify() wakes us (it only pokes the loop while we wait here, not once per frame).
                    self._wake.clear()
                    self._idle = True
                    try:
                        if self.spool.next_seq == appended:  # nothing appended since that query: no lost wake-up
                            self.stats.set_depth(self.spool.depth())
                            await self._wake.wait()
                    finally:
                        self._idle = False
                    if not rows:
                        if cfg.max_delay > 0:
                            await asyncio.sleep(cfg.max_delay)  # let the batch fill instead of a wake per frame
                        continue
                run = self._next_run(rows)
                if run is None:
                    continue  # unencodable frames were dropped
                batch, data = run
                key = (batch.epoch, batch.frames[0].seq)
                if not outstanding:
                    progress[0] = time.monotonic()
                outstanding[key] = ({f.seq for f in batch.frames}, time.monotonic(), len(batch.frames))
                sent_upto = (batch.epoch, batch.frames[-1].seq)
                await ws.send(data)
                if self.temporal is not None:
                    self.temporal.sent(batch, data)

        async def receiver() -> None:
            async for raw in ws:
                if isinstance(raw, str):
                    raise _Retry("server sent a text frame")
                msg = wire.decode(raw)
                if isinstance(msg, (wire.Ack, wire.Reject)):
                    progress[0] = time.monotonic()
                    rtt = self._settle(outstanding, msg)
                    if self.temporal is not None:
                        self.temporal.settled(msg.epoch, msg.first_seq, msg.count)
                        if isinstance(msg, wire.Reject):
                            self.temporal.lost()  # the server may have lost the reference with these frames
                    if isinstance(msg, wire.Ack):
                        self._ack(msg.epoch, msg.first_seq, msg.count)
                        self.stats.ack(msg.count, rtt)
                        self._acked_in_connection += msg.count
                        self.failures = 0
                    else:
                        name = wire.CODE_NAMES.get(msg.code, f"code_{msg.code}")
                        n = self.spool.drop(msg.epoch, msg.first_seq, msg.count, reason=f"{name}: {msg.reason}")
                        self.stats.drop(n, f"rejected_{name}")
                        log.log(logging.ERROR if msg.code == wire.Code.CONFLICT else logging.WARNING,
                                "server rejected frames epoch %d seq %d+%d (%s): %s", msg.epoch, msg.first_seq,
                                msg.count, name, msg.reason)
                    window.set()
                elif isinstance(msg, wire.Error):
                    if msg.code == wire.Code.BAD_MESSAGE:
                        raise _Malformed(msg.reason)
                    _raise_error(msg, cfg.url)
                else:
                    raise _Retry(f"unexpected {type(msg).__name__} from the server")
            raise _Retry(f"server closed the connection ({ws.close_code} {ws.close_reason or ''})".strip())

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(1.0)
                if outstanding and time.monotonic() - progress[0] > cfg.ack_timeout:
                    raise _Retry(f"no ack for {cfg.ack_timeout:.0f} s")

        tasks = [asyncio.create_task(c()) for c in (sender, receiver, watchdog)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._in_flight_order = [(e, f, n) for (e, f), (_, _, n) in outstanding.items()]
        for t in done:
            if t.exception() is not None:
                exc = t.exception()
                if _is_closed(exc):
                    raise _Retry(f"connection lost: {exc}") from exc
                raise exc

    def _connection_tag(self) -> bytes:
        """The model a new connection's HELLO names: that of the oldest spooled frame (a rollout's backlog under the
        old model is sent and decoded under it), else the model the camera runs."""
        oldest = getattr(self.spool, "oldest_model_id", None)
        model_id = oldest() if oldest is not None else ""
        try:
            return bytes.fromhex(model_id) if model_id and len(model_id) == 16 else self.model_tag
        except ValueError:
            return self.model_tag

    def _same_model(self, rows: list[SpooledFrame]) -> tuple[list[SpooledFrame], str | None]:
        """The leading rows captured under this connection's model, and the other model id if none is."""
        conn = self._conn_model
        if not rows or not conn:
            return rows, None
        for k, r in enumerate(rows):  # every row: a switch and a rollback can put A, B, A in one window
            if r.model_id not in ("", conn):
                return rows[:k], (None if k else r.model_id)
        return rows, None

    def _next_run(self, rows: list[SpooledFrame]) -> tuple[wire.Batch, bytes] | None:
        """The next BATCH from pending rows: one run of consecutive seqs, within the byte cap, halved around a batch
        the server refused as malformed. Frames that cannot be encoded at all are dropped (None)."""
        run, size = [], 0
        limit = self.config.max_batch
        if self._split is not None:
            epoch, first, count, split_limit = self._split
            head = rows[0]
            if (head.epoch, head.seq) >= (epoch, first + count):
                self._split = None  # past the suspect range
            elif head.epoch == epoch and first <= head.seq < first + count:
                limit = split_limit
        for f in _runs(rows)[0][:limit]:
            if run and size + len(f.payload) > MAX_BATCH_BYTES:
                break
            run.append(f)
            size += len(f.payload) + 8
        if self.temporal is not None and self.temporal.active:
            batch, bad = self.temporal.batch(run)  # KEY / COND / SAME against this connection's reference
            for f in bad:
                n = self.spool.drop(f.epoch, f.seq, 1, reason="unencodable: spooled payload does not decode")
                self.stats.drop(n, "unencodable")
            if batch is None:
                return None
        else:
            batch = wire.Batch(run[0].epoch, [wire.Frame(f.seq, f.ts_ms, f.payload) for f in run])
        try:
            return batch, batch.encode()
        except ValueError:
            if self.temporal is not None:
                self.temporal.lost()  # frames encoded against the reference were not sent
            for f in run:
                try:
                    wire.Batch(f.epoch, [wire.Frame(f.seq, f.ts_ms, f.payload)]).encode()
                except ValueError as exc:
                    n = self.spool.drop(f.epoch, f.seq, 1, reason=f"unencodable: {exc}")
                    self.stats.drop(n, "unencodable")
            return None

    def _ack(self, epoch: int, first_seq: int, count: int) -> None:
        """Delete acked frames from the spool. The DELETE is batched (Spool.ack_later): a kill -9 before it only
        brings acked frames back, re-sent and acknowledged as duplicates. Not with temporal coding: its store of
        lossy reconstructions forgets a frame at its ack, and a re-sent frame coded differently is a CONFLICT."""
        temporal = self.temporal
        later = getattr(self.spool, "ack_later", None)
        if later is not None and (temporal is None or not getattr(getattr(temporal, "settings", None), "enabled", 1)):
            later(epoch, first_seq, count)
        else:
            self.spool.ack(epoch, first_seq, count)

    @staticmethod
    def _settle(outstanding: dict, msg) -> float | None:
        """Remove acked/rejected seqs from the in-flight batches; returns the send->ack time of a completed batch."""
        rtt = None
        lo, hi = msg.first_seq, msg.first_seq + msg.count
        for key in list(outstanding):
            if key[0] != msg.epoch:
                continue
            remaining, sent, _ = outstanding[key]
            for s in range(max(lo, key[1]), min(hi, key[1] + outstanding[key][2])):
                remaining.discard(s)
            if not remaining:
                del outstanding[key]
                rtt = time.monotonic() - sent
        return rtt


def _raise_error(msg: wire.Error, url: str) -> None:
    if msg.code in FATAL_CODES:
        raise UplinkFatal(f"server {url} refused this camera ({FATAL_CODES[msg.code]}): {msg.reason}")
    raise _Retry(f"server error {msg.code}: {msg.reason}")


def _is_closed(exc: BaseException) -> bool:
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, ConnectionClosed)


def _is_fatal_handshake(exc: BaseException) -> bool:
    """HTTP 401/403 at the WebSocket upgrade (a proxy or the server refusing us) cannot be fixed by retrying."""
    from websockets.exceptions import InvalidStatus, InvalidURI

    if isinstance(exc, InvalidURI):
        return True
    return isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403)
