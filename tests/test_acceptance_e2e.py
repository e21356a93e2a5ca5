"""Issue-level acceptance on the embedded default bundle with real processes on loopback:

1. `runtime capture` streams a (lossless FFV1) video of Fashion-MNIST test images to a real server; the server's
   predictions agree with offline predictions (the bundle's ONNX encoder + classifier on the same decoded frames).
2. The runtime is killed with SIGKILL mid-stream and restarted on the same spool: every frame it had spooled reaches
   the server exactly once (no acknowledged or spooled frame lost, nothing stored twice).
"""

import signal
import sqlite3
import subprocess
import sys

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from taskcodec.bundle import load_bundle
from taskcodec.data import load_fashion_mnist

from taskcodec import testing
N_FRAMES = 1000


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    images, _ = load_fashion_mnist("test")
    path = tmp_path_factory.mktemp("video") / "fashion.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, (28, 28))
    for im in images[:N_FRAMES]:
        writer.write(cv2.cvtColor(im, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def offline_predictions(bundle, video_path):
    cap = cv2.VideoCapture(str(video_path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[..., None])
    enc = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(bundle.file("classifier")), providers=["CPUExecutionProvider"])
    symbols = enc.run(None, {"frames": np.stack(frames)})[0]
    return cls.run(None, {"symbols": symbols})[0].argmax(axis=1)


def runtime_cmd(video_path, srv, token, spool, *extra):
    return [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device", str(video_path), "--server", srv.url,
            "--camera-id", "cam-acc", "--token", token, "--spool", str(spool), "--quiet", "--threads", "1", *extra]


def stored_rows(db):
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT epoch, seq, prediction FROM frames WHERE camera_id = 'cam-acc' "
                           "ORDER BY epoch, seq").fetchall()


def test_server_predictions_agree_with_offline_predictions(video, tmp_path):
    bundle = load_bundle(None)
    expected = offline_predictions(bundle, video)
    assert len(expected) == N_FRAMES
    with testing.ServerProcess(bundle.path, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-acc").decode()
        out = subprocess.run(runtime_cmd(video, srv, token, tmp_path / "spool", "--max-delay", "0.1",
                                         "--drain-timeout", "120"), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = stored_rows(srv.db_path)
    assert [seq for _, seq, _ in rows] == list(range(N_FRAMES))
    agreement = np.mean(np.array([p for _, _, p in rows]) == expected)
    assert agreement >= 0.999, agreement


def test_runtime_sigkill_and_restart_loses_and_duplicates_nothing(video, tmp_path):
    bundle = load_bundle(None)
    spool = tmp_path / "spool"
    with testing.ServerProcess(bundle.path, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-acc").decode()
        first = subprocess.Popen(runtime_cmd(video, srv, token, spool, "--fps", "100", "--max-delay", "0.5"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            testing.wait_for(lambda: len(stored_rows(srv.db_path)) >= 100 or first.poll() is not None, 300,
                     "the first frames to be stored")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(60)
        assert first.returncode == -signal.SIGKILL  # killed mid-stream, not finished
        first_epoch = stored_rows(srv.db_path)[0][0]
        # What the killed runtime had spooled but not yet seen acknowledged (read from its real SQLite file).
        from taskcodec.runtime.spool import DB_NAME

        with sqlite3.connect(spool / DB_NAME, timeout=30) as con:
            pending = set(con.execute("SELECT epoch, seq FROM frames").fetchall())
        # Restart on the same spool with a short source: the spooled frames are sent first, then the new ones. The boot
        # id (epoch) lives with the spool (wire v2), so the restarted runtime continues the same epoch and sequence.
        out = subprocess.run(runtime_cmd(video, srv, token, spool, "--frames", "20", "--drain-timeout", "120"),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = stored_rows(srv.db_path)
    keys = [(e, s) for e, s, _ in rows]
    assert len(keys) == len(set(keys))  # nothing stored twice
    assert {e for e, _, _ in rows} == {first_epoch}  # same spool, same boot id: no new epoch after a restart
    seqs = sorted(s for _, s, _ in rows)
    assert seqs == list(range(len(seqs)))  # every frame of both runs arrived, no gap
    assert len(seqs) >= 100 + 20
    assert pending <= set(keys)  # every frame still spooled at the kill was delivered after the restart
