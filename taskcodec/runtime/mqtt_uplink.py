"""Camera side of the MQTT ingress (`taskcodec mqtt-capture`): for cameras whose firmware speaks MQTT 3.1.1.

Each message is the body ``POST /v1/ingest`` takes, HELLO (camera token) || BATCH, published with QoS 1 to the
camera's own topic ``taskcodec/v1/ingest/<camera>`` on a nats-server MQTT listener (``taskcodec cluster up`` prints
one per node). PUBACK arrives only once nats-server stored the message in its replicated JetStream stream
(taskcodec.server.cluster.mqtt explains why that, and not a capturing stream, is what the workers read). The workers'
refusals (wrong token, unknown model…) come back as wire ERROR messages on ``taskcodec/v1/reply/<camera>`` (QoS 0),
which the uplinks here subscribe to.

`mqtt-capture` uses the camera runtime's durable spool (taskcodec.runtime.spool, the one `runtime capture` uses):

- every captured frame is appended to the spool (fsync'd with ``--spool-sync full``) before it can be published; its
  (epoch, seq) come from the spool, so the epoch survives restarts and seqs continue across them;
- :class:`SpooledMqttUplink` publishes what the spool holds, in (epoch, seq) order, up to ``--frames-per-message``
  consecutive frames per message and up to ``--max-in-flight`` messages awaiting PUBACK; a frame leaves the spool only
  once the message carrying it got its PUBACK, and ``--refusal-grace`` seconds (3) later if no refusal came meanwhile;
- a lost connection, a broker that is down or refuses the connection, or a PUBACK that does not come within
  ``ack_timeout`` ends the connection: a new one is made after an exponential backoff with jitter (as the WebSocket
  uplink's), and everything still in the spool is published again with the same (epoch, seq). Re-sends are harmless:
  PostgreSQL's unique (camera, epoch, seq) key keeps one copy. Meanwhile capture goes on spooling, up to the spool's
  bounds (``--spool-max-frames`` / ``--spool-max-bytes`` / a full disk: the oldest frames are dropped and counted);
- a worker's refusal of this camera (UNAUTHORIZED, UNKNOWN_MODEL, BAD_MESSAGE) stops the uplink and the capture
  (exit 1). MQTT 3.1.1 has no negative acknowledgement: PUBACK comes once nats-server stored the message, and a
  refusal later, on the reply topic. Hence the refusal grace: the frames PUBACKed within it (all of them, when the
  refusal takes less than the grace to arrive) stay in the spool, and a run with the right token or bundle sends
  them. A refusal slower than the grace loses the frames PUBACKed before it (not stored: they were refused).

:class:`MqttUplink` is the minimal synchronous publisher (one batch, wait for PUBACK; no spool) for tests and tools.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import typer

from taskcodec import wire

log = logging.getLogger(__name__)

FATAL_CODES = {wire.Code.UNAUTHORIZED: "unauthorized", wire.Code.UNKNOWN_MODEL: "unknown model",
               wire.Code.BAD_MESSAGE: "bad message"}
MAX_MESSAGE_BYTES = 512 * 1024   # well under nats-server's default max_payload (1 MiB)
# CONNACK refusals that retrying cannot fix (MQTT 3.1.1 return codes 1, 4, 5 as paho's reason codes): unacceptable
# protocol version, bad user name or password, not authorized
FATAL_CONNACK = {132, 134, 135}


def topic_token(camera_id: str) -> str:
    """The camera id as one topic level: nats-server refuses ``.`` in MQTT topics, so ``.`` is written ``~``
    (the server side, taskcodec.server.cluster.mqtt, maps it back)."""
    return camera_id.replace(".", "~")


def ingest_topic(camera_id: str) -> str:
    return f"taskcodec/v1/ingest/{topic_token(camera_id)}"


def reply_topic(camera_id: str) -> str:
    return f"taskcodec/v1/reply/{topic_token(camera_id)}"


def parse_broker(broker_url: str) -> tuple[str, int, bool]:
    """``mqtt://HOST:PORT`` / ``mqtts://HOST:PORT`` -> (host, port, tls); ValueError for anything else."""
    url = urlparse(broker_url)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise ValueError(f"broker URL {broker_url!r}: mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"bad port in broker URL {broker_url!r}") from None
    return url.hostname, port or (8883 if url.scheme == "mqtts" else 1883), url.scheme == "mqtts"


class MqttUplinkError(RuntimeError):
    """The broker did not acknowledge a message in time."""


class MqttUplink:
    """One camera's MQTT connection: ``send(batch)`` returns once the broker acknowledged (PUBACK) the message.
    No spool: frames not acknowledged are the caller's (tests and tools; `mqtt-capture` uses SpooledMqttUplink)."""

    def __init__(self, broker_url: str, camera_id: str, token: bytes, model_tag: bytes, timeout: float = 10.0,
                 client_id: str | None = None):
        import paho.mqtt.client as mqtt

        host, port, tls = parse_broker(broker_url)
        self.hello = wire.Hello(model_tag, camera_id, token)
        self.topic = ingest_topic(camera_id)
        self.timeout = timeout
        self.refusals: list[wire.Error] = []
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"tc-{camera_id}",
                                  clean_session=True)
        if tls:
            self.client.tls_set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 5)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise MqttUplinkError(f"no CONNACK from {broker_url} within {timeout} s")

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if not reason.is_failure:
            client.subscribe(reply_topic(self.hello.camera_id), qos=0)
            self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        reply = _decode_reply(message.payload)
        if reply is not None:
            self.refusals.append(reply)

    def send(self, batch: wire.Batch, attempts: int = 5) -> None:
        """Publish HELLO || BATCH with QoS 1 until PUBACK (re-publishing after a timeout); raises after ``attempts``."""
        body = wire.encode_ingest_body(self.hello, batch)
        for _ in range(attempts):
            info = self.client.publish(self.topic, body, qos=1)
            try:
                info.wait_for_publish(self.timeout)
            except (RuntimeError, ValueError):
                time.sleep(0.2)  # not connected right now (paho reconnects in its loop thread)
                continue
            if info.is_published():
                return
        raise MqttUplinkError(f"no PUBACK for {self.topic} after {attempts} attempts")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _decode_reply(payload: bytes) -> wire.Error | None:
    try:
        reply = wire.decode(payload)
    except wire.WireError:
        return None
    return reply if isinstance(reply, wire.Error) else None


