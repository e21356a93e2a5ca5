"""Temporal coding end to end (issue 15) with the real server subprocess (taskcodec.testing.ServerProcess) and the
default bundle (which ships residual tables): a runtime with --temporal streaming virtual://dwell; the server's
predictions and stored payloads equal offline temporal decoding of the same symbols; and with the server killed
(SIGKILL) twice mid-stream and restarted on the same port and database, every frame is stored exactly once, none is
refused, and every stored frame is within the SAME threshold of the camera's own symbols (a frame decoded against a
reference the server did not have would be far off)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import numpy as np
import pytest

from taskcodec import testing
from taskcodec.bundle import load_bundle
from taskcodec.coding import RangeCoder, compress, decompress
from taskcodec.coding.temporal import KIND_NAMES, TemporalDecoder, TemporalEncoder
from taskcodec.runtime.capture import CaptureConfig, CaptureRuntime, run_capture
from taskcodec.runtime.dwell import DwellCamera
from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.server.classify import Classifier

TIMEOUT = 60
DWELL = "seed={seed}&count={n}&rate=5&dwell=1-3"


@pytest.fixture(scope="module")
def bundle():
    b = load_bundle(None)
    assert b.residual_tables is not None, "the default bundle ships residual tables"
    return b


def camera_symbols(bundle, seed: int, n: int) -> np.ndarray:
    cam = DwellCamera({k: v for k, v in (p.split("=") for p in DWELL.format(seed=seed, n=n).split("&"))})
    pre, enc = Preprocessor(bundle.input), FrameEncoder(bundle, threads=1)
    x = np.concatenate([pre(cam.render(k)[0]) for k in range(n)])
    return enc.symbols(x)


def stored_frames(db, camera: str) -> dict[int, tuple[bytes, int]]:
    con = sqlite3.connect(str(db))
    try:
        return {seq: (bytes(p), pred) for seq, p, pred in con.execute(
            "SELECT seq, payload, prediction FROM frames WHERE camera_id = ?", (camera,))}
    finally:
        con.close()


def test_server_predictions_equal_offline_temporal_decoding(tmp_path, bundle):
    n = 200
    with testing.ServerProcess(None, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-t").decode()
        report = run_capture(CaptureConfig(
            device="virtual://dwell?" + DWELL.format(seed=3, n=n), server=srv.url, camera_id="cam-t", token=token,
            spool=str(tmp_path / "spool"), quiet=True, temporal=True, threads=1, drain_timeout=TIMEOUT))
        assert "RESYNC" not in srv.log()
    assert report.acked == n and report.dropped == 0
    t = report.temporal
    assert t["temporal"] and t["connections"] == 1 and t["frames_sent"] == n
    # offline: the same symbols through the same policy, decoded as the server does
    sym = camera_symbols(bundle, 3, n)
    key, res = RangeCoder(bundle.tables), RangeCoder(bundle.residual_tables)
    tag, rtag = bundle.model_tag, bundle.residual_tag
    enc = TemporalEncoder(key, res, tag, t["key_interval"], t["same_l1"], rtag)
    dec = TemporalDecoder(key, res, tag, rtag)
    decoded, kinds, bits = [], {"key": 0, "cond": 0, "same": 0}, 0
    for s in sym:
        kind, payload = enc.encode(s)
        decoded.append(dec.decode(kind, payload))
        kinds[KIND_NAMES[kind]] += 1
        bits += 8 * len(payload)
    decoded = np.stack(decoded)
    assert {k: t["kinds"][k] for k in kinds} == kinds
    assert t["payload_bits_per_frame"] == pytest.approx(bits / n)
    stored = stored_frames(tmp_path / "server.db", "cam-t")
    assert sorted(stored) == list(range(n))
    for i in range(n):  # the stored payload is the KEY-equivalent of what the server decoded
        np.testing.assert_array_equal(decompress(stored[i][0], key, tag), decoded[i])
        assert stored[i][0] == compress(decoded[i], key, tag)
    offline_pred = Classifier(bundle).predict(decoded)[0]
    assert [stored[i][1] for i in range(n)] == offline_pred.tolist()
    independent = np.mean([8 * len(compress(s, key, tag)) for s in sym])
    assert t["payload_bits_per_frame"] < 0.5 * independent and t["same_share"] > 0.5


def test_server_killed_twice_mid_stream_leaves_no_undecodable_frame(tmp_path, bundle):
    n, same_l1 = 240, 10
    db = tmp_path / "server.db"
    rng = np.random.default_rng(15)
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(testing.ServerProcess(None, db))
        port = srv.port
        token = srv.add_camera("cam-k").decode()
        rt = CaptureRuntime(CaptureConfig(  # sensor-clock times with jitter: CBATCH TIME items across reconnects
            device="virtual://dwell?" + DWELL.format(seed=5, n=n) + "&clock=scene&jitter=3", server=srv.url,
            camera_id="cam-k", token=token,
            spool=str(tmp_path / "spool"), fps=20, quiet=True, temporal=True, same_l1=same_l1, threads=1,
            drain_timeout=2 * TIMEOUT, max_delay=0.02))
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", rt.run()))
        thread.start()
        logs = []
        kill_at = 0
        for _ in range(2):
            kill_at = max(kill_at, rt.stats.acked) + int(rng.integers(10, 40))  # a random point after the last one
            deadline = time.monotonic() + TIMEOUT
            while rt.stats.acked < kill_at and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.01)
            srv.kill()  # SIGKILL: the session's reference is gone with the process
            assert rt.stats.captured < n and thread.is_alive(), "the kill must land mid-stream"
            logs.append(srv.log())
            srv = stack.enter_context(testing.ServerProcess(None, db, "--port", str(port)))
        thread.join(3 * TIMEOUT)
        assert not thread.is_alive()
        logs.append(srv.log())
    report = result["r"]
    assert report.acked == n and report.spool_depth == 0 and report.dropped == 0 and report.rejected == 0
    assert report.reconnects >= 2 and report.temporal["connections"] >= 3
    assert report.temporal["kinds"]["cond"] > 0 and report.temporal["kinds"]["same"] > 0
    assert not any("CONFLICT" in log.upper() and "conflict:" in log for log in logs)
    stored = stored_frames(db, "cam-k")
    assert sorted(stored) == list(range(n))  # each frame exactly once (the key is the primary key)
    sym = camera_symbols(bundle, 5, n)
    key = RangeCoder(bundle.tables)
    dist = np.array([np.abs(decompress(stored[i][0], key, bundle.model_tag) - sym[i]).sum() for i in range(n)])
    assert dist.max() <= same_l1, np.nonzero(dist > same_l1)
    # every capture time survived the CBATCH links of three connections (times implied from the previous frame)
    con = sqlite3.connect(str(db))
    times = dict(con.execute("SELECT seq, ts_capture_ms FROM frames WHERE camera_id = 'cam-k'").fetchall())
    con.close()
    cam = DwellCamera({"seed": "5", "rate": "5", "jitter": "3"})
    assert [times[k] - times[0] for k in range(n)] == [cam.scene_ms(k) - cam.scene_ms(0) for k in range(n)]


def test_server_negotiates_and_never_decodes_without_the_reference(tmp_path, bundle):
    """Protocol edges at the real server: a v2 camera gets a v2 WELCOME and its BATCH is stored; other residual
    tables get no grant and a TBATCH there is refused; a version-3 camera's TBATCHes are stored; a COND frame
    without a reference on a fresh connection (a camera that did not start with a KEY frame) gets the frames before
    it acked and ERROR RESYNC, never a wrong decode; so does a COND frame after a KEY frame the server refused."""
    from taskcodec import wire

    key, res = RangeCoder(bundle.tables), RangeCoder(bundle.residual_tables)
    tag, rtag = bundle.model_tag, bundle.residual_tag
    video = camera_symbols(bundle, 4, 60)
    moving = np.abs(np.diff(video, axis=0)).sum(1) > 0
    start = next(i for i in range(len(video) - 6) if moving[i:i + 5].all())  # 6 frames that all differ
    sym = video[start:start + 6]
    enc = TemporalEncoder(key, res, tag, 50, 0, rtag)
    coded = [enc.encode(sym[0])] + [enc.encode(s, allow=(wire.COND,)) for s in sym[1:]]  # KEY, then COND frames
    assert [k for k, _ in coded] == [wire.KEY] + [wire.COND] * 5
    with testing.ServerProcess(None, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-p")
        epoch = 77
        with srv.stream() as c:  # an old-style (v2) camera
            assert c.hello(wire.Hello(tag, "cam-p", token, version=2)) == wire.Welcome(2)
            assert c.send(wire.Batch(epoch, [wire.Frame(0, 1000, compress(sym[0], key, tag))])) == [
                wire.Ack(epoch, 0, 1)]
        with srv.stream() as c:  # other residual tables: no grant, and a TBATCH is refused
            hello = wire.Hello(tag, "cam-p", token, version=3, capabilities=wire.CAP_TEMPORAL, residual_tag=b"\0" * 8)
            assert c.hello(hello) == wire.Welcome(3, 0)
            reply = c.send(wire.TemporalBatch(epoch, [wire.Frame(1, 1200, coded[0][1], coded[0][0])]))
            assert isinstance(reply[0], wire.Error) and reply[0].code == wire.Code.BAD_MESSAGE
        # a version-3 camera (TBATCH) keeps working with a version-4 server
        hello = wire.Hello(tag, "cam-p", token, version=3, capabilities=wire.CAP_TEMPORAL, residual_tag=rtag)
        with srv.stream() as c:  # granted; a normal KEY, COND/SAME sequence is stored
            assert c.hello(hello) == wire.Welcome(3, wire.CAP_TEMPORAL)
            frames = [wire.Frame(1 + i, 1200 + 200 * i, p, k) for i, (k, p) in enumerate(coded[:3])]
            assert c.send(wire.TemporalBatch(epoch, frames)) == [wire.Ack(epoch, 1, 3)]
        with srv.stream() as c:  # a new connection has no reference: KEY ok, then COND ok; a leading COND is not
            assert c.hello(hello) == wire.Welcome(3, wire.CAP_TEMPORAL)
            k, p = coded[3]
            cond = compress(sym[4] - sym[3], res, rtag)
            reply = c.send(wire.TemporalBatch(epoch, [wire.Frame(4, 1800, cond, wire.COND)]))
            assert [type(m) for m in reply] == [wire.Error] and reply[0].code == wire.Code.RESYNC
        with srv.stream() as c:  # a refused KEY frame takes the reference with it: the COND after it -> RESYNC
            assert c.hello(hello) == wire.Welcome(3, wire.CAP_TEMPORAL)
            good = compress(sym[3], key, tag)
            bad = bytes([good[0] ^ 1]) + good[1:]
            reply = c.send(wire.TemporalBatch(epoch, [wire.Frame(4, 1800, good, wire.KEY),
                                                      wire.Frame(5, 2000, bad, wire.KEY),
                                                      wire.Frame(6, 2200, cond, wire.COND)]))
            assert reply[0] == wire.Ack(epoch, 4, 1) and isinstance(reply[1], wire.Reject)
            assert reply[1].code == wire.Code.BAD_PAYLOAD and reply[2].code == wire.Code.RESYNC
        with srv.http() as h:  # HTTP ingest: one session per request, so each request starts with a KEY frame
            cond54 = compress(sym[5] - sym[4], res, rtag)
            r = h.post(hello, wire.TemporalBatch(epoch, [wire.Frame(5, 2000, compress(sym[4], key, tag), wire.KEY),
                                                         wire.Frame(6, 2200, cond54, wire.COND)]))
            assert r.status == 200 and r.replies == [wire.Ack(epoch, 5, 2)], r
            r = h.post(hello, wire.TemporalBatch(epoch, [wire.Frame(7, 2400, cond54, wire.COND)]))
            assert r.status != 200 and r.replies[0].code == wire.Code.RESYNC, r  # no reference from the last request
    stored = stored_frames(tmp_path / "server.db", "cam-p")
    assert sorted(stored) == [0, 1, 2, 3, 4, 5, 6]
    for i, s in enumerate([sym[0], sym[0], sym[1], sym[2], sym[3], sym[4], sym[5]]):  # seq 0: v2; i: sym[i - 1]
        np.testing.assert_array_equal(decompress(stored[i][0], key, tag), s)


def test_v4_cbatch_headers_continue_the_connection(tmp_path, bundle):
    """Wire v4 at the real server: CBATCHes that leave out the epoch, first seq and times (continuing the previous
    CBATCH of the connection) are stored with the right keys and capture times, SAME runs included; a CBATCH that
    leaves fields out as the first of a connection (or of an HTTP request) is refused as malformed, never stored
    under guessed keys; a CBATCH on a version-3 connection is refused."""
    from taskcodec import wire

    key, res = RangeCoder(bundle.tables), RangeCoder(bundle.residual_tables)
    tag, rtag = bundle.model_tag, bundle.residual_tag
    sym = camera_symbols(bundle, 4, 12)
    enc = TemporalEncoder(key, res, tag, 50, 10**6, rtag)  # everything after the KEY frame is SAME
    coded = [enc.encode(s) for s in sym]
    assert [k for k, _ in coded] == [wire.KEY] + [wire.SAME] * 11
    epoch, t0 = 2**62 + 5, 1_700_000_000_000
    frames = [wire.Frame(100 + i, t0 + 200 * i + (7 if i == 6 else 0), p, k) for i, (k, p) in enumerate(coded)]
    with testing.ServerProcess(None, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-v4")
        hello = wire.Hello(tag, "cam-v4", token, capabilities=wire.CAP_TEMPORAL, residual_tag=rtag)
        camera = wire.Connection()
        with srv.stream() as c:
            assert c.hello(hello) == wire.Welcome(4, wire.CAP_TEMPORAL)
            sent = []
            for part in (frames[:4], frames[4:9], frames[9:]):
                b = camera.batch(epoch, part, 200)
                sent.append(b.encode())
                assert c.send_raw(sent[-1], len(part)) == [wire.Ack(epoch, part[0].seq, len(part))]
            assert sent[0][1] == wire.CB_EPOCH | wire.CB_SEQ | wire.CB_TIME | wire.CB_INTERVAL
            assert sent[1][1] == 0 and len(sent[2]) == 4  # type, flags, count, one SAME-run item
        with srv.stream() as c:  # a new connection has no link: the continuation is refused, nothing stored
            assert c.hello(hello) == wire.Welcome(4, wire.CAP_TEMPORAL)
            reply = c.send_raw(wire.CompactBatch(epoch, [wire.Frame(112, t0 + 2400, coded[0][1])], 200,
                                                 wire.Link(epoch, 111, t0 + 2200, 200)).encode())
            assert [type(m) for m in reply] == [wire.Error] and reply[0].code == wire.Code.BAD_MESSAGE, reply
        with srv.stream() as c:  # version 3 connection: no CBATCH
            assert c.hello(wire.Hello(tag, "cam-v4", token, version=3, capabilities=wire.CAP_TEMPORAL,
                                      residual_tag=rtag)) == wire.Welcome(3, wire.CAP_TEMPORAL)
            reply = c.send_raw(wire.CompactBatch(epoch, [wire.Frame(113, t0, coded[0][1])], 200).encode())
            assert [type(m) for m in reply] == [wire.Error] and reply[0].code == wire.Code.BAD_MESSAGE, reply
        with srv.http() as h:  # HTTP: one session per request, a self-contained CBATCH
            r = h.post(hello, wire.CompactBatch(epoch, [wire.Frame(120, t0 + 4000, coded[0][1]),
                                                        wire.Frame(121, t0 + 4200, b"", wire.SAME)], 200))
            assert r.status == 200 and r.replies == [wire.Ack(epoch, 120, 2)], r
    con = sqlite3.connect(str(tmp_path / "server.db"))
    rows = con.execute("SELECT epoch, seq, ts_capture_ms, payload FROM frames WHERE camera_id = 'cam-v4' "
                       "ORDER BY seq").fetchall()
    con.close()
    assert [(e, s, t) for e, s, t, _ in rows] == [(epoch, f.seq, f.ts_ms) for f in frames] + [
        (epoch, 120, t0 + 4000), (epoch, 121, t0 + 4200)]
    for _, s, _, p in rows:  # every SAME frame stored as the KEY frame's symbols
        np.testing.assert_array_equal(decompress(bytes(p), key, tag), sym[0])
