"""MQTT ingress of the scale-out mode with real processes: three nats-server nodes with their MQTT listeners and
JetStream (R3), PostgreSQL, a worker. Frames published with MQTT QoS 1 (HELLO || BATCH per message) are stored exactly
once; a wrong token or a camera publishing under another camera's topic is refused and stores nothing; a re-publish is
deduplicated by the unique key; nothing stays behind in nats-server's MQTT stream once stored."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
import psycopg
import pytest

from taskcodec import wire
from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.mqtt_uplink import MqttUplink
from taskcodec.server.cluster.local import LocalCluster
from taskcodec.server.cluster.mqtt import MQTT_STREAM
from tiny_bundle import make_tiny_bundle

needs = [shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists(),
         any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]
pytestmark = pytest.mark.skipif(not all(needs), reason="needs the Debian packages nats-server and postgresql "
                                                        "(scripts/install.sh installs them)")


def _rows(dsn: str, camera: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT (epoch, seq)) FROM frames WHERE camera_id = %s",
                            (camera,)).fetchone()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stream_messages(cluster: LocalCluster) -> int:
    async def main():
        nc = await nats.connect(servers=cluster.nats_urls)
        try:
            return (await nc.jetstream().stream_info(MQTT_STREAM)).state.messages
        finally:
            await nc.close()
    return asyncio.run(main())


def test_mqtt_frames_are_stored_once_refused_with_a_wrong_token_and_deduplicated(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    with LocalCluster([bundle.path], gateways=0, workers=1) as cluster:
        cam = "yard.cam-1"                      # a '.' in the id: written '~' in the topic
        token = cluster.add_camera(cam)
        other = "gate-2"
        cluster.add_camera(other)

        # The CLI camera: virtual source -> encoder -> MQTT QoS 1, 3 frames per message, via node 1's listener.
        report = tmp_path / "report.json"
        out = subprocess.run([sys.executable, "-m", "taskcodec.cli", "mqtt-capture", "--device",
                              "virtual://fashion-mnist?size=28x28&count=30", "--bundle", str(bundle.path),
                              "--broker", cluster.mqtt_url(1), "--camera-id", cam, "--frames-per-message", "3",
                              "--spool", str(tmp_path / "spool"), "--report", str(report)], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, TASKCODEC_TOKEN=token.decode()))
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads(report.read_text())
        assert summary["acked"] == 30 and summary["refusals"] == []
        _wait(lambda: _rows(cluster.pg_dsn, cam)[0] >= 30, 30, "30 MQTT frames stored")

        enc = FrameEncoder(bundle)
        payloads = enc.encode(np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8))
        batch = wire.Batch(77, [wire.Frame(i, int(time.time() * 1000), p) for i, p in enumerate(payloads)])

        # A re-publish of a stored batch (as after a lost PUBACK): JetStream holds it twice, PostgreSQL once.
        good = MqttUplink(cluster.mqtt_url(0), cam, token, bundle.model_tag)
        try:
            good.send(batch)
            _wait(lambda: _rows(cluster.pg_dsn, cam)[0] >= 34, 30, "the batch stored")
            good.send(batch)
            good.send(wire.Batch(77, [wire.Frame(10, int(time.time() * 1000), payloads[0])]))  # a marker behind it
            _wait(lambda: _rows(cluster.pg_dsn, cam)[0] >= 35, 30, "the marker frame stored")
            assert good.refusals == []
        finally:
            good.close()

        # A wrong token, and a valid camera publishing under another camera's topic: PUBACK (MQTT 3.1.1 has no
        # negative ack) but nothing stored, and a wire ERROR on the reply topic.
        bad = MqttUplink(cluster.mqtt_url(2), other, b"not-the-token", bundle.model_tag)
        thief = MqttUplink(cluster.mqtt_url(2), other, token, bundle.model_tag, client_id="thief")
        thief.hello = wire.Hello(bundle.model_tag, cam, token)    # cam's credentials on gate-2's topic
        try:
            bad.send(wire.Batch(5, [wire.Frame(0, int(time.time() * 1000), payloads[0])]))
            thief.send(wire.Batch(6, [wire.Frame(0, int(time.time() * 1000), payloads[1])]))
            _wait(lambda: len(bad.refusals) >= 1 and len(thief.refusals) >= 1, 30, "the refusals")
        finally:
            bad.close()
            thief.close()
        assert bad.refusals[0].code == wire.Code.UNAUTHORIZED
        assert thief.refusals[0].code == wire.Code.UNAUTHORIZED
        time.sleep(1.0)
        assert _rows(cluster.pg_dsn, other) == (0, 0)
        assert _rows(cluster.pg_dsn, cam) == (35, 35)           # 30 + 4 + 1: the re-publish stored nothing twice
        with psycopg.connect(cluster.pg_dsn) as conn:
            assert conn.execute("SELECT sum(n) FROM class_counts WHERE camera_id = %s", (cam,)).fetchone()[0] == 35
        _wait(lambda: _stream_messages(cluster) == 0, 15, "nats-server's MQTT stream emptied by the workers' acks")


def test_puback_does_not_imply_storage_in_a_stream_capturing_the_topic(tmp_path):
    """Why workers read nats-server's own $MQTT_msgs stream: a stream of ours capturing the topic's subject gets a
    plain publish that PUBACK does not wait for. Here it refuses all but the first message, yet every PUBACK comes."""
    import paho.mqtt.client as mqtt
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig

    with LocalCluster([], gateways=0, workers=0) as cluster:
        async def capture_stream():
            nc = await nats.connect(servers=cluster.nats_urls)
            js = nc.jetstream(timeout=10)
            for _ in range(120):
                try:
                    await js.add_stream(StreamConfig(name="CAPTURE", subjects=["probe.>"], storage=StorageType.FILE,
                                                     num_replicas=3, max_msgs=1, discard=DiscardPolicy.NEW))
                    break
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                        nats.js.errors.NoStreamResponseError):
                    await asyncio.sleep(0.5)
            await nc.close()

        async def captured():
            nc = await nats.connect(servers=cluster.nats_urls)
            try:
                return (await nc.jetstream().stream_info("CAPTURE")).state.messages
            finally:
                await nc.close()

        asyncio.run(capture_stream())
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", clean_session=True)
        client.connect("127.0.0.1", cluster.mqtt_ports[0])
        client.loop_start()
        try:
            acked = 0
            for i in range(3):
                info = client.publish("probe/cam", b"m%d" % i, qos=1)
                info.wait_for_publish(15)
                acked += info.is_published()
        finally:
            client.loop_stop()
            client.disconnect()
        assert acked == 3
        assert asyncio.run(captured()) == 1
