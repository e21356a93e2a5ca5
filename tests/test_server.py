"""The ingest server as a real subprocess on loopback with a real SQLite file: auth, WS and HTTP ingest, duplicates,
malformed messages, queries, /healthz, /metrics, and durability of acked frames across kill -9."""

import sqlite3
import threading

import numpy as np
import pytest

from taskcodec.testing import ServerProcess, wait_for
from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from tiny_bundle import make_tiny_bundle


def _frames(bundle, first_seq, n, seed=0, ts0=1_700_000_000_000):
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(seed).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    return [wire.Frame(first_seq + i, ts0 + 1000 * i, compress(s, coder, bundle.model_tag))
            for i, s in enumerate(symbols)]


def _stored_keys(db_path):
    with sqlite3.connect(db_path) as conn:
        return set(conn.execute("SELECT camera_id, epoch, seq FROM frames").fetchall())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    bundle = make_tiny_bundle(root / "bundle")
    db = root / "frames.db"
    with ServerProcess(bundle.path, db) as srv:
        tokens = {cam: srv.add_camera(cam) for cam in ("cam-a", "cam-b")}
        yield bundle, srv, tokens, db


def _hello(bundle, cam, token, tag=None):
    return wire.Hello(tag or bundle.model_tag, cam, token)


def test_websocket_ingest_acks_only_after_storing(env):
    bundle, srv, tokens, db = env
    frames = _frames(bundle, 0, 20, seed=1)
    with srv.stream() as c:
        assert c.hello(_hello(bundle, "cam-a", tokens["cam-a"])) == wire.Welcome()
        assert c.send(wire.Batch(1, frames[:10])) == [wire.Ack(1, 0, 10)]
        assert {("cam-a", 1, s) for s in range(10)} <= _stored_keys(db)  # acked => already in the file
        assert c.send(wire.Batch(1, frames[10:])) == [wire.Ack(1, 10, 10)]
    got = srv.get_json("/v1/cameras/cam-a/frames?epoch=1&limit=1000")["frames"]
    assert [f["seq"] for f in got] == list(range(20))
    f0 = got[0]
    assert f0["ts_capture_ms"] == frames[0].ts_ms and f0["payload_bytes"] == len(frames[0].payload)
    assert f0["model_id"] == bundle.model_id and f0["class_name"] == f"class-{f0['prediction']}"
    assert 0.1 <= f0["confidence"] <= 1.0


def test_predictions_match_the_bundle_classifier(env):
    import onnxruntime as ort

    bundle, srv, tokens, _ = env
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(5).integers(-6, 7, (16, bundle.latent_dim)).astype(np.int32)
    frames = [wire.Frame(i, 5000 + i, compress(s, coder, bundle.model_tag)) for i, s in enumerate(symbols)]
    with srv.stream() as c:
        c.hello(_hello(bundle, "cam-a", tokens["cam-a"]))
        assert c.send(wire.Batch(5, frames)) == [wire.Ack(5, 0, 16)]
    logits = ort.InferenceSession(str(bundle.file("classifier"))).run(None, {"symbols": symbols})[0]
    got = srv.get_json("/v1/cameras/cam-a/frames?epoch=5")["frames"]
    assert [f["prediction"] for f in got] == logits.argmax(1).tolist()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose([f["confidence"] for f in got], p.max(1), atol=1e-5)


def test_http_ingest_and_duplicates_stored_once(env):
    bundle, srv, tokens, db = env
    frames = _frames(bundle, 100, 8, seed=2)
    hello = _hello(bundle, "cam-b", tokens["cam-b"])
    with srv.http() as h:
        r = h.post(hello, wire.Batch(3, frames))
        assert r.status == 200 and r.replies == [wire.Ack(3, 100, 8)] and "stored 8" in r.reason
        again = h.post(hello, wire.Batch(3, frames[2:6]))  # a resend after a lost ack: acked, not stored twice
        assert again.status == 200 and again.replies == [wire.Ack(3, 102, 4)]
    with srv.stream() as c:  # and the same frames over WebSocket
        c.hello(hello)
        assert c.send(wire.Batch(3, frames)) == [wire.Ack(3, 100, 8)]
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT count(*) FROM frames WHERE camera_id='cam-b' AND epoch=3").fetchone()[0]
    assert n == 8
    metrics = srv.get_text("/metrics")
    assert _metric(metrics, "taskcodec_server_frames_duplicate_total") >= 12


