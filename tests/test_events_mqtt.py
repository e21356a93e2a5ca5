"""Results out, end to end: a real server subprocess publishes events to a real mosquitto broker (started here on a
free loopback port with its own config) and to a webhook; a real paho-mqtt subscriber receives them, and they say
what the database says. A webhook that hangs never holds up ingest."""

import getpass
import hashlib
import hmac
import json
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.testing import ServerError, ServerProcess, wait_for
from tiny_bundle import make_tiny_bundle

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
pytestmark = pytest.mark.skipif(not shutil.which(MOSQUITTO),
                                reason="mosquitto is not installed (apt-get install -y mosquitto; scripts/install.sh)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    log = open(root / "mosquitto.log", "wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, 15, "mosquitto to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class Subscriber:
    def __init__(self, port, topic="taskcodec/+/events"):
        self.messages, self.connected = [], threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, *_: (c.subscribe([(topic, 1), ("taskcodec/available", 1)]),
                                                self.connected.set())
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload.decode(), m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(15), "subscriber could not connect"
        time.sleep(0.3)  # SUBACK

    def events(self):
        return [(t, json.loads(p)) for t, p, _ in self.messages if t.endswith("/events")]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Webhook:
    """An HTTP receiver that answers 500 to the first ``fail_first`` POSTs (to exercise retries), then 204."""

    def __init__(self, fail_first=0):
        self.received, self.attempts, self.signatures = [], 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.attempts += 1
                outer.signatures.append((body, self.headers.get("X-Taskcodec-Signature")))
                if outer.attempts <= fail_first:
                    self.send_response(500)
                else:
                    outer.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()


def _stream(srv, bundle, cam, token, n, seed, epoch=1, batch=10):
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(seed).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    frames = [wire.Frame(i, 1_790_000_000_000 + 100 * i, compress(s, coder, bundle.model_tag))
              for i, s in enumerate(symbols)]
    with srv.stream() as c:
        assert c.hello(wire.Hello(bundle.model_tag, cam, token)) == wire.Welcome()
        for j in range(0, n, batch):
            assert c.send(wire.Batch(epoch, frames[j:j + batch])) == [wire.Ack(epoch, j, len(frames[j:j + batch]))]
        # a re-sent batch (lost ack) is stored once and published once
        assert c.send(wire.Batch(epoch, frames[:batch])) == [wire.Ack(epoch, 0, batch)]


def _db(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT camera_id, seq, prediction, confidence, model_id, ts_capture_ms FROM frames "
                            "ORDER BY camera_id, epoch, seq").fetchall()


def test_every_frame_reaches_mqtt_and_the_webhook(broker, tmp_path, monkeypatch):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    sub, hook = Subscriber(broker), Webhook(fail_first=2)
    monkeypatch.setenv("TASKCODEC_EVENTS_MQTT", f"mqtt://127.0.0.1:{broker}")
    monkeypatch.setenv("TASKCODEC_EVENTS_MODE", "frame")
    monkeypatch.setenv("TASKCODEC_EVENTS_WEBHOOK", hook.url)
    monkeypatch.setenv("TASKCODEC_EVENTS_WEBHOOK_BACKOFF_S", "0.05")
    monkeypatch.setenv("TASKCODEC_EVENTS_WEBHOOK_SECRET", "s3cret")
    try:
        with ServerProcess(bundle.path, tmp_path / "frames.db") as srv:
            tokens = {cam: srv.add_camera(cam) for cam in ("cam-a", "cam-b")}
            for k, cam in enumerate(tokens):
                _stream(srv, bundle, cam, tokens[cam], 40, seed=k)
            rows = _db(tmp_path / "frames.db")
            assert len(rows) == 80
            wait_for(lambda: len(sub.events()) >= 80 and len(hook.received) >= 80, 30, "80 events on both sinks")
            time.sleep(0.5)
            metrics = srv.get_text("/metrics")
        events = sub.events()
        assert len(events) == 80 and len(hook.received) == 80  # the re-sent batch published nothing twice
        classes = list(bundle.classes)
        for topic, e in events:
            assert topic == f"taskcodec/{e['camera']}/events" and e["type"] == "frame"
        got = sorted((e["camera"], e["seq"], e["label"], e["model_id"], e["ts_capture_ms"]) for _, e in events)
        assert got == [(c, s, classes[p], m, ts) for c, s, p, _, m, ts in rows]
        scores = {(e["camera"], e["seq"]): e["score"] for _, e in events}
        assert all(scores[(c, s)] == pytest.approx(conf, abs=1e-6) for c, s, _, conf, _, _ in rows)
        assert sorted((e["camera"], e["seq"]) for e in hook.received) == [(c, s) for c, s, *_ in rows]
        assert hook.attempts == 82  # two 500s retried
        assert all(sig == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
                   for body, sig in hook.signatures)
        assert ("taskcodec/available", "online") in [(t, p) for t, p, _ in sub.messages]
        late = Subscriber(broker)  # the server has stopped: a later subscriber gets the retained "offline"
        wait_for(lambda: late.messages, 10, "retained availability")
        late.close()
        assert late.messages[0] == ("taskcodec/available", "offline", True)
        assert 'taskcodec_server_events_published_total{sink="mqtt"} 80.0' in metrics
        assert 'taskcodec_server_events_published_total{sink="webhook"} 80.0' in metrics
    finally:
        sub.close()
        hook.close()


def test_change_mode_and_a_hanging_webhook_never_blocks_ingest(broker, tmp_path, monkeypatch):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    sub = Subscriber(broker)
    hang = socket.socket()  # accepts connections (backlog) but never answers: every POST waits for its timeout
    hang.bind(("127.0.0.1", 0))
    hang.listen(1000)
    monkeypatch.setenv("TASKCODEC_EVENTS_MQTT", f"mqtt://127.0.0.1:{broker}")
    monkeypatch.setenv("TASKCODEC_EVENTS_MODE", "change")
    monkeypatch.setenv("TASKCODEC_EVENTS_WEBHOOK", f"http://127.0.0.1:{hang.getsockname()[1]}/hook")
    monkeypatch.setenv("TASKCODEC_EVENTS_WEBHOOK_TIMEOUT_S", "60")
    monkeypatch.setenv("TASKCODEC_EVENTS_QUEUE", "5")
    try:
        with ServerProcess(bundle.path, tmp_path / "frames.db") as srv:
            token = srv.add_camera("cam-c")
            t0 = time.monotonic()
            _stream(srv, bundle, "cam-c", token, 200, seed=7, batch=5)
            ingest_s = time.monotonic() - t0
            rows = _db(tmp_path / "frames.db")
            preds = [p for _, _, p, *_ in rows]
            changes = [i for i in range(len(preds)) if i == 0 or preds[i] != preds[i - 1]]
            assert 1 < len(changes) < 200
            wait_for(lambda: len(sub.events()) >= len(changes), 30, "change events")
            time.sleep(0.5)
            metrics = srv.get_text("/metrics")
        assert ingest_s < 30, f"ingest took {ingest_s:.1f} s with a hanging webhook"
        events = [e for _, e in sub.events()]
        classes = list(bundle.classes)
        assert [e["seq"] for e in events] == changes
        assert all(e["type"] == "change" and e["label"] == classes[preds[e["seq"]]] for e in events)
        assert [e["previous_label"] for e in events] == [None] + [classes[preds[i - 1]] for i in changes[1:]]
        dropped = float(metrics.split('taskcodec_server_events_dropped_total{sink="webhook"} ')[1].split()[0])
        assert dropped >= len(changes) - 5 - 1  # queue of 5, one in flight: the rest dropped, never waited for
    finally:
        sub.close()
        hang.close()


def test_a_bad_events_configuration_stops_the_server_with_the_key_named(tmp_path, monkeypatch):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    monkeypatch.setenv("TASKCODEC_EVENTS_MODE", "sometimes")
    with pytest.raises(ServerError, match="mode"):
        ServerProcess(bundle.path, tmp_path / "frames.db").start()
    config = tmp_path / "events.yaml"
    config.write_text("mqtt: mqtt://127.0.0.1:1\nwebhok: http://x\n")
    monkeypatch.delenv("TASKCODEC_EVENTS_MODE")
    monkeypatch.setenv("TASKCODEC_EVENTS_CONFIG", str(config))
    with pytest.raises(ServerError, match="webhok: unknown key"):
        ServerProcess(bundle.path, tmp_path / "frames.db").start()


def test_a_broker_with_passwords(tmp_path, monkeypatch):
    """Credentials in the URL (percent-encoded) reach the broker; a wrong password only loses events, never frames."""
    port = _free_port()
    passwords = tmp_path / "passwd"
    for user, password in (("taskcodec", "p@ss:w/rd"), ("ha", "ha-secret")):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == "taskcodec" else []), str(passwords), user,
                        password], check=True, capture_output=True, timeout=30)
    conf = tmp_path / "mosquitto.conf"
    # user: started as root, mosquitto would drop to user 'mosquitto', which cannot read pytest's private tmp dir
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
                    f"persistence false\nlog_dest stderr\nuser {getpass.getuser()}\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bundle = make_tiny_bundle(tmp_path / "bundle")
    try:
        def up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, 15, "mosquitto to listen")
        sub = Subscriber.__new__(Subscriber)
        sub.messages, sub.connected = [], threading.Event()
        sub.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub-auth")
        sub.client.username_pw_set("ha", "ha-secret")
        sub.client.on_connect = lambda c, *_: (c.subscribe("taskcodec/+/events", 1), sub.connected.set())
        sub.client.on_message = lambda c, u, m: sub.messages.append((m.topic, m.payload.decode(), m.retain))
        sub.client.connect("127.0.0.1", port)
        sub.client.loop_start()
        assert sub.connected.wait(15)
        time.sleep(0.3)
        monkeypatch.setenv("TASKCODEC_EVENTS_MODE", "frame")
        for password, expect in (("p%40ss%3Aw%2Frd", 20), ("wrong", 0)):
            monkeypatch.setenv("TASKCODEC_EVENTS_MQTT", f"mqtt://taskcodec:{password}@127.0.0.1:{port}")
            db = tmp_path / f"frames-{expect}.db"
            with ServerProcess(bundle.path, db) as srv:
                _stream(srv, bundle, f"cam-{expect}", srv.add_camera(f"cam-{expect}"), 20, seed=1)  # all acked
                if expect:
                    wait_for(lambda: len(sub.events()) >= expect, 30, "events through the authenticated broker")
                else:
                    time.sleep(2)
                    assert "event=mqtt_refused" in srv.log_path.read_text()
            assert len(_db(db)) == 20
        assert sorted(e["seq"] for _, e in sub.events()) == list(range(20))
        assert {e["camera"] for _, e in sub.events()} == {"cam-20"}
        sub.close()
    finally:
        broker.terminate()
        broker.wait(10)
