"""Camera side of the MQTT ingress (`taskcodec mqtt-capture`): for cameras whose firmware speaks MQTT 3.1.1.

Each message is the body ``POST /v1/ingest`` takes, HELLO (camera token) || BATCH, published with QoS 1 to the
camera's own topic ``taskcodec/v1/ingest/<camera>`` on a nats-server MQTT listener (``taskcodec cluster up`` prints
one per node). PUBACK arrives only once nats-server stored the message in its replicated JetStream stream
(taskcodec.server.cluster.mqtt explains why that, and not a capturing stream, is what the workers read). A message
without PUBACK in time is published again: re-sends are harmless, PostgreSQL's unique (camera, epoch, seq) key keeps
one copy. The workers' refusals (wrong token, unknown model…) come back as wire ERROR messages on
``taskcodec/v1/reply/<camera>`` (QoS 0), which this uplink subscribes to.

This module is a minimal uplink (frames in memory, no spool): `runtime capture` over WebSocket/HTTP remains the
uplink with a disk spool and reconnect backoff.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import typer

from taskcodec import wire


def topic_token(camera_id: str) -> str:
    """The camera id as one topic level: nats-server refuses ``.`` in MQTT topics, so ``.`` is written ``~``
    (the server side, taskcodec.server.cluster.mqtt, maps it back)."""
    return camera_id.replace(".", "~")


def ingest_topic(camera_id: str) -> str:
    return f"taskcodec/v1/ingest/{topic_token(camera_id)}"


def reply_topic(camera_id: str) -> str:
    return f"taskcodec/v1/reply/{topic_token(camera_id)}"


class MqttUplinkError(RuntimeError):
    """The broker did not acknowledge a message in time."""


class MqttUplink:
    """One camera's MQTT connection: ``send(batch)`` returns once the broker acknowledged (PUBACK) the message."""

    def __init__(self, broker_url: str, camera_id: str, token: bytes, model_tag: bytes, timeout: float = 10.0,
                 client_id: str | None = None):
        import paho.mqtt.client as mqtt

        url = urlparse(broker_url)
        if url.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {broker_url!r}: mqtt://HOST:PORT or mqtts://HOST:PORT")
        self.hello = wire.Hello(model_tag, camera_id, token)
        self.topic = ingest_topic(camera_id)
        self.timeout = timeout
        self.refusals: list[wire.Error] = []
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"tc-{camera_id}",
                                  clean_session=True)
        if url.scheme == "mqtts":
            self.client.tls_set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 5)
        self.client.connect(url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883))
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise MqttUplinkError(f"no CONNACK from {broker_url} within {timeout} s")

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if not reason.is_failure:
            client.subscribe(reply_topic(self.hello.camera_id), qos=0)
            self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            reply = wire.decode(message.payload)
        except wire.WireError:
            return
        if isinstance(reply, wire.Error):
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


def mqtt_capture(device: str = typer.Option(..., "--device", help="source URI, e.g. virtual://fashion-mnist"),
                 broker: str = typer.Option(..., "--broker", help="mqtt://HOST:PORT of a nats-server MQTT listener"),
                 camera_id: str = typer.Option(..., "--camera-id"),
                 bundle: Optional[Path] = typer.Option(None, "--bundle", help="model bundle (default: embedded)"),
                 token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                           help="file holding the token (or $TASKCODEC_TOKEN)"),
                 fps: float = typer.Option(0.0, "--fps", help="frames per second (0: as fast as acknowledged)"),
                 frames_per_message: int = typer.Option(1, "--frames-per-message", min=1,
                                                        max=wire.MAX_FRAMES_PER_BATCH),
                 count: int = typer.Option(0, "--count", min=0, help="stop after this many frames (0: source end)"),
                 report: Optional[Path] = typer.Option(None, "--report", help="write a JSON summary here")) -> None:
    """Capture, encode and publish frames over MQTT QoS 1 (one message = HELLO || BATCH) to the scale-out cluster."""
    import numpy as np

    from taskcodec.bundle import load_bundle
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source

    token = (token_file.read_text().strip() if token_file else os.environ.get("TASKCODEC_TOKEN", "")).encode()
    if not token:
        typer.secho("error: no token (--token-file or $TASKCODEC_TOKEN)", err=True, fg="red")
        raise typer.Exit(2)
    b = load_bundle(bundle)
    pre, enc = Preprocessor(b.input), FrameEncoder(b)
    spec = b.input
    uplink = MqttUplink(broker, camera_id, token, b.model_tag)
    epoch, seq, sent, pending = random.getrandbits(62), 0, 0, []
    t0 = time.monotonic()
    try:
        with open_source(device, fps=fps or None) as source:
            for frame in source:
                image = pre(frame.image).reshape(1, spec.height, spec.width, spec.channels)
                pending.append(wire.Frame(seq, frame.ts_ms, enc.encode(np.asarray(image))[0]))
                seq += 1
                if len(pending) == frames_per_message:
                    uplink.send(wire.Batch(epoch, pending))
                    sent, pending = sent + len(pending), []
                if count and seq >= count:
                    break
        if pending:
            uplink.send(wire.Batch(epoch, pending))
            sent += len(pending)
        time.sleep(0.5)  # refusals (QoS 0 replies) that are on their way
    finally:
        uplink.close()
    summary = {"camera_id": camera_id, "epoch": epoch, "acked": sent, "seconds": round(time.monotonic() - t0, 3),
               "refusals": [{"code": wire.CODE_NAMES.get(r.code, r.code), "reason": r.reason}
                            for r in uplink.refusals]}
    if report:
        report.write_text(json.dumps(summary, indent=1))
    typer.echo(f"{sent} frames acknowledged (PUBACK) by {broker}; {len(uplink.refusals)} refusal(s)")
    if uplink.refusals:
        typer.secho(f"refused: {uplink.refusals[0].reason}", err=True, fg="red")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("mqtt-capture")(mqtt_capture)