def test_corrupt_frames_are_rejected_and_the_rest_stored(env):
    bundle, srv, tokens, db = env
    frames = _frames(bundle, 0, 6, seed=3)
    bad = bytearray(frames[2].payload)
    bad[-1] ^= 0x40
    frames[2] = wire.Frame(2, frames[2].ts_ms, bytes(bad))
    frames[3] = wire.Frame(3, frames[3].ts_ms, _frames(bundle, 3, 1, seed=3)[0].payload[:-4])  # truncated
    foreign = make_tiny_bundle(srv.db_path.parent / "other", seed=9)  # bytes of another model
    frames[5] = wire.Frame(5, frames[5].ts_ms, compress(np.zeros(8, np.int32), foreign.tables, foreign.model_tag))
    with srv.stream() as c:
        c.hello(_hello(bundle, "cam-a", tokens["cam-a"]))
        replies = c.send(wire.Batch(9, frames))
    assert [type(r).__name__ for r in replies] == ["Ack", "Reject", "Ack", "Reject"]
    assert replies[0] == wire.Ack(9, 0, 2) and replies[2] == wire.Ack(9, 4, 1)
    assert (replies[1].first_seq, replies[1].count, replies[1].code) == (2, 2, wire.Code.BAD_PAYLOAD)
    assert "check failed" in replies[1].reason and replies[3].first_seq == 5
    assert {k for k in _stored_keys(db) if k[:2] == ("cam-a", 9)} == {("cam-a", 9, s) for s in (0, 1, 4)}
    with srv.http() as h:  # all frames bad: 422 with the reason, nothing stored
        r = h.post(_hello(bundle, "cam-a", tokens["cam-a"]), wire.Batch(10, [frames[2]]))
    assert r.status == 422 and "check failed" in r.reason and isinstance(r.replies[0], wire.Reject)
    assert not {k for k in _stored_keys(db) if k[:2] == ("cam-a", 10)}
    assert 'taskcodec_server_frames_rejected_total{reason="bad_payload"}' in srv.get_text("/metrics")


def test_auth_wrong_token_impersonation_and_unknown_model(env):
    bundle, srv, tokens, db = env
    before = _stored_keys(db)
    frames = _frames(bundle, 0, 2, seed=4)
    cases = [
        (_hello(bundle, "cam-a", b"not-the-token"), wire.Code.UNAUTHORIZED, "wrong token"),
        (_hello(bundle, "cam-b", tokens["cam-a"]), wire.Code.UNAUTHORIZED, "wrong token"),  # cam-a posing as cam-b
        (_hello(bundle, "cam-zz", tokens["cam-a"]), wire.Code.UNAUTHORIZED, "unknown camera"),
        (_hello(bundle, "cam-a", tokens["cam-a"], tag=bytes(8)), wire.Code.UNKNOWN_MODEL, bundle.model_id),
    ]
    for hello, code, words in cases:
        with srv.stream() as c:
            reply = c.hello(hello)
            assert isinstance(reply, wire.Error) and reply.code == code and words in reply.reason
            assert c.closed()
        with srv.http() as h:
            r = h.post(hello, wire.Batch(77, frames))
            assert r.status == (401 if code == wire.Code.UNAUTHORIZED else 409)
            assert words in r.reason and r.replies[0].code == code
    assert _stored_keys(db) == before
    assert srv.alive() and srv.health()["status"] == "ok"


def test_malformed_messages_get_a_reason_and_the_server_stays_up(env):
    bundle, srv, tokens, db = env
    before = _stored_keys(db)
    hello = _hello(bundle, "cam-a", tokens["cam-a"])
    batch = wire.Batch(11, _frames(bundle, 0, 3, seed=6)).encode()
    for first, then in [(b"", None), (b"\x01\x07", None), ("text hello", None), (hello.encode(), b"\x02\x01"),
                        (hello.encode(), batch[:-1]), (hello.encode(), batch + b"\x00"),
                        (hello.encode(), hello.encode()), (hello.encode(), "text batch"),
                        (hello.encode(), bytes([2, 11]) + bytes.fromhex("ffffffffffffffff7f") +  # seq 2^63-1, 2^63
                         bytes([2, 2, 0, 2]) + b"xx" + bytes([2, 1]) + b"x")]:
        with srv.stream() as c:
            replies = c.send_raw(first)
            if then is not None:
                assert replies == [wire.Welcome()]
                replies = c.send_raw(then, frames=2)
            assert len(replies) == 1 and replies[0].reason, (first, then, replies)
            assert isinstance(replies[0], (wire.Error, wire.Reject))
    with srv.http() as h:
        for body in [b"", b"\x02", hello.encode(), hello.encode() + b"\x03\x00\x00\x01", hello.encode() + batch[:-2],
                     b"\x01" * 300]:
            r = h.post_raw(body)
            assert r.status == 400 and r.reason.startswith("malformed") and r.replies[0].code == wire.Code.BAD_MESSAGE
    assert _stored_keys(db) == before
    assert srv.alive() and srv.health()["db_ok"]


