"""The uplink: one persistent WebSocket to the ingest server, fed from the spool, in its own asyncio thread.

Protocol (taskcodec.wire): HELLO -> WELCOME | ERROR, then BATCH -> ACK | REJECT. Frames are sent in batches of
consecutive seqs (``max_batch`` frames, or whatever arrived within ``max_delay`` seconds; 0 sends each frame at once)
with up to ``max_in_flight`` batches unacknowledged. Frames leave the spool only when acked (or rejected: those are
dropped and counted). On any disconnect the client retries with exponential backoff and full jitter and re-sends
everything still in the spool — the server deduplicates by (epoch, seq). UNAUTHORIZED and UNKNOWN_MODEL are fatal:
retrying cannot fix them, so the uplink stops with the server's reason instead of hammering it.
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
               wire.Code.BAD_MESSAGE: "protocol mismatch"}
MAX_BATCH_BYTES = 512 * 1024


class UplinkFatal(RuntimeError):
    """The server refused this camera for a reason retrying cannot fix."""


class _Retry(Exception):
    """Drop this connection and reconnect after a backoff."""


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
    max_delay: float = 0.05      # seconds to wait for a batch to fill; 0 sends each frame at once
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
        if isinstance(self.token, str):
            self.token = self.token.encode()
        if not 0 < len(self.camera_id.encode()) < 256:
            raise ValueError("camera id must be 1..255 bytes of utf-8")
        if len(self.token) > 255:
            raise ValueError("token must be at most 255 bytes")
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
        self.last_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ws = None
        self._active = False
        self._stop_requested = False
        self._ready = threading.Event()
        self._rng = random.Random()

    # -- thread-side API -------------------------------------------------------------------------------------------
    def start(self) -> "Uplink":
        self._thread = threading.Thread(target=self._thread_main, name=f"uplink-{self.config.camera_id}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def notify(self) -> None:
        """A frame was appended to the spool: wake the sender."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def wait_drained(self, timeout: float) -> bool:
        """Block until the spool is empty (everything acked or dropped), a fatal error, or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.depth() == 0:
                return True
            if self.fatal is not None or not self.running:
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
        failures = 0
        while True:
            sessions_before = self.sessions
            self.attempts += 1
            if self.attempts > 1:
                self.stats.reconnect()
            try:
                await self._connection()
                failures = 0  # a session that ended cleanly (server closed) retries soon
            except UplinkFatal as exc:
                self.fatal = exc
                log.error("uplink stopped: %s", exc)
                return
            except (OSError, asyncio.TimeoutError, wire.WireError, _Retry, Exception) as exc:  # noqa: BLE001
                repeated = self.last_error == f"{type(exc).__name__}: {exc}"
                self.last_error = f"{type(exc).__name__}: {exc}"
                if _is_fatal_handshake(exc):
                    self.fatal = UplinkFatal(f"server {self.config.url} refused the connection: {exc}")
                    log.error("uplink stopped: %s", self.fatal)
                    return
                # one warning per new error (and every 20th repeat), not a log line per retry of a long outage
                log.log(logging.DEBUG if repeated and failures % 20 else logging.WARNING,
                        "uplink to %s: %s; retrying (attempt %d)", self.config.url, self.last_error, self.attempts)
            finally:
                self.stats.set_connected(False)
            if self.sessions > sessions_before:
                failures = 0  # the link worked until it broke: come back quickly, not after the last long backoff
            delay = backoff_delay(failures, self.config.backoff_initial, self.config.backoff_max, self._rng)
            failures += 1
            await asyncio.sleep(delay)

    async def _connection(self) -> None:
        from websockets.asyncio.client import connect

        cfg = self.config
        async with connect(cfg.url, open_timeout=cfg.open_timeout, compression=None, max_size=1 << 20,
                           proxy=None, ping_interval=cfg.ping_interval, ping_timeout=cfg.ping_interval,
                           close_timeout=5) as ws:
            hello = wire.Hello(self.model_tag, cfg.camera_id, cfg.token)
            await ws.send(hello.encode())
            reply = wire.decode(await asyncio.wait_for(ws.recv(), cfg.open_timeout))
            if isinstance(reply, wire.Error):
                _raise_error(reply, cfg.url)
            if not isinstance(reply, wire.Welcome):
                raise _Retry(f"expected WELCOME, got {type(reply).__name__}")
            self.sessions += 1
            self.stats.set_connected(True)
            log.info("uplink connected to %s as %s", cfg.url, cfg.camera_id)
            self._ws = ws
            try:
                await self._session(ws)
            finally:
                self._ws = None

    async def _session(self, ws) -> None:
        outstanding: dict[tuple[int, int], tuple[set[int], float]] = {}
        window = asyncio.Event()
        window.set()
        progress = [time.monotonic()]

        async def sender() -> None:
            sent_upto: tuple[int, int] | None = None
            first_seen: float | None = None
            while True:
                while len(outstanding) >= self.config.max_in_flight:
                    window.clear()
                    await window.wait()
                self._wake.clear()
                rows = self.spool.pending(self.config.max_batch, after=sent_upto)
                self.stats.set_depth(self.spool.depth())
                if not rows:
                    first_seen = None
                    await self._wake.wait()
                    continue
                if len(rows) < self.config.max_batch and self.config.max_delay > 0:
                    now = time.monotonic()
                    first_seen = first_seen or now
                    if now - first_seen < self.config.max_delay:
                        try:
                            await asyncio.wait_for(self._wake.wait(), self.config.max_delay - (now - first_seen))
                        except asyncio.TimeoutError:
                            pass
                        continue
                first_seen = None
                run, size = [], 0
                for f in _runs(rows)[0]:
                    if run and size + len(f.payload) > MAX_BATCH_BYTES:
                        break
                    run.append(f)
                    size += len(f.payload) + 8
                batch = wire.Batch(run[0].epoch, [wire.Frame(f.seq, f.ts_ms, f.payload) for f in run])
                if not outstanding:
                    progress[0] = time.monotonic()
                outstanding[(run[0].epoch, run[0].seq)] = ({f.seq for f in run}, time.monotonic())
                sent_upto = (run[-1].epoch, run[-1].seq)
                await ws.send(batch.encode())

        async def receiver() -> None:
            async for raw in ws:
                if isinstance(raw, str):
                    raise _Retry("server sent a text frame")
                msg = wire.decode(raw)
                if isinstance(msg, (wire.Ack, wire.Reject)):
                    progress[0] = time.monotonic()
                    rtt = self._settle(outstanding, msg)
                    if isinstance(msg, wire.Ack):
                        self.spool.ack(msg.epoch, msg.first_seq, msg.count)
                        self.stats.ack(msg.count, rtt)
                    else:
                        n = self.spool.drop(msg.epoch, msg.first_seq, msg.count)
                        self.stats.drop(n, "rejected")
                        log.warning("server rejected frames epoch %d seq %d+%d (code %d): %s", msg.epoch,
                                    msg.first_seq, msg.count, msg.code, msg.reason)
                    self.stats.set_depth(self.spool.depth())
                    window.set()
                elif isinstance(msg, wire.Error):
                    _raise_error(msg, self.config.url)
                else:
                    raise _Retry(f"unexpected {type(msg).__name__} from the server")
            raise _Retry(f"server closed the connection ({ws.close_code} {ws.close_reason or ''})".strip())

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(1.0)
                if outstanding and time.monotonic() - progress[0] > self.config.ack_timeout:
                    raise _Retry(f"no ack for {self.config.ack_timeout:.0f} s")

        tasks = [asyncio.create_task(c()) for c in (sender, receiver, watchdog)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                exc = t.exception()
                if _is_closed(exc):
                    raise _Retry(f"connection lost: {exc}") from exc
                raise exc

    @staticmethod
    def _settle(outstanding: dict, msg) -> float | None:
        """Remove acked/rejected seqs from the in-flight batches; returns the send->ack time of a completed batch."""
        rtt = None
        seqs = set(range(msg.first_seq, msg.first_seq + msg.count))
        for key in list(outstanding):
            if key[0] != msg.epoch:
                continue
            remaining, sent = outstanding[key]
            remaining -= seqs
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
