"""Calibration: a real Q/DQ int8 encoder from real frames, the accuracy gate passing and failing, clear bad inputs."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from taskcodec.calibration.calibrate import CalibrationGateError, calibrate
from taskcodec.calibration.schemes import Scheme, all_schemes
from taskcodec.bundle import load_bundle
from taskcodec.cli import app
from taskcodec.data import load_fashion_mnist
from tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def frames():
    images, labels = load_fashion_mnist("test")
    return images[..., None], labels


def test_gate_passes_writes_qdq_int8_and_fails_with_a_clear_message(tmp_path, frames):
    x, _ = frames
    bundle = make_tiny_bundle(tmp_path / "b")
    # labels = the fp32 pipeline's own predictions, so accuracy measures what int8 changes
    from taskcodec.providers import ort_session as session, run_batched as run

    y = run(session(bundle.file("classifier")), run(session(bundle.encoder_path()), x[:600])).argmax(1)
    report = calibrate(bundle, x[1000:1256], x[:600], y, [Scheme("minmax", "u8", True), Scheme("percentile", "s8", False)],
                       budget_points=5.0, progress=lambda s: None)
    assert report["picked"] in {"minmax-u8-rr", "percentile-s8"}
    assert all(0.5 < s["symbol_agreement"] <= 1 for s in report["schemes"])
    again = load_bundle(bundle.path)
    assert again.model_id == bundle.model_id and again.has("encoder_int8")
    ops = {n.op_type for n in onnx.load(again.encoder_path("int8")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with pytest.raises(CalibrationGateError, match="no int8 scheme"):
        calibrate(bundle, x[1000:1256], x[:600], y, [Scheme("minmax", "s8", False)],
                  budget_points=-1.0, write=False, progress=lambda s: None)


def test_scheme_selection_and_cli_errors(tmp_path):
    assert all(s.tensorrt_compatible for s in all_schemes(["minmax", "entropy"], ["u8", "s8"], [False, True], "tensorrt"))
    with pytest.raises(ValueError, match="unknown calibration method"):
        all_schemes(["bogus"], ["u8"], [False], "cpu")
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a taskcodec bundle" in result.output
    make_tiny_bundle(tmp_path / "b")
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "b"), "--data", str(tmp_path / "nodata")])
    assert result.exit_code == 2 and "does not exist" in result.output
