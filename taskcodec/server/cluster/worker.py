"""Decode/classify worker of the scale-out mode: a durable JetStream pull consumer writing to PostgreSQL.

Each fetched batch of messages is decoded, classified in one ONNX call and inserted in one transaction with
insert-or-ignore; only after the commit are the messages acked to JetStream. A worker killed at any moment leaves its
un-acked messages to be redelivered (after ``ACK_WAIT_S``) to any worker, and the unique key makes the second insert a
no-op. Workers hold no state, so more of them is more throughput.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats
import numpy as np

from taskcodec import wire
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, decompress
from taskcodec.coding.stream import StreamError
from taskcodec.server.classify import Classifier
from taskcodec.server.cluster.gateway import STREAM, SUBJECT, ensure_stream
from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

log = logging.getLogger("taskcodec.worker")

DURABLE = "tc-workers"
ACK_WAIT_S = 10.0
FETCH = 256
COMPACT_INTERVAL_S = 300.0  # how often a worker packs closed camera-hours (0: this worker never compacts)
COMPACT_SETTLE_S = 600.0    # only hours that closed at least this long ago


class Model:
    """What a worker needs of one bundle: its decoder and classifier."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.coder = RangeCoder(bundle.tables)
        self.classifier = Classifier(bundle)


def process(messages: list, models: dict[str, Model], store: PgStore) -> tuple[int, int]:
    """Decode, classify and store ``messages``; returns (frames stored, frames refused). Raises on store errors."""
    now = int(time.time() * 1000)
    rows, refused = [], 0
    by_model: dict[str, list] = {}
    for msg in messages:
        camera, model = msg.headers["camera"], msg.headers["model"]
        m = models.get(model)
        batch = wire.decode(msg.data)
        for f in batch.frames:
            if m is None:
                refused += 1
                continue
            try:
                sym = decompress(f.payload, m.coder, m.bundle.model_tag)
            except StreamError:
                refused += 1  # the gateway does not decode: a bad payload is counted here, never stored
                continue
            by_model.setdefault(model, []).append((camera, batch.epoch, f, sym))
    for model, items in by_model.items():
        m = models[model]
        pred, conf = m.classifier.predict(np.stack([s for *_, s in items]))
        rows += [(cam, epoch, f.seq, f.ts_ms, now, m.bundle.model_id, f.payload, int(p), float(c))
                 for (cam, epoch, f, _), p, c in zip(items, pred.tolist(), conf.tolist())]
    return store.store_frames(rows), refused


async def run_worker(nats_urls: list[str], pg_dsn: str, bundles: list[Bundle], stop: asyncio.Event | None = None,
                     ready_file: str | None = None, compact_interval_s: float = COMPACT_INTERVAL_S,
                     compact_settle_s: float = COMPACT_SETTLE_S) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    models = {b.model_tag.hex(): Model(b) for b in bundles}
    nc = await nats.connect(servers=nats_urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream(timeout=10.0)
    await ensure_stream(js)
    sub = await js.pull_subscribe(SUBJECT, durable=DURABLE, stream=STREAM,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                                        max_ack_pending=20000))
    store = None
    stop = stop or asyncio.Event()
    compaction: asyncio.Task | None = None
    next_compaction = time.monotonic() + min(compact_interval_s, 5.0)
    from taskcodec.server.cluster import mqtt  # MQTT cameras (nats-server's MQTT listener): a second consumer loop

    mqtt_task = asyncio.create_task(mqtt.consume_mqtt(nc, await mqtt.ensure_mqtt_stream(js), pg_dsn, models, stop))
    if ready_file:
        from pathlib import Path

        Path(ready_file).write_text("ready")
    while not stop.is_set():
        if store is None:
            try:
                store = await asyncio.to_thread(PgStore, pg_dsn)
            except PgStoreError as exc:
                log.warning("store unavailable, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
        if compact_interval_s > 0 and time.monotonic() >= next_compaction and (compaction is None or
                                                                                 compaction.done()):
            # closed camera-hours into packed blocks, on a connection of its own in a thread (one worker of the
            # cluster at a time: the others find the compactor lock taken and skip)
            next_compaction = time.monotonic() + compact_interval_s
            compaction = asyncio.create_task(asyncio.to_thread(_compact_once, pg_dsn, compact_settle_s))
        try:
            messages = await sub.fetch(FETCH, timeout=0.5)
        except asyncio.TimeoutError:  # nats-py raises the plain one too (fetch deadline passed under CPU load)
            continue
        except Exception as exc:  # JetStream leader election after a node loss: retry, the messages stay pending
            if isinstance(exc, (nats.js.errors.APIError, nats.errors.Error)):
                log.warning("fetch failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            raise
        try:
            stored, refused = await asyncio.to_thread(process, messages, models, store)
        except Exception as exc:
            import psycopg

            if not isinstance(exc, psycopg.Error):
                raise
            log.warning("store failed (%s); messages will be redelivered", exc)
            store.close()
            store = None
            for msg in messages:
                await msg.nak(delay=0.5)
            continue
        for msg in messages:
            await msg.ack()
        if store.conflicts:
            log.error("refused frames=%d reason=conflict (key already stored with another payload)", store.conflicts)
            store.conflicts = 0
        if refused:
            log.warning("refused frames=%d reason=undecodable-or-unknown-model", refused)
    if store is not None:
        store.close()
    if compaction is not None:
        await compaction
    await mqtt_task
    await nc.drain()


def _compact_once(pg_dsn: str, settle_s: float) -> None:
    try:
        store = PgStore(pg_dsn)
    except PgStoreError as exc:
        log.warning("compaction skipped: %s", exc)
        return
    try:
        store.compact(settle_s=settle_s, wait=False)
    except Exception:  # noqa: BLE001 (a failed compaction leaves everything as it was: one transaction per camera)
        log.exception("compaction failed")
    finally:
        store.close()
