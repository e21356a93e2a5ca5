"""Issue 13 items 1-2: the model registry and over-the-air rollout, with the real server subprocess, the real
`taskcodec models` / `cameras` CLI and four real `runtime capture` processes streaming virtual cameras.

Bundles: A (the server's --bundle), B (a second model: another seed), C (signed by a key the cameras do not trust)
and D (properly signed, then one byte of encoder.onnx changed in the server's registry copy). A canary of B to half
of group "fleet" (2 of 4 cameras) switches exactly those two mid-stream: no frame lost, every frame stored once,
each classified with the model it was captured under (predictions recomputed offline with that model's own encoder
and classifier); the old-model backlog is decoded under A. C and D are refused on the cameras, which keep streaming
under A, and the reasons reach the operator (`taskcodec models status`, GET /v1/rollout). A rollback of the group
brings the canary back to A."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from taskcodec import testing
from taskcodec.bundle import Bundle, add_file, generate_signing_key, sign_bundle
from taskcodec.export.golden import make_golden
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import open_source
from taskcodec.server.registry import Registry, RegistryError
from tiny_bundle import make_tiny_bundle

N = 150          # frames per camera (15 s at 10 fps; the rollback is done by ~40 frames here: room on a loaded machine)
FPS = 10
CAMERAS = [f"cam-{i}" for i in range(4)]


def _bundle(root: Path, name: str, seed: int) -> Bundle:
    b = make_tiny_bundle(root / name, seed=seed)
    frames = np.random.default_rng(100 + seed).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    make_golden(b, frames, root / f"{name}-golden.npz")
    return add_file(b, "golden", root / f"{name}-golden.npz", name="golden.npz")


def _cli(db: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "taskcodec.server", *args, "--db", str(db)], capture_output=True,
                         text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _expected(bundle: Bundle, seed: int, n: int) -> np.ndarray:
    """Predictions of ``bundle`` (its own encoder and classifier) on the first n frames of virtual camera ``seed``."""
    images = [f.image for f, _ in zip(open_source(f"virtual://fashion-mnist?seed={seed}"), range(n))]
    enc = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(bundle.file("classifier")), providers=["CPUExecutionProvider"])
    symbols = enc.run(None, {"frames": Preprocessor(bundle.input).batch(images)})[0]
    return cls.run(None, {"symbols": symbols})[0].argmax(axis=1)


def _frames(db: Path, camera: str) -> list[tuple[int, str, int, int]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT seq, model_id, prediction, ts_stored_ms FROM frames WHERE camera_id = ? "
                            "ORDER BY seq", (camera,)).fetchall()
    finally:
        conn.close()


def srv_resolve(db: Path) -> dict:
    return Registry(db).resolve_all(None)


def _wait(what: str, cond, timeout: float = 45.0, procs=()) -> None:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if cond():
            print(f"{what}: {time.monotonic() - t0:.1f} s")
            return
        dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
        assert not dead, f"a runtime exited with {dead[0].returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_canary_rollout_tamper_refusal_and_rollback(tmp_path):
    A, B, C, D = (_bundle(tmp_path, n, s) for n, s in (("A", 0), ("B", 1), ("C", 2), ("D", 3)))
    key, pub = generate_signing_key(tmp_path / "operator.key")
    rogue, _ = generate_signing_key(tmp_path / "rogue.key")
    for b in (A, B, D):
        sign_bundle(b.path, key)
    sign_bundle(C.path, rogue)  # a valid signature, by a key the cameras do not trust
    db = tmp_path / "server.db"
    logs, procs = [], []
    with testing.ServerProcess(A.path, db, "--log-level", "info") as srv:
        tokens = {}
        for cam in CAMERAS:
            out = _cli(db, "cameras", "add", cam, "--group", "fleet")
            tokens[cam] = tmp_path / f"{cam}.token"
            tokens[cam].write_text(out.stdout.strip())
            os.chmod(tokens[cam], 0o600)
        for b in (B, C, D):
            assert "added" in _cli(db, "models", "add", str(b.path)).stdout
        listed = _cli(db, "models", "list").stdout
        assert all(b.model_id in listed for b in (A, B, C, D))  # A: added implicitly by `serve --bundle`
        registry = Path(str(db) + ".models")
        enc = registry / D.model_id / "encoder.onnx"
        data = bytearray(enc.read_bytes())
        data[len(data) // 2] ^= 0x01  # one byte of the served copy changed after it was verified and added
        enc.write_bytes(bytes(data))
        try:
            for i, cam in enumerate(CAMERAS):
                log = open(tmp_path / f"{cam}.log", "w")
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device",
                     f"virtual://fashion-mnist?seed={i}", "--bundle", str(A.path), "--server", srv.url,
                     "--camera-id", cam, "--token-file", str(tokens[cam]), "--spool", str(tmp_path / f"spool-{cam}"),
                     "--frames", str(N), "--fps", str(FPS), "--quiet", "--trusted-key", str(pub),
                     "--rollout-poll", "0.3", "--max-delay", "0", "--threads", "1", "--drain-timeout", "60",
                     "--report", str(tmp_path / f"{cam}.json")], stdout=log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, OMP_NUM_THREADS="1")))
            _wait("every camera streaming", lambda: all(len(_frames(db, c)) >= 15 for c in CAMERAS), procs=procs)

            out = _cli(db, "models", "assign", B.model_id, "--group", "fleet", "--canary", "0.5").stdout
            canary = sorted(c for c, (m, _) in srv_resolve(db).items() if m == B.model_id)
            assert len(canary) == 2 and all(c in out for c in canary), out
            rest = sorted(set(CAMERAS) - set(canary))
            # (the code behind `models assign --camera`, in-process: the camera stream is the clock here)
            reg = Registry(db)
            reg.assign(C.model_id, camera=rest[0])   # bad signature
            reg.assign(D.model_id, camera=rest[1])   # tampered encoder.onnx

            def status() -> dict:  # what the operator sees over HTTP (the dashboard's source too)
                return {r["camera_id"]: r for r in srv.get_json("/v1/rollout")["cameras"]}

            def settled() -> bool:
                st = status()
                return (all(st[c]["running_model_id"] == B.model_id for c in canary)
                        and all(st[c]["state"] == "refused" for c in rest))

            _wait("the canary running B and both bad bundles refused", settled, procs=procs)
            # B cannot be removed while cameras run it / frames reference it (the CLI's check: test_models_add_...)
            with pytest.raises(RegistryError, match="still needed"):
                reg.remove(B.model_id)
            # rollback: the canary goes back to A (the server's default) while still streaming
            _cli(db, "models", "rollback", "--group", "fleet")
            _wait("the canary back on A", lambda: all(status()[c]["running_model_id"] == A.model_id
                                                       and status()[c]["state"] == "running" for c in canary),
                  procs=procs)
            print(f"rollback done at {min(len(_frames(db, c)) for c in canary)} of {N} frames stored")
            # the operator's CLI view: the refusals with their reasons
            st = {r["camera_id"]: r for r in json.loads(_cli(db, "models", "status", "--json").stdout)}
            assert "bad signature" in st[rest[0]]["reason"] and "trusted" in st[rest[0]]["reason"]
            assert "encoder.onnx" in st[rest[1]]["reason"] and "sha256" in st[rest[1]]["reason"]
            for c in rest:
                assert st[c]["state"] == "refused" and st[c]["running_model_id"] == A.model_id
            refused_at = {c: st[c]["updated_ms"] for c in rest}
            page = srv.get_text("/dashboard/rollout")  # the dashboard's rollout section (operator key)
            assert page.count('class="refused"') == 2 and "bad signature" in page and "encoder.onnx: sha256" in page
            for p in procs:
                p.wait(timeout=120)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for log in logs:
                log.close()
        server_log = srv.log()
    for cam, p in zip(CAMERAS, procs):
        assert p.returncode == 0, (tmp_path / f"{cam}.log").read_text()[-3000:]
        report = json.loads((tmp_path / f"{cam}.json").read_text())
        assert report["frames"] == N and report["acked"] == N and report["dropped"] == 0, report
        assert report["spool_depth"] == 0 and report["rejected"] == 0, report

    bundles = {A.model_id: A, B.model_id: B}
    for i, cam in enumerate(CAMERAS):
        rows = _frames(db, cam)
        assert [r[0] for r in rows] == list(range(N)), f"{cam}: frames lost or duplicated"  # 0 frames lost
        models = [r[1] for r in rows]
        if cam in canary:  # A, then B from the switch on, then A again after the rollback: contiguous segments
            segments = [m for j, m in enumerate(models) if j == 0 or models[j - 1] != m]
            assert segments == [A.model_id, B.model_id, A.model_id], segments
            # what a restart runs (runtime.rollout.startup_bundle): the model it last switched to
            assert (tmp_path / f"spool-{cam}" / "models" / "current").read_text().strip() == A.model_id
        else:
            assert set(models) == {A.model_id}, cam
            # the camera kept streaming under A after refusing the bad bundle
            assert max(r[3] for r in rows) > refused_at[cam] + 1000
        expected = {m: _expected(bundles[m], i, N) for m in set(models)}
        got = [r[2] for r in rows]
        want = [int(expected[m][seq]) for seq, m in zip(range(N), models)]
        assert got == want, f"{cam}: predictions are not each frame's own model's"
        if cam in canary:  # the check has teeth: the other model would have labelled some frames differently
            b_rows = [seq for seq, m in zip(range(N), models) if m == B.model_id]
            assert any(expected[B.model_id][s] != expected[A.model_id][s] for s in b_rows)
    assert "event=rollout" in server_log and "state=refused" in server_log


def test_old_model_backlog_is_sent_and_decoded_under_the_old_model(tmp_path):
    """A spool holding frames of model A (captured before a switch, or before a restart on model B) and of model B:
    the uplink sends the A frames on a connection whose HELLO names A, then reconnects as B; the server decodes and
    classifies each under its own model. Also the restart path: the spool reopens under B with A frames pending."""
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.spool import Spool
    from taskcodec.runtime.uplink import Uplink, UplinkConfig

    A, B = _bundle(tmp_path, "A", 0), _bundle(tmp_path, "B", 1)
    db = tmp_path / "server.db"
    images = [f.image for f, _ in zip(open_source("virtual://fashion-mnist?seed=7"), range(40))]
    with testing.ServerProcess(A.path, db) as srv:
        token = srv.add_camera("cam-b")
        _cli(db, "models", "add", str(B.path))
        spool = Spool(tmp_path / "spool", camera_id="cam-b", model_id=A.model_id)
        enc_a = FrameEncoder(A, threads=1)
        for img in images[:20]:
            spool.append(1000, enc_a.encode(Preprocessor(A.input).batch([img]))[0])
        spool.close()
        with pytest.raises(Exception, match="another identity"):  # without rollout a foreign model still refuses
            Spool(tmp_path / "spool", camera_id="cam-b", model_id=B.model_id)
        spool = Spool(tmp_path / "spool", camera_id="cam-b", model_id=B.model_id, other_models=True)
        enc_b = FrameEncoder(B, threads=1)
        for img in images[20:30]:
            spool.append(2000, enc_b.encode(Preprocessor(B.input).batch([img]))[0])
        spool.set_model(A.model_id)  # rolled back: A, B, A within one send window
        for img in images[30:]:
            spool.append(3000, enc_a.encode(Preprocessor(A.input).batch([img]))[0])
        assert spool.oldest_model_id() == A.model_id
        uplink = Uplink(spool, A.model_tag, UplinkConfig(srv.url, "cam-b", token, max_batch=64)).start()
        try:
            assert uplink.wait_drained(60), uplink.last_error
        finally:
            uplink.stop()
            spool.close()
        assert uplink.fatal is None and uplink.sessions >= 3  # one connection per run of one model
    rows = _frames(db, "cam-b")
    assert [r[0] for r in rows] == list(range(40))
    assert [r[1] for r in rows] == [A.model_id] * 20 + [B.model_id] * 10 + [A.model_id] * 10
    want = [*_expected_images(A, images[:20]), *_expected_images(B, images[20:30]), *_expected_images(A, images[30:])]
    assert [r[2] for r in rows] == want


def _expected_images(bundle: Bundle, images) -> np.ndarray:
    enc = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(bundle.file("classifier")), providers=["CPUExecutionProvider"])
    symbols = enc.run(None, {"frames": Preprocessor(bundle.input).batch(images)})[0]
    return cls.run(None, {"symbols": symbols})[0].argmax(axis=1)


def test_models_add_verifies_and_remove_keeps_what_is_needed(tmp_path):
    """`models add` refuses a bundle whose file does not match the manifest's sha256 or that has no golden vectors;
    `cameras set-group` + `models assign` keep a model; an unused one is removed with its registry folder."""
    db = tmp_path / "server.db"
    good = _bundle(tmp_path, "good", 5)
    bad = _bundle(tmp_path, "bad", 6)
    enc = bad.path / "encoder.onnx"
    enc.write_bytes(enc.read_bytes()[:-1] + bytes([enc.read_bytes()[-1] ^ 1]))
    out = _cli(db, "models", "add", str(bad.path), check=False)
    assert out.returncode == 2 and "sha256" in out.stderr and "encoder.onnx" in out.stderr
    plain = make_tiny_bundle(tmp_path / "plain", seed=7)  # no golden vectors
    out = _cli(db, "models", "add", str(plain.path), check=False)
    assert out.returncode == 2 and "golden" in out.stderr
    assert "added" in _cli(db, "models", "add", str(good.path)).stdout
    assert "already registered" in _cli(db, "models", "add", str(good.path)).stdout
    _cli(db, "cameras", "add", "cam-x")
    _cli(db, "cameras", "set-group", "cam-x", "--group", "yard")
    _cli(db, "models", "assign", good.model_id, "--group", "yard")
    out = _cli(db, "models", "remove", good.model_id, check=False)
    assert out.returncode == 2 and "still needed" in out.stderr and "cam-x" in out.stderr
    _cli(db, "models", "rollback", "--group", "yard")
    _cli(db, "models", "remove", good.model_id)
    assert good.model_id not in _cli(db, "models", "list").stdout
    assert not (Path(str(db) + ".models") / good.model_id).exists()


def test_restart_runs_the_model_last_switched_to(tmp_path):
    """<spool>/models/current names the model a rollout switched to: a restart with rollout on runs it (whatever
    --bundle says); without a trusted key, or when that bundle no longer verifies, the configured bundle is used."""
    from taskcodec.runtime.capture import CaptureConfig
    from taskcodec.runtime.rollout import startup_bundle

    _, pub = generate_signing_key(tmp_path / "op.key")
    B = _bundle(tmp_path / "spool" / "models", "b", 1)
    (tmp_path / "spool" / "models" / "current").write_text(B.model_id + "\n")
    (tmp_path / "spool" / "models" / "b").rename(tmp_path / "spool" / "models" / B.model_id)
    base = dict(device="virtual://fashion-mnist", server="http://127.0.0.1:9", camera_id="cam-r",
                spool=str(tmp_path / "spool"))
    assert startup_bundle(CaptureConfig(**base, trusted_keys=[str(pub)])).model_id == B.model_id
    assert startup_bundle(CaptureConfig(**base)) is None
    enc = tmp_path / "spool" / "models" / B.model_id / "encoder.onnx"
    enc.write_bytes(enc.read_bytes() + b"x")
    assert startup_bundle(CaptureConfig(**base, trusted_keys=[str(pub)])) is None


def test_rollout_routes_need_the_cameras_own_token(tmp_path):
    """Assignment, files and status answer 401 without the camera's own token (another camera's does not do)."""
    import urllib.error
    import urllib.request

    A = _bundle(tmp_path, "A", 0)
    with testing.ServerProcess(A.path, tmp_path / "server.db") as srv:
        t1, t2 = srv.add_camera("cam-1").decode(), srv.add_camera("cam-2").decode()

        def get(path: str, token: str | None, camera: str = "cam-1") -> int:
            headers = {"X-Camera-Id": camera, **({"Authorization": f"Bearer {token}"} if token else {})}
            try:
                with urllib.request.urlopen(urllib.request.Request(srv.url + path, headers=headers), timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        files = f"/v1/models/{A.model_id}/files/manifest.json"
        assert get("/v1/cameras/cam-1/assignment", t1) == 200 and get(files, t1) == 200
        assert get("/v1/cameras/cam-1/assignment", None) == 401 and get("/v1/cameras/cam-1/assignment", t2) == 401
        assert get(files, None) == 401 and get(files, t2) == 401
        assert get(f"/v1/models/{A.model_id}/files/..%2Fserver.db", t1) == 404  # only files the manifest names
        assert srv.get_json("/v1/cameras/cam-1/assignment", key=t1)["model_id"] == A.model_id
        assert "camera authentication failed" in srv.log()


def test_trusted_keys_from_the_runtime_yaml(tmp_path):
    """trusted_keys / rollout_poll in the runtime's YAML configuration (flags override it)."""
    from taskcodec.runtime.cli import build_config

    cfg = tmp_path / "camera.yaml"
    cfg.write_text("device: virtual://fashion-mnist\nserver: http://127.0.0.1:9\ncameras:\n  dock-1:\n"
                   "    trusted_keys: [/etc/taskcodec/operator.key.pub]\n    rollout_poll: 5\n")
    c = build_config({"camera_id": "dock-1", "trusted_keys": None, "rollout_poll": None}, cfg)
    assert c.trusted_keys == ["/etc/taskcodec/operator.key.pub"] and c.rollout_poll == 5
    c = build_config({"camera_id": "dock-1", "trusted_keys": ["/k.pub"], "rollout_poll": 0.5}, cfg)
    assert c.trusted_keys == ["/k.pub"] and c.rollout_poll == 0.5
