"""New tasks after the fact: a head trained with the real `taskcodec heads train` CLI on the latents a real server
(subprocess, real SQLite file, the real default bundle, real Fashion-MNIST frames) has stored; it re-labels the stored
frames, and the running server labels new frames with it."""

import csv
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.bench.tasks import COARSE, COARSE_NAMES
from taskcodec.bundle import DEFAULT_BUNDLE, load_bundle
from taskcodec.coding import RangeCoder, compress
from taskcodec.data import load_fashion_mnist
from taskcodec.export.golden import run_encoder
from taskcodec.server.heads import Head, HeadError, HeadStore
from taskcodec.testing import ServerProcess, wait_for


def _labels(db, head):
    with sqlite3.connect(db) as conn:
        return {s: lab for s, lab in conn.execute("SELECT seq, label FROM head_labels WHERE head = ?", (head,))}


def test_head_trained_on_stored_latents_labels_stored_and_new_frames(tmp_path):
    bundle = load_bundle(DEFAULT_BUNDLE)
    images, labels = load_fashion_mnist("test")
    images, labels = images[:700], labels[:700]
    coder = RangeCoder(bundle.tables)
    symbols = run_encoder(bundle.encoder_path(), images[..., None])
    frames = [wire.Frame(i, 1_700_000_000_000 + 100 * i, compress(s, coder, bundle.model_tag))
              for i, s in enumerate(symbols)]
    truth = np.array(COARSE_NAMES)[COARSE[labels]]
    db = tmp_path / "frames.db"
    with ServerProcess(DEFAULT_BUNDLE, db) as srv:
        token = srv.add_camera("cam-1")
        with srv.stream() as c:
            c.hello(wire.Hello(bundle.model_tag, "cam-1", token))
            assert c.send(wire.Batch(1, frames[:500])) == [wire.Ack(1, 0, 500)]
        with open(tmp_path / "coarse.csv", "w", newline="") as f:  # labels for 300 of the 500 stored frames
            w = csv.writer(f)
            w.writerow(["camera_id", "epoch", "seq", "label"])
            w.writerows(["cam-1", 1, i, truth[i]] for i in range(300))
        res = subprocess.run([sys.executable, "-m", "taskcodec.cli", "heads", "train", "--task", "coarse", "--labels",
                              str(tmp_path / "coarse.csv"), "--db", str(db), "--bundle", str(DEFAULT_BUNDLE)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "trained on 300 stored frames" in res.stdout and "labelled 500 stored frames" in res.stdout
        stored = _labels(db, "coarse")
        assert sorted(stored) == list(range(500))  # every stored frame re-labelled, the 200 unlabelled ones too
        held_out = np.mean([stored[i] == truth[i] for i in range(300, 500)])
        assert held_out > 0.9, held_out
        # new frames: the running server applies the head as it stores them
        with srv.stream() as c:
            c.hello(wire.Hello(bundle.model_tag, "cam-1", token))
            assert c.send(wire.Batch(1, frames[500:])) == [wire.Ack(1, 500, 200)]
        wait_for(lambda: len(_labels(db, "coarse")) == 700, 60, "700 frames labelled by the head")
        new = _labels(db, "coarse")
        acc_new = np.mean([new[i] == truth[i] for i in range(500, 700)])
        assert acc_new > 0.9, acc_new
        assert "heads active" not in srv.log() or "coarse" in srv.log()
        listed = subprocess.run([sys.executable, "-m", "taskcodec.cli", "heads", "list", "--db", str(db)],
                                capture_output=True, text=True, timeout=60)
        assert '"name": "coarse"' in listed.stdout and '"n_labels": 300' in listed.stdout
        # a deactivated head labels nothing new
        store = HeadStore(db)
        assert store.deactivate("coarse")
        store.close()
        with srv.stream() as c:
            c.hello(wire.Hello(bundle.model_tag, "cam-1", token))
            assert c.send(wire.Batch(2, frames[:50])) == [wire.Ack(2, 0, 50)]
        time.sleep(1.0)
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM head_labels WHERE epoch = 2").fetchone()[0] == 0


def test_head_inference_is_plain_numpy_and_refuses_bad_shapes():
    h = Head("t", "m", "logistic", ["a", "b"], np.zeros(3), np.ones(3), [(np.array([[1, -1], [0, 0], [0, 0.]]),
                                                                          np.zeros(2))])
    idx, conf = h.predict(np.array([[5, 0, 0], [-5, 0, 0]]))
    assert idx.tolist() == [0, 1] and np.all(conf > 0.99)
    with pytest.raises(HeadError):
        Head("t", "m", "logistic", ["a", "b", "c"], np.zeros(3), np.ones(3), [(np.zeros((3, 2)), np.zeros(2))])
