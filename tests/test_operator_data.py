"""An operator's own classes (issue 16): an image folder of real photos (scikit-image / scikit-learn scenes seen
through random camera crops) -> `taskcodec train --data folder:...` (RGB, 64 px, live per-epoch progress) ->
`taskcodec export` (refuses to overwrite, no traceback, out-of-domain threshold) -> `taskcodec calibrate --out`
(a new bundle) -> the edge runtime streaming image files -> the real server, which classifies in-domain frames into
the operator's classes and stores out-of-domain frames as "unknown"."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from taskcodec import testing
from taskcodec.bench.natural import IN_SCENES, camera_crops, make_image_folder, photo
from taskcodec.bundle import load_bundle
from taskcodec.cli import app
from taskcodec.runtime.capture import CaptureConfig, run_capture

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("operator")
    data = make_image_folder(root / "scenes", per_class=30, size=80, scenes=IN_SCENES[:4])
    run = root / "run"
    res = runner.invoke(app, ["train", "--data", f"folder:{data}", "--image-size", "64", "--epochs", "8",
                              "--batch-size", "48", "--latent-dim", "32", "--beta", "0.0003", "--out", str(run)])
    assert res.exit_code == 0, res.output
    return root, data, run, res.output


def test_train_from_an_image_folder_shows_live_progress(trained):
    root, data, run, output = trained
    for epoch in range(1, 9):  # one console line per epoch with loss, rate and accuracy
        assert f"epoch {epoch}/8: loss" in output
    assert " bits " in output and "accuracy " in output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["image_shape"] == [3, 64, 64]  # RGB detected, resized to --image-size
    info = json.loads((run / "data.json").read_text())
    assert info["classes"] == sorted(IN_SCENES[:4]) and info["n_train"] == 4 * 24 and info["n_test"] == 4 * 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert isinstance(metrics["machine"], dict) and metrics["machine"]["cores"] >= 1  # the machine, from the machine
    assert metrics["accuracy_mlp"] > 0.25  # 4 scenes: chance 0.25


def test_export_calibrate_and_stream_to_a_real_server(trained, tmp_path):
    root, data, run, _ = trained
    bundle_dir = root / "bundle"
    res = runner.invoke(app, ["export", str(run), "--out", str(bundle_dir)])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "model id" in res.output
    bundle = load_bundle(bundle_dir)
    assert bundle.classes == sorted(IN_SCENES[:4])
    assert (bundle.input.height, bundle.input.width, bundle.input.channels) == (64, 64, 3)
    ood = bundle.manifest["ood"]
    assert ood["score"] == "knn" and ood["false_alarm_rate"] == 0.01 and np.isfinite(ood["threshold"])

    res = runner.invoke(app, ["export", str(run), "--out", str(bundle_dir)])  # no silent overwrite
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, ["export", str(run), "--out", str(bundle_dir), "--force", "--no-parity"])
    assert res.exit_code == 0, res.output
    (tmp_path / "notes.txt").write_text("keep me")  # a folder that is not a bundle is never replaced
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path), "--force"])
    assert res.exit_code == 2 and "not a bundle" in res.output and (tmp_path / "notes.txt").is_file()

    res = runner.invoke(app, ["calibrate", str(bundle_dir)])  # never edits a bundle in place
    assert res.exit_code == 2 and "--out" in res.output
    calibrated = root / "bundle-int8"
    res = runner.invoke(app, ["calibrate", str(bundle_dir), "--out", str(calibrated), "--methods", "minmax",
                              "--activations", "u8", "--reduce-range", "off", "--budget", "100"])
    assert res.exit_code == 0, res.output
    new = load_bundle(calibrated)
    assert new.has("encoder_int8") and new.model_id != load_bundle(bundle_dir).model_id
    assert not load_bundle(bundle_dir).has("encoder_int8")  # the source bundle is left as it was

    # a camera looking at one of the scenes (a frame from the training folder) and at something never trained on
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(sorted((data / IN_SCENES[0]).iterdir())[0], frames / "0_in.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    assert cv2.imwrite(str(frames / "1_out.png"), noise)
    with testing.ServerProcess(bundle_dir, tmp_path / "server.db") as srv:
        token = srv.add_camera("cam-op").decode()
        report = run_capture(CaptureConfig(device=str(frames), bundle=str(bundle_dir), server=srv.url,
                                           camera_id="cam-op", token=token, spool=str(tmp_path / "spool"),
                                           frames=2, quiet=True, drain_timeout=60, threads=1))
        assert report.acked == 2
        stored = sorted(srv.get_json("/v1/cameras/cam-op/frames?limit=10")["frames"], key=lambda f: f["seq"])
    assert stored[0]["class_name"] in IN_SCENES[:4]
    assert stored[1]["class_name"] == "unknown" and stored[1]["prediction"] == -1


def test_bad_folders_and_files_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "ok.png"), np.zeros((8, 8), np.uint8))
    res = runner.invoke(app, ["train", "--data", f"folder:{tmp_path}", "--epochs", "0", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and str(tmp_path / "b") in res.output and "holds no images" in res.output
    cv2.imwrite(str(tmp_path / "b" / "ok.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    res = runner.invoke(app, ["train", "--data", f"folder:{tmp_path}", "--epochs", "0", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "broken.jpg" in res.output and "not a readable image" in res.output
