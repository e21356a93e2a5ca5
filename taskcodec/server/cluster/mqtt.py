"""MQTT ingress of the scale-out mode, through nats-server's own MQTT listener (no bridge process, no other broker).

A camera whose firmware speaks MQTT 3.1.1 publishes, with QoS 1, to its own topic ``taskcodec/v1/ingest/<camera>``
(a ``.`` in the camera id is written ``~``: nats-server refuses ``.`` in topics); the message body is exactly what
``POST /v1/ingest`` takes, HELLO (with the camera token) || BATCH (taskcodec.wire.encode_ingest_body). Workers
authenticate the camera and model exactly as a gateway does and store idempotently under the unique
(camera, epoch, seq) key.

What PUBACK means, read in nats-server's source (server/mqtt.go, v2.9.10 as in Debian and still on main) and checked by
experiment: for a QoS 1 PUBLISH the server first delivers the message as a plain NATS publish, then stores it with a
synchronous JetStream request into its own stream ``$MQTT_msgs`` (subject ``$MQTT.msgs.<subject>``), and sends PUBACK
only after that store was acknowledged (on a quorum when the stream is replicated); a failed store closes the
connection without PUBACK. A stream of ours capturing ``taskcodec.v1.ingest.>`` would only get the plain publish,
which is neither awaited nor checked: a capturing stream that refused the message (limit reached, no quorum, leader
moving) still let the camera see PUBACK (measured: 3 PUBACKs, 1 message stored). So workers consume from
``$MQTT_msgs`` itself, the copy PUBACK guarantees, through a durable pull consumer filtered on our subjects. The stream
has interest retention: a message stays until our durable consumer acked it (after the PostgreSQL commit), and the
worker creates the stream (same configuration nats-server would use, R3) and the consumer before any camera can
publish, so no message finds the stream without our interest. An MQTT message carries no ``Nats-Msg-Id``: a camera's
re-publish is stored twice in JetStream, and the unique key drops the second copy in PostgreSQL.

Refusals (unknown camera, wrong token, a topic that is not the HELLO's camera, unknown model, malformed body) are
acked and never stored; the worker logs them and publishes a wire ERROR on ``taskcodec/v1/reply/<camera>`` (QoS 0,
for a camera that subscribes: MQTT 3.1.1 has no negative PUBACK).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats
import psycopg
from nats.js.errors import NoStreamResponseError

from taskcodec import wire
from taskcodec.server.auth import verify_token
from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

log = logging.getLogger("taskcodec.worker.mqtt")

MQTT_STREAM = "$MQTT_msgs"              # nats-server's stream of QoS 1/2 MQTT messages
STREAM_PREFIX = "$MQTT.msgs."           # its subjects: this prefix + the NATS subject of the topic
INGEST_SUBJECT = "taskcodec.v1.ingest"  # topic taskcodec/v1/ingest/<camera>
REPLY_SUBJECT = "taskcodec.v1.reply"    # topic taskcodec/v1/reply/<camera>
FILTER = f"{STREAM_PREFIX}{INGEST_SUBJECT}.*"
DURABLE = "tc-mqtt-workers"
ACK_WAIT_S = 10.0
FETCH = 256
AUTH_CACHE_S = 30.0


def topic_token(camera_id: str) -> str:
    """The camera id as one MQTT topic level / NATS subject token (``.`` -> ``~``; ``~`` is not allowed in ids)."""
    return camera_id.replace(".", "~")


def camera_of_subject(subject: str) -> str:
    return subject.rsplit(".", 1)[-1].replace("~", ".")


async def ensure_mqtt_stream(js, replicas: int = 3, timeout: float = 60.0):
    """The ``$MQTT_msgs`` stream (created here if no MQTT client did yet, exactly as nats-server would) and our
    durable pull consumer on it; returns the pull subscription."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                await js.stream_info(MQTT_STREAM)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(StreamConfig(name=MQTT_STREAM, subjects=[STREAM_PREFIX + ">"],
                                                     storage=StorageType.FILE, retention=RetentionPolicy.INTEREST,
                                                     num_replicas=replicas))
                except nats.js.errors.BadRequestError:
                    pass  # created meanwhile by nats-server (first MQTT client) or another worker
            return await js.pull_subscribe(FILTER, durable=DURABLE, stream=MQTT_STREAM,
                                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                                                 max_ack_pending=20000))
        except (asyncio.TimeoutError, nats.js.errors.ServiceUnavailableError, NoStreamResponseError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"JetStream did not become available within {timeout:.0f} s: {exc!r}") from exc
            await asyncio.sleep(0.5)


@dataclass
class Authenticated:
    """An MQTT message that passed authentication, shaped like a gateway's JetStream message for worker.process."""
    data: bytes                                   # the BATCH
    headers: dict[str, str] = field(default_factory=dict)  # camera, model


