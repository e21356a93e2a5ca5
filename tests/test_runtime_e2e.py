"""End to end with the real server subprocess (server.testing.ServerProcess): the runtime's frames are stored and
classified; predictions equal the bundle's classifier run on the camera's own symbols; a server killed mid-stream and
restarted on the same port gets every frame exactly once."""

import socket

import numpy as np
import onnxruntime as ort
import pytest

from taskcodec.runtime.capture import CaptureConfig, CaptureRuntime, run_capture
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import open_source
from tiny_bundle import make_tiny_bundle

from taskcodec import testing
TIMEOUT = 60


def test_runtime_against_real_server(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    with testing.ServerProcess(bundle.path, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-e2e").decode()
        report = run_capture(CaptureConfig(
            device="virtual://fashion-mnist?seed=4", bundle=str(bundle.path), server=srv.url, camera_id="cam-e2e",
            token=token, spool=str(tmp_path / "spool"), frames=25, quiet=True, drain_timeout=TIMEOUT, threads=1))
        assert report.acked == 25 and report.spool_depth == 0 and report.dropped == 0
        stored = srv.get_json("/v1/cameras/cam-e2e/frames?limit=1000")["frames"]
    assert sorted(f["seq"] for f in stored) == list(range(25))
    assert {f["epoch"] for f in stored} == {report.epoch}
    images = [f.image for f, _ in zip(open_source("virtual://fashion-mnist?seed=4"), range(25))]
    enc = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(bundle.file("classifier")), providers=["CPUExecutionProvider"])
    symbols = enc.run(None, {"frames": Preprocessor(bundle.input).batch(images)})[0]
    expected = cls.run(None, {"symbols": symbols})[0].argmax(axis=1)
    got = {f["seq"]: f["prediction"] for f in stored}
    assert [got[i] for i in range(25)] == expected.tolist()


def test_wrong_bundle_is_refused_by_real_server(tmp_path):
    served = make_tiny_bundle(tmp_path / "served", seed=0)
    other = make_tiny_bundle(tmp_path / "other", seed=1)
    with testing.ServerProcess(served.path, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-x").decode()
        rt = CaptureRuntime(CaptureConfig(
            device="virtual://fashion-mnist", bundle=str(other.path), server=srv.url, camera_id="cam-x", token=token,
            spool=str(tmp_path / "spool"), frames=50, quiet=True, loop=True, threads=1))
        with pytest.raises(Exception, match="unknown model") as info:
            rt.run()
        assert served.model_id in str(info.value)


def test_server_killed_mid_stream_loses_and_duplicates_nothing(tmp_path):
    import contextlib
    import threading
    import time

    N = 90

    bundle = make_tiny_bundle(tmp_path / "bundle")
    db = tmp_path / "server.db"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(testing.ServerProcess(bundle.path, db))
        port = first.port
        token = first.add_camera("cam-k").decode()
        # the fps cap makes capture last at least ~3 s, so the kill lands while frames are still flowing
        rt = CaptureRuntime(CaptureConfig(
            device="virtual://fashion-mnist", bundle=str(bundle.path), server=first.url, camera_id="cam-k",
            token=token, spool=str(tmp_path / "spool"), frames=N, fps=30, quiet=True, drain_timeout=2 * TIMEOUT,
            threads=1, max_delay=0.0))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", rt.run()))
        t.start()
        deadline = time.monotonic() + TIMEOUT
        while rt.stats.acked < 10 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.02)
        first.kill()  # SIGKILL; returns once the process is gone, so nothing is acked by it after this line
        # the property needs the kill to land mid-stream; assert it instead of hoping for it: frames were acked, the
        # runtime still runs, and frames it has not even captured yet can only reach the restarted server
        captured_at_kill = rt.stats.captured
        assert rt.stats.acked >= 10 and t.is_alive() and captured_at_kill < N, (rt.stats.acked, captured_at_kill)
        second = stack.enter_context(testing.ServerProcess(bundle.path, db, "--port", str(port)))
        assert second.port == port
        t.join(3 * TIMEOUT)
        assert not t.is_alive()
        report = result["r"]
        assert report.acked == N and report.spool_depth == 0 and report.dropped == 0
        assert report.reconnects >= 1
        stored = second.get_json("/v1/cameras/cam-k/frames?limit=1000")["frames"]
        assert sorted(f["seq"] for f in stored) == list(range(N))