# -- the spooled uplink ---------------------------------------------------------------------------------------------

class _Retry(Exception):
    """End this connection; reconnect after a backoff and publish the spool's frames again."""


@dataclass
class MqttUplinkConfig:
    broker: str
    camera_id: str
    token: bytes
    frames_per_message: int = 1
    max_in_flight: int = 8           # messages awaiting PUBACK (QoS 1)
    max_delay: float = 1.0           # seconds a partial message may wait for more frames
    backoff_initial: float = 0.25
    backoff_max: float = 15.0
    open_timeout: float = 10.0       # TCP connect + CONNACK
    ack_timeout: float = 30.0        # no PUBACK for this long with messages outstanding -> reconnect and re-send
    # PUBACKed frames leave the spool only this long after their PUBACK, if no refusal came meanwhile (MQTT 3.1.1 has
    # no negative ack: a worker's refusal arrives later, on the reply topic), so a wrong token or bundle loses nothing
    refusal_grace: float = 3.0
    keepalive: int = 30
    client_id: str | None = None

    def __post_init__(self) -> None:
        self.host, self.port, self.tls = parse_broker(self.broker)
        self.token = wire.check_identity(self.camera_id, self.token)
        if not 1 <= self.frames_per_message <= wire.MAX_FRAMES_PER_BATCH:
            raise ValueError(f"frames per message must be 1..{wire.MAX_FRAMES_PER_BATCH}")
        if not 1 <= self.max_in_flight <= 65535:
            raise ValueError("max in flight must be 1..65535")
        if self.max_delay < 0 or self.backoff_max <= 0 or self.refusal_grace < 0:
            raise ValueError("max delay and refusal grace must be >= 0 and backoff max > 0 seconds")