class MqttAuth:
    """Checks each message as a gateway checks a connection's HELLO: camera known, token right, model served; and the
    topic must be the HELLO's camera (a camera publishes only under its own topic)."""

    def __init__(self, store: PgStore, model_tags: set[bytes]):
        self.store = store
        self.model_tags = model_tags
        self._cache: dict[str, tuple[str, float]] = {}

    def _token_hash(self, camera_id: str) -> str | None:
        cached = self._cache.get(camera_id)
        if cached and time.monotonic() - cached[1] < AUTH_CACHE_S:
            return cached[0]
        stored = self.store.token_hash(camera_id)
        if stored is not None:
            self._cache[camera_id] = (stored, time.monotonic())
        return stored

    def check(self, subject: str, body: bytes) -> tuple[Authenticated | None, str, wire.Error | None]:
        """(the message for storage or None, the topic's camera, the refusal to send back or None)."""
        topic_camera = camera_of_subject(subject)
        try:
            hello, rest = wire.split_ingest_body(body)
            batch = wire.decode(rest)
        except wire.WireError as exc:
            return None, topic_camera, wire.Error(wire.Code.BAD_MESSAGE, f"bad ingest body: {exc}")
        if type(batch) is not wire.Batch:  # no temporal session over MQTT (no connection state between messages)
            return None, topic_camera, wire.Error(wire.Code.BAD_MESSAGE, "an MQTT message is HELLO || BATCH")
        if hello.camera_id != topic_camera:
            return None, topic_camera, wire.Error(wire.Code.UNAUTHORIZED, "the topic is not the HELLO's camera")
        stored = self._token_hash(hello.camera_id)
        if stored is None or not verify_token(hello.token, stored):
            return None, topic_camera, wire.Error(wire.Code.UNAUTHORIZED, "unknown camera or wrong token")
        if hello.model_tag not in self.model_tags:
            return None, topic_camera, wire.Error(wire.Code.UNKNOWN_MODEL,
                                                  f"model {hello.model_tag.hex()} is not served here")
        return Authenticated(rest, {"camera": hello.camera_id, "model": hello.model_tag.hex()}), topic_camera, None


def handle(messages: list, auth: MqttAuth, models: dict, store: PgStore) -> tuple[int, int, list]:
    """Authenticate, then decode, classify and store like a gateway's messages (worker.process). Returns
    (frames stored, frames refused by the decoder, [(camera, refusal)])."""
    from taskcodec.server.cluster.worker import process

    accepted, refusals = [], []
    for msg in messages:
        ok, camera, refusal = auth.check(msg.subject, msg.data)
        if ok is not None:
            accepted.append(ok)
        else:
            refusals.append((camera, refusal))
    stored, refused = process(accepted, models, store) if accepted else (0, 0)
    return stored, refused, refusals


async def consume_mqtt(nc, sub, pg_dsn: str, models: dict, stop: asyncio.Event) -> None:
    """The worker's second loop: MQTT messages from ``$MQTT_msgs`` -> PostgreSQL; acked only after the commit."""
    store = auth = None
    while not stop.is_set():
        if store is None:
            try:
                store = await asyncio.to_thread(PgStore, pg_dsn)
                auth = MqttAuth(store, {bytes.fromhex(tag) for tag in models})
            except PgStoreError as exc:
                log.warning("store unavailable, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
        try:
            messages = await sub.fetch(FETCH, timeout=0.5)
        except asyncio.TimeoutError:  # nats-py raises the plain one too (fetch deadline passed under CPU load)
            continue
        except (nats.js.errors.APIError, nats.errors.Error) as exc:  # leader election after a node loss: retry
            log.warning("MQTT fetch failed, retrying: %s", exc)
            await asyncio.sleep(0.5)
            continue
        try:
            stored, refused, refusals = await asyncio.to_thread(handle, messages, auth, models, store)
        except Exception as exc:  # noqa: BLE001 (the worker's other loop goes on; these messages stay in JetStream)
            if isinstance(exc, psycopg.Error):
                log.warning("store failed (%s); MQTT messages will be redelivered", exc)
            else:
                log.exception("MQTT batch failed; its messages will be redelivered")
            store.close()
            store = None
            for msg in messages:
                await msg.nak(delay=0.5)
            continue
        for msg in messages:
            await msg.ack()
        for camera, refusal in refusals:
            log.warning("refused mqtt camera=%s reason=%s", camera, wire.CODE_NAMES.get(refusal.code, refusal.code))
            try:
                await nc.publish(f"{REPLY_SUBJECT}.{topic_token(camera)}", refusal.encode())
            except nats.errors.Error:
                pass  # the reply is a courtesy (QoS 0); the refusal is logged
        if refused:
            log.warning("refused mqtt frames=%d reason=undecodable-or-unknown-model", refused)
    if store is not None:
        store.close()
