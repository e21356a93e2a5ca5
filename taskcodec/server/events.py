"""Results out: every stored frame (or only a change of class per camera) as a JSON event on MQTT and/or a webhook,
for Home Assistant, Node-RED and the like.

    MQTT topic   taskcodec/<camera>/events          (prefix configurable; Frigate users know frigate/events)
    availability taskcodec/available  "online" / "offline" (retained; "offline" is the broker-side last will)
    payload      {"type": "frame"|"change", "camera": "cam-1", "label": "Sneaker", "score": 0.93,
                  "previous_label": "Bag", "prediction": 7, "epoch": 1, "seq": 41, "ts_capture_ms": ...,
                  "ts_capture": "2026-12-04T21:00:00.000Z", "ts_stored_ms": ..., "model_id": "...",
                  "payload_bytes": 6}

Configuration (environment, so every `--workers` process gets it; or a YAML file of the same keys without the prefix
named by TASKCODEC_EVENTS_CONFIG):

    TASKCODEC_EVENTS_MQTT=mqtt://[user:password@]host:1883   TASKCODEC_EVENTS_TOPIC_PREFIX=taskcodec
    TASKCODEC_EVENTS_WEBHOOK=https://ha.local/api/webhook/ID TASKCODEC_EVENTS_MODE=change|frame
    TASKCODEC_EVENTS_MIN_SCORE=0.0  TASKCODEC_EVENTS_QUEUE=10000  TASKCODEC_EVENTS_WEBHOOK_RETRIES=3 ...
    TASKCODEC_EVENTS_WEBHOOK_SECRET=...  (then each POST carries X-Taskcodec-Signature: sha256=<HMAC of the body>)

Ingest is never blocked: the hook after a commit only builds small dicts and puts them on bounded queues; a sender
thread per sink publishes them. A full queue drops the newest event and counts it
(taskcodec_server_events_dropped_total{sink}); a webhook that keeps failing after its retries is counted as failed.
Each server process publishes the frames it stored; the change-of-class state is per process, so a camera that
reconnects to another worker may produce one extra "change" event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("taskcodec.server.events")
ENV_PREFIX = "TASKCODEC_EVENTS_"


class EventsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mqtt: str | None = Field(None, description="mqtt://[user:password@]host[:port] of the broker")
    topic_prefix: str = Field("taskcodec", pattern=r"^[^#+]+$")
    qos: int = Field(0, ge=0, le=2)
    client_id: str | None = None
    webhook: str | None = Field(None, description="URL that receives each event as an HTTP POST of JSON")
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_retries: int = Field(3, ge=0, description="retries after the first attempt, with doubling back-off")
    webhook_backoff_s: float = Field(0.5, ge=0)
    webhook_secret: str | None = Field(None, repr=False, description="if set, each POST carries "
                                       "X-Taskcodec-Signature: sha256=<hex HMAC-SHA256 of the body with this key>")
    mode: Literal["change", "frame"] = "change"
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="frames below this confidence produce no event")
    queue: int = Field(10000, ge=1, description="events waiting per sink before new ones are dropped")

    @property
    def enabled(self) -> bool:
        return bool(self.mqtt or self.webhook)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "EventsConfig":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = env.get(ENV_PREFIX + "CONFIG")
        if path:
            import yaml

            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path} must hold a mapping of event settings")
            values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        return cls(**values)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Sink:
    """A bounded queue and the daemon thread that empties it into ``send``."""

    def __init__(self, name: str, size: int, send, counters):
        self.name, self.send, self.counters = name, send, counters
        self.queue: queue.Queue = queue.Queue(size)
        self.thread = threading.Thread(target=self._run, name=f"events-{name}", daemon=True)
        self.thread.start()

    def put(self, topic: str, event: dict) -> None:
        try:
            self.queue.put_nowait((topic, event))
        except queue.Full:
            self.counters["dropped"].labels(self.name).inc()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                ok = self.send(*item)
            except Exception as exc:  # a sink must never die
                log.warning("event=events_send_failed sink=%s reason=%s", self.name, json.dumps(str(exc)))
                ok = False
            self.counters["published" if ok else "failed"].labels(self.name).inc()

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)


class EventPublisher:
    def __init__(self, config: EventsConfig, classes: Sequence[str], registry=None):
        from prometheus_client import CollectorRegistry, Counter

        self.config = config
        self.classes = list(classes)
        r = registry if registry is not None else CollectorRegistry()
        p = "taskcodec_server_events_"
        self.counters = {
            "published": Counter(p + "published", "Events delivered, by sink", ["sink"], registry=r),
            "dropped": Counter(p + "dropped", "Events dropped because the sink's queue was full", ["sink"], registry=r),
            "failed": Counter(p + "failed", "Events that could not be delivered (after retries)", ["sink"], registry=r),
        }
        self._last: dict[str, tuple[int, int, int]] = {}  # camera -> (epoch, seq, prediction) of the last frame seen
        self._lock = threading.Lock()
        self.sinks: list[_Sink] = []
        self.mqtt = None
        if config.mqtt:
            self.mqtt = self._connect_mqtt(config.mqtt)
            self.sinks.append(_Sink("mqtt", config.queue, self._send_mqtt, self.counters))
        if config.webhook:
            self.sinks.append(_Sink("webhook", config.queue, self._send_webhook, self.counters))

    # building events (ingest worker thread: must stay cheap) ------------------------------------------------------
    def on_stored(self, rows: Sequence[tuple]) -> None:
        """Hook after a commit: rows are storage.FrameRow tuples (camera, epoch, seq, ts, stored, model, payload,
        prediction, confidence). Never raises, never blocks."""
        try:
            for event in self.events(rows):
                topic = f"{self.config.topic_prefix}/{event['camera']}/events"
                for sink in self.sinks:
                    sink.put(topic, event)
        except Exception as exc:  # results out must never break ingest
            log.warning("event=events_hook_failed reason=%s", json.dumps(str(exc)))

    def events(self, rows: Sequence[tuple]) -> list[dict]:
        out = []
        with self._lock:
            for cam, epoch, seq, ts, stored, model, payload, pred, conf in rows:
                last = self._last.get(cam)
                if last is not None and epoch == last[0] and seq <= last[1]:
                    continue  # a re-sent frame (its ack was lost): already published
                previous = last[2] if last is not None else None
                if conf < self.config.min_score:
                    continue
                self._last[cam] = (epoch, seq, pred)
                if self.config.mode == "change" and previous == pred:
                    continue
                out.append({
                    "type": "frame" if self.config.mode == "frame" else "change", "camera": cam,
                    "label": self._name(pred), "score": round(float(conf), 6),
                    "previous_label": self._name(previous) if previous is not None else None,
                    "prediction": int(pred), "epoch": epoch, "seq": seq, "ts_capture_ms": ts,
                    "ts_capture": _iso(ts), "ts_stored_ms": stored, "model_id": model,
                    "payload_bytes": len(payload)})
        return out

    def _name(self, index: int) -> str:
        if index == -1:  # out of the model's domain (server/ood.py UNKNOWN)
            return "unknown"
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)

    # MQTT -----------------------------------------------------------------------------------------------------------
    def _connect_mqtt(self, url: str):
        import paho.mqtt.client as mqtt

        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"events MQTT URL must be mqtt://HOST[:PORT] or mqtts://..., got {url!r}")
        tls = u.scheme in ("mqtts", "ssl")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=self.config.client_id or f"taskcodec-server-{os.getpid()}")
        if u.username:
            client.username_pw_set(urllib.parse.unquote(u.username),
                                   urllib.parse.unquote(u.password) if u.password else None)
        if tls:
            client.tls_set()
        available = f"{self.config.topic_prefix}/available"
        client.will_set(available, "offline", qos=1, retain=True)
        client.max_queued_messages_set(self.config.queue)

        def on_connect(c, userdata, flags, reason, properties):
            if reason.is_failure:
                log.warning("event=mqtt_refused broker=%s reason=%s", u.hostname, json.dumps(str(reason)))
            else:
                c.publish(available, "online", qos=1, retain=True)

        def on_disconnect(c, userdata, flags, reason, properties):
            log.warning("event=mqtt_disconnect broker=%s reason=%s", u.hostname, json.dumps(str(reason)))

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.reconnect_delay_set(1, 30)
        client.connect_async(u.hostname or "localhost", u.port or (8883 if tls else 1883), keepalive=60)
        client.loop_start()
        return client

    def _send_mqtt(self, topic: str, event: dict) -> bool:
        info = self.mqtt.publish(topic, json.dumps(event, separators=(",", ":")), qos=self.config.qos)
        return info.rc == 0  # queued in paho (sent now, or after a reconnect for qos >= 1)

    # webhook --------------------------------------------------------------------------------------------------------
    def _send_webhook(self, topic: str, event: dict) -> bool:
        body = json.dumps({**event, "topic": topic}).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "taskcodec-server"}
        if self.config.webhook_secret:
            digest = hmac.new(self.config.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Taskcodec-Signature"] = f"sha256={digest}"
        delay = self.config.webhook_backoff_s
        for attempt in range(self.config.webhook_retries + 1):
            request = urllib.request.Request(self.config.webhook, body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.config.webhook_timeout_s) as r:
                    if 200 <= r.status < 300:
                        return True
                    problem = f"HTTP {r.status}"
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver refuses this event: retrying will not help
            except (OSError, ValueError) as exc:
                problem = str(exc)
            if attempt < self.config.webhook_retries:
                time.sleep(delay)
                delay *= 2
        log.warning("event=webhook_failed camera=%s seq=%s reason=%s", event.get("camera"), event.get("seq"),
                    json.dumps(problem))
        return False

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.mqtt is not None:
            self.mqtt.publish(f"{self.config.topic_prefix}/available", "offline", qos=1, retain=True)
            self.mqtt.loop_stop()
            self.mqtt.disconnect()


def install(app) -> EventPublisher | None:
    """The hook create_app calls: publish events after every commit when TASKCODEC_EVENTS_* configure a sink."""
    from taskcodec.server.config import ConfigError

    try:
        config = EventsConfig.from_env()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: "
                             f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in exc.errors())
        raise ConfigError(f"events configuration (TASKCODEC_EVENTS_* / TASKCODEC_EVENTS_CONFIG): {problems}") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"events configuration (TASKCODEC_EVENTS_CONFIG): {exc}") from None
    app.state.events = None
    if not config.enabled:
        return None
    service = app.state.service
    classes = list(getattr(getattr(service, "classifier", None), "classes", None) or [])
    publisher = EventPublisher(config, classes, registry=service.metrics.registry)
    service.stored_hooks.append(publisher.on_stored)
    app.state.events = publisher
    return publisher