class SpooledMqttUplink:
    """Publishes a :class:`~taskcodec.runtime.spool.Spool`'s frames over MQTT QoS 1 in its own thread; frames leave
    the spool ``refusal_grace`` seconds after their PUBACK. :meth:`start`, :meth:`notify` after appends,
    :meth:`wait_drained`, :meth:`stop`."""

    def __init__(self, spool, model_tag: bytes, config: MqttUplinkConfig, stats=None):
        from taskcodec.runtime.status import RuntimeStats

        self.spool = spool
        self.config = config
        self.hello = wire.Hello(model_tag, config.camera_id, config.token)
        self.topic = ingest_topic(config.camera_id)
        self.stats = stats or RuntimeStats(camera_id=config.camera_id)
        self.fatal: str | None = None            # a worker (or the broker's CONNACK) refused this camera: the reason
        self.crashed: BaseException | None = None
        self.refusals: list[wire.Error] = []
        self.attempts = 0
        self.failures = 0                        # consecutive connections without a PUBACK (drives the backoff)
        self.messages = 0                        # messages PUBACKed
        self.last_error: str | None = None
        self.flush_partial = False               # the capture ended: publish partial messages at once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    def start(self) -> "SpooledMqttUplink":
        self._thread = threading.Thread(target=self._main, name=f"mqtt-uplink-{self.config.camera_id}", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """A frame was appended (for the capture loop's symmetry with Uplink: the uplink thread polls the spool every
        50 ms while it waits on the network)."""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_drained(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Block until the spool is empty, a refusal, a crash, ``stop``, or the timeout; True if it emptied."""
        self.flush_partial = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.spool.depth() == 0:
                return True
            if self.fatal is not None or not self.running:
                break
            time.sleep(0.02)
        return self.spool.depth() == 0

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the uplink thread -------------------------------------------------------------------------------------------
    def _main(self) -> None:
        from taskcodec.runtime.uplink import backoff_delay

        cfg = self.config
        while not self._stop.is_set() and self.fatal is None:
            self.attempts += 1
            if self.attempts > 1:
                self.stats.reconnect()
            acked_before = self.stats.acked
            try:
                self._connection()
                continue  # stopped or refused
            except _Retry as exc:
                error = str(exc)
            except Exception as exc:  # a programming error: stop loudly, never retry it forever
                self.crashed = exc
                log.critical("MQTT uplink crashed (a bug, not a network problem): %r", exc, exc_info=True)
                return
            finally:
                self.stats.set_connected(False)
            if self._stop.is_set():
                return
            if self.stats.acked > acked_before:
                self.failures = 0  # only PUBACKs prove the link works
            if self._down_since is None:
                self._down_since = time.monotonic()
            delay = backoff_delay(self.failures, cfg.backoff_initial, cfg.backoff_max)
            repeated = error == self.last_error
            self.last_error = error
            # one warning per new error (and every 20th repeat), not a line per retry of a long outage
            log.log(logging.DEBUG if repeated and self.failures % 20 else logging.WARNING,
                    "MQTT broker %s: %s; %d frame(s) wait in the spool (capture goes on spooling); retrying in "
                    "%.1f s (attempt %d)", cfg.broker, error, self.spool.depth(), delay, self.attempts)
            self.failures += 1
            self._stop.wait(delay)

    def _connection(self) -> None:
        import paho.mqtt.client as mqtt

        cfg = self.config
        state: dict = {"connack": None, "acked": []}
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id or f"tc-{cfg.camera_id}",
                             clean_session=True)
        client.connect_timeout = cfg.open_timeout
        client.max_inflight_messages_set(cfg.max_in_flight)
        if cfg.tls:
            client.tls_set()
        client.on_connect = lambda c, u, flags, reason, props=None: state.__setitem__("connack", reason)
        client.on_publish = lambda c, u, mid, reason=None, props=None: state["acked"].append(mid)
        client.on_message = self._on_message
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
        except OSError as exc:
            raise _Retry(f"unreachable ({exc.strerror or exc})") from None
        try:
            deadline = time.monotonic() + cfg.open_timeout
            while state["connack"] is None:
                rc = client.loop(0.05)
                if state["connack"] is not None:
                    break  # a refusing CONNACK closes the connection in the same loop() call
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _Retry(f"connection lost before CONNACK ({mqtt.error_string(rc)})")
                if time.monotonic() > deadline:
                    raise _Retry(f"no CONNACK within {cfg.open_timeout:g} s")
            reason = state["connack"]
            if reason.is_failure:
                if reason.value in FATAL_CONNACK:  # retrying cannot fix these; "server unavailable" is retried
                    self.fatal = f"broker {cfg.broker} refused the connection: {reason}"
                    log.error("MQTT uplink stopped: %s", self.fatal)
                    return
                raise _Retry(f"refused the connection ({reason})")
            client.subscribe(reply_topic(cfg.camera_id), qos=0)  # before the first PUBLISH: in order on this link
            self.stats.set_connected(True)
            if self._down_since is not None:
                log.warning("MQTT broker %s: connected again after %.1f s; publishing the %d spooled frame(s)",
                            cfg.broker, time.monotonic() - self._down_since, self.spool.depth())
                self._down_since = None
            else:
                log.info("MQTT broker %s: connected as %s", cfg.broker, cfg.camera_id)
            self._session(client, state)
        finally:
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - closing a connection that is already broken
                pass

    def _session(self, client, state: dict) -> None:
        import paho.mqtt.client as mqtt

        cfg, spool = self.config, self.spool
        outstanding: dict[int, tuple[int, int, int, float]] = {}   # mid -> (epoch, first seq, count, send time)
        acked = state["acked"]
        # PUBACKed, leaving the spool once the refusal grace is over: (deadline, epoch, first seq, count), in order.
        # Left in the spool when this connection ends (re-published by the next one: the unique key dedups them)
        # and when a refusal stops the uplink (sent again by a run with the right token or bundle).
        probation: deque[tuple[float, int, int, int]] = deque()
        sent_upto: tuple[int, int] | None = None   # None: from the spool's oldest frame (a new connection)
        partial_since: float | None = None
        while not self._stop.is_set() and self.fatal is None:
            rc = client.loop(0.05)   # PUBACKs, replies, keepalive; returns at once when something arrives
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise _Retry(f"connection lost ({mqtt.error_string(rc)})")
            now = time.monotonic()
            while acked:
                done = outstanding.pop(acked.pop(0), None)
                if done is not None:
                    epoch, first, count, sent = done
                    probation.append((now + cfg.refusal_grace, epoch, first, count))
                    self.stats.ack(count, now - sent)
                    self.messages += 1
            while probation and probation[0][0] <= now and self.fatal is None:
                _, epoch, first, count = probation.popleft()
                spool.ack_later(epoch, first, count)   # the DELETE is batched: a crash only re-sends these
            self.stats.set_depth(spool.depth())
            while len(outstanding) < cfg.max_in_flight and self.fatal is None:
                if sent_upto is not None and sent_upto == (spool.epoch, spool.next_seq - 1):
                    break   # everything appended so far is on the wire
                rows = spool.pending(cfg.frames_per_message, after=sent_upto)
                if not rows:
                    break
                run = rows[:1]   # one message carries consecutive seqs of one epoch
                for f in rows[1:]:
                    if (f.epoch, f.seq) != (run[-1].epoch, run[-1].seq + 1):
                        break
                    run.append(f)
                if len(run) < cfg.frames_per_message and len(run) == len(rows) and not self.flush_partial:
                    partial_since = partial_since or now
                    if now - partial_since < cfg.max_delay:
                        break   # let the message fill
                partial_since = None
                body = self._body(run)
                if body is None:
                    continue    # unencodable frames were dropped
                run, data = body
                info = client.publish(self.topic, data, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise _Retry(f"publish failed ({mqtt.error_string(info.rc)})")
                outstanding[info.mid] = (run[0].epoch, run[0].seq, len(run), now)
                sent_upto = (run[-1].epoch, run[-1].seq)
            if outstanding and now - min(t for *_, t in outstanding.values()) > cfg.ack_timeout:
                raise _Retry(f"no PUBACK within {cfg.ack_timeout:g} s")

    def _body(self, run: list) -> tuple[list, bytes] | None:
        """HELLO || BATCH of the leading frames of ``run`` within the message size cap; frames that cannot be encoded
        at all are dropped from the spool and counted (None)."""
        size, k = 0, 0
        for k, f in enumerate(run):
            size += len(f.payload) + 16
            if k and size > MAX_MESSAGE_BYTES:
                break
        else:
            k = len(run)
        run = run[:k]
        try:
            batch = wire.Batch(run[0].epoch, [wire.Frame(f.seq, f.ts_ms, f.payload) for f in run])
            return run, wire.encode_ingest_body(self.hello, batch)
        except ValueError:
            dropped = 0
            for f in run:
                try:
                    wire.Batch(f.epoch, [wire.Frame(f.seq, f.ts_ms, f.payload)]).encode()
                except ValueError as exc:
                    dropped += 1
                    self.stats.drop(self.spool.drop(f.epoch, f.seq, 1, reason=f"unencodable: {exc}"), "unencodable")
            return None if dropped or len(run) == 1 else self._body(run[:1])

    def _on_message(self, client, userdata, message) -> None:
        reply = _decode_reply(message.payload)
        if reply is None:
            return
        self.refusals.append(reply)
        reason = FATAL_CODES.get(reply.code)
        if reason is not None and self.fatal is None:
            self.fatal = f"the cluster refused camera {self.config.camera_id!r} ({reason}): {reply.reason}"
            log.error("MQTT uplink stopped: %s", self.fatal)
        elif reason is None:
            log.warning("the cluster refused a message (code %s): %s", wire.CODE_NAMES.get(reply.code, reply.code),
                        reply.reason)


# -- the command ----------------------------------------------------------------------------------------------------

def mqtt_capture(device: str = typer.Option(..., "--device", help="source URI, e.g. virtual://fashion-mnist"),
                 broker: str = typer.Option(..., "--broker", help="mqtt://HOST:PORT of a nats-server MQTT listener"),
                 camera_id: str = typer.Option(..., "--camera-id"),
                 bundle: Optional[Path] = typer.Option(None, "--bundle", help="model bundle (default: embedded)"),
                 token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                           help="file holding the token (or $TASKCODEC_TOKEN)"),
                 fps: float = typer.Option(0.0, "--fps", help="frames per second (0: as fast as the source gives)"),
                 frames_per_message: int = typer.Option(1, "--frames-per-message", min=1,
                                                        max=wire.MAX_FRAMES_PER_BATCH,
                                                        help="consecutive spooled frames per MQTT message"),
                 max_delay: float = typer.Option(1.0, "--max-delay", min=0,
                                                 help="seconds a partly filled message waits for more frames"),
                 max_in_flight: int = typer.Option(8, "--max-in-flight", min=1, max=65535,
                                                   help="messages published and awaiting PUBACK"),
                 count: int = typer.Option(0, "--count", min=0, help="stop after this many frames (0: source end)"),
                 spool: str = typer.Option("~/.cache/taskcodec/mqtt-spool", "--spool",
                                           help="spool folder (durable store-and-forward; keeps the epoch and "
                                                "unacknowledged frames across restarts)"),
                 spool_max_frames: int = typer.Option(100_000, "--spool-max-frames", min=1,
                                                      help="spool bound in frames; when full the oldest are dropped"),
                 spool_max_bytes: int = typer.Option(256 * 1024 * 1024, "--spool-max-bytes", min=256 * 1024,
                                                     help="spool bound in bytes on disk (database + WAL); when "
                                                          "full, or the disk is, the oldest frames are dropped"),
                 spool_sync: str = typer.Option("full", "--spool-sync",
                                                help="full (every frame fsync'd before it can be published) or "
                                                     "normal (no fsync: survives kill -9, not power loss)"),
                 backoff_max: float = typer.Option(15.0, "--backoff-max", min=0.1,
                                                   help="longest wait between reconnection attempts (seconds)"),
                 refusal_grace: float = typer.Option(3.0, "--refusal-grace", min=0,
                                                     help="seconds a PUBACKed frame stays spooled in case the "
                                                          "workers refuse it (MQTT has no negative ack)"),
                 drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0,
                                                     help="at the end, seconds to wait for PUBACKs"),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="no status line"),
                 verbose: bool = typer.Option(False, "--verbose", "-v", help="log connection and spool events"),
                 report: Optional[Path] = typer.Option(None, "--report", help="write a JSON summary here")) -> None:
    """Capture, encode, spool and publish frames over MQTT QoS 1 (one message = HELLO || BATCH) to the scale-out
    cluster. Frames leave the spool only at PUBACK; a broker outage is waited out (with backoff) while capture goes
    on spooling, and a restart on the same --spool publishes what was not acknowledged, under the same (epoch, seq)."""
    from taskcodec.bundle import BundleError, load_bundle
    from taskcodec.runtime.cli import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_FATAL, EXIT_NOTHING_DELIVERED, TOKEN_ENV
    from taskcodec.runtime.encoder import EncoderError, FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor, PreprocessError
    from taskcodec.runtime.sources import SourceError, open_source
    from taskcodec.runtime.spool import Spool, SpoolError
    from taskcodec.runtime.status import RuntimeStats, StatusLine

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    def bad(message: str) -> typer.Exit:
        typer.secho(f"error: {message}", err=True, fg="red")
        return typer.Exit(EXIT_BAD_INPUT)

    if spool_sync not in ("full", "normal"):
        raise bad(f"--spool-sync must be full or normal, got {spool_sync!r}")
    try:
        token = (token_file.read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "")).encode()
    except OSError as exc:
        raise bad(f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    if not token:
        raise bad(f"no token (--token-file or ${TOKEN_ENV})")
    try:
        cfg = MqttUplinkConfig(broker, camera_id, token, frames_per_message=frames_per_message,
                               max_in_flight=max_in_flight, max_delay=max_delay, backoff_max=backoff_max,
                               refusal_grace=refusal_grace)
        b = load_bundle(bundle)
        pre, enc = Preprocessor(b.input), FrameEncoder(b)
        source = open_source(device, fps=fps or None)
    except (ValueError, BundleError, EncoderError, PreprocessError, SourceError, OSError) as exc:
        raise bad(str(exc)) from None
    try:
        sp = Spool(spool, spool_max_frames, max_bytes=spool_max_bytes, camera_id=camera_id, model_id=b.model_id,
                   sync=spool_sync)
    except SpoolError as exc:
        source.close()
        raise bad(str(exc)) from None
    stats = RuntimeStats(camera_id=camera_id)
    pending_at_start = sp.depth()
    stats.set_depth(pending_at_start)
    if pending_at_start:
        typer.echo(f"{pending_at_start} frame(s) not acknowledged by an earlier run wait in {spool}: they are "
                   f"published first (epoch {sp.epoch})", err=True)
    uplink = SpooledMqttUplink(sp, b.model_tag, cfg, stats).start()
    status = None if quiet else StatusLine(stats).start()
    stopping = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())  # unsent frames stay spooled
    spec = b.input
    captured, started = 0, time.monotonic()
    try:
        try:
            with source:
                for frame in source:
                    if stopping.is_set() or uplink.fatal is not None or uplink.crashed is not None:
                        break
                    t0 = time.perf_counter()
                    image = pre(frame.image).reshape(1, spec.height, spec.width, spec.channels)
                    t1 = time.perf_counter()
                    payload = enc.encode(image)[0]
                    t2 = time.perf_counter()
                    sp.append(frame.ts_ms, payload)   # durable before it can be published (None: disk full, counted)
                    uplink.notify()
                    stats.frame(len(payload), {"preprocess": t1 - t0, "inference": enc.last_inference_s,
                                               "coding": enc.last_coding_s, "spool": time.perf_counter() - t2})
                    stats.drop(sp.made_room - stats.drops.get("spool_full", 0), "spool_full")
                    stats.drop(sp.unstored - stats.drops.get("disk_full", 0), "disk_full")
                    stats.set_depth(sp.depth())
                    captured += 1
                    if count and captured >= count:
                        break
        except KeyboardInterrupt:
            stopping.set()
            typer.secho("interrupted; unsent frames stay in the spool", err=True)
        if uplink.fatal is None and uplink.crashed is None and not stopping.is_set():
            uplink.wait_drained(drain_timeout + cfg.refusal_grace, stopping)
        uplink.stop()
    finally:
        if status is not None:
            status.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sp.flush_acks()
    depth, dropped = sp.depth(), sp.dropped
    summary = {"camera_id": camera_id, "epoch": sp.epoch, "next_seq": sp.next_seq, "captured": captured,
               "acked": stats.acked, "messages": uplink.messages, "spool_depth": depth, "drained": depth == 0,
               "reconnects": stats.reconnects, "seconds": round(time.monotonic() - started, 3), "drops": sp.counters(),
               "refusals": [{"code": wire.CODE_NAMES.get(r.code, r.code), "reason": r.reason}
                            for r in uplink.refusals]}
    sp.close()
    if report:
        report.write_text(json.dumps(summary, indent=1))
    typer.echo(f"{captured} frames captured, {stats.acked} acknowledged (PUBACK) by {broker} in {uplink.messages} "
               f"message(s), {depth} left in the spool, {dropped} dropped; {len(uplink.refusals)} refusal(s)")
    if uplink.crashed is not None:
        typer.secho(f"error: the MQTT uplink crashed: {uplink.crashed!r} (a bug: see the traceback above)", err=True,
                    fg="red")
        raise typer.Exit(EXIT_CRASH)
    if uplink.fatal is not None:
        typer.secho(f"error: {uplink.fatal}; {depth} frame(s) stay in {spool}", err=True, fg="red")
        raise typer.Exit(EXIT_FATAL)
    if uplink.refusals:
        typer.secho(f"refused: {uplink.refusals[0].reason}", err=True, fg="red")
        raise typer.Exit(EXIT_FATAL)
    if depth:
        typer.echo(f"{depth} frames not acknowledged yet; they stay in {spool} and are published next run")
    if stats.acked == 0 and (captured > 0 or pending_at_start > 0):
        typer.secho(f"error: nothing was delivered to {broker} ({captured} captured, {depth} waiting in the spool; "
                    f"last error: {uplink.last_error})", err=True, fg="red")
        raise typer.Exit(EXIT_NOTHING_DELIVERED)


def register(app: typer.Typer) -> None:
    app.command("mqtt-capture")(mqtt_capture)