def test_query_endpoints_healthz_and_metrics(env):
    bundle, srv, tokens, _ = env
    frames = _frames(bundle, 0, 30, seed=7, ts0=2_000_000)
    with srv.stream() as c:
        c.hello(_hello(bundle, "cam-b", tokens["cam-b"]))
        c.send(wire.Batch(20, frames))
    page = srv.get_json("/v1/cameras/cam-b/frames?epoch=20&since_seq=9&limit=5")["frames"]
    assert [f["seq"] for f in page] == [10, 11, 12, 13, 14]
    by_ts = srv.get_json(f"/v1/cameras/cam-b/frames?epoch=20&since_ts={frames[24].ts_ms}")["frames"]
    assert [f["seq"] for f in by_ts] == list(range(25, 30))
    cams = {c["id"]: c for c in srv.get_json("/v1/cameras")}
    assert set(cams) >= {"cam-a", "cam-b"} and cams["cam-b"]["frames"] >= 30 and "token_hash" not in cams["cam-b"]
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        srv.get_json("/v1/cameras/nobody/frames")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        srv.get_json("/v1/cameras/cam-b/frames?limit=0")
    assert err.value.code == 422
    health = srv.health()
    assert health["status"] == "ok" and health["db_ok"] is True and health["model_id"] == bundle.model_id
    assert health["uptime_s"] > 0
    text = srv.get_text("/metrics")
    for name in ("frames_received_total", "frames_stored_total", "bytes_received_total",
                 "decode_classify_seconds_count", "capture_to_stored_seconds_count"):
        assert _metric(text, "taskcodec_server_" + name) > 0, name
    assert "taskcodec_server_connections" in text
    assert 'taskcodec_server_messages_refused_total{reason="unauthorized"}' in text


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def test_every_acked_frame_survives_kill_9(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    db = tmp_path / "frames.db"
    srv = ServerProcess(bundle.path, db).start()
    try:
        token = srv.add_camera("cam-k")
        hello = _hello(bundle, "cam-k", token)
        frames = _frames(bundle, 0, 4000, seed=8)
        acked: set[int] = set()
        sent = threading.Event()

        def upload():
            try:
                with srv.stream(timeout=30) as c:
                    c.hello(hello)
                    for i in range(0, len(frames), 5):
                        for r in c.send(wire.Batch(1, frames[i:i + 5])):
                            if isinstance(r, wire.Ack):
                                acked.update(range(r.first_seq, r.first_seq + r.count))
                        sent.set()
            except Exception:  # the server was killed under us: that is the point
                pass

        t = threading.Thread(target=upload, daemon=True)
        t.start()
        wait_for(lambda: len(acked) >= 200, what="200 acked frames")
        srv.kill()  # mid-stream, no shutdown handlers
        t.join(timeout=60)
        assert not t.is_alive()
        n_acked = len(acked)
        assert n_acked >= 200
        stored = {seq for cam, epoch, seq in _stored_keys(db) if cam == "cam-k"}
        assert set(acked) <= stored  # nothing acked was lost
        srv.start()  # restart on the same file: recovers the WAL and keeps serving
        with srv.stream() as c:
            c.hello(hello)
            assert c.send(wire.Batch(1, frames[:100])) == [wire.Ack(1, 0, 100)]
        got = srv.get_json("/v1/cameras/cam-k/frames?limit=10000")["frames"]
        assert set(acked) <= {f["seq"] for f in got}
    finally:
        srv.kill()


def test_two_worker_processes_share_port_and_database(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    with ServerProcess(bundle.path, tmp_path / "frames.db", "--workers", "2") as srv:
        token = srv.add_camera("cam-w")
        frames = _frames(bundle, 0, 40, seed=11)
        for i in range(0, 40, 4):
            with srv.http() as h:  # a new connection each time, so both workers get some
                assert h.post(_hello(bundle, "cam-w", token), wire.Batch(1, frames[i:i + 4])).status == 200
        got = srv.get_json("/v1/cameras/cam-w/frames?limit=100")["frames"]
        assert [f["seq"] for f in got] == list(range(40))
