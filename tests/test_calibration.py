"""Calibration: a real Q/DQ int8 encoder from real frames, the accuracy gate passing and failing, clear bad inputs."""

import onnx
import pytest
from typer.testing import CliRunner

from taskcodec.calibration.calibrate import CalibrationGateError, calibrate
from taskcodec.calibration.schemes import all_schemes, trained_scheme
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
    schemes = [trained_scheme("minmax", "u8", True), trained_scheme("percentile", "s8", False)]
    report = calibrate(bundle, x[1000:1256], x[:600], y, schemes, budget_points=5.0, progress=lambda s: None,
                       latency_rounds=2)
    assert report["picked"] in {"minmax-u8-rr", "percentile-s8"}
    assert all(0.5 < s["symbol_agreement"] <= 1 for s in report["schemes"])
    again = load_bundle(bundle.path)
    assert again.model_id == bundle.model_id and again.has("encoder_int8")
    ops = {n.op_type for n in onnx.load(again.encoder_path("int8")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with pytest.raises(CalibrationGateError, match="no int8 scheme"):
        calibrate(bundle, x[1000:1256], x[:600], y, [trained_scheme("minmax", "s8", False)],
                  budget_points=-1.0, write=False, progress=lambda s: None, latency_rounds=1)


def test_scheme_selection_and_cli_errors(tmp_path):
    assert all(s.tensorrt_compatible for s in all_schemes(["minmax", "entropy"], ["u8", "s8"], [False, True], "tensorrt"))
    with pytest.raises(ValueError, match="unknown calibration method"):
        all_schemes(["bogus"], ["u8"], [False], "cpu")
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nope"), "--dry-run"])
    assert result.exit_code == 2 and "not a taskcodec bundle" in result.output
    make_tiny_bundle(tmp_path / "b")
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "b"), "--data", str(tmp_path / "nodata"), "--dry-run"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_gate_counts_frames_exactly_and_picks_reproducibly():
    """One gate for every bundle: the budget in points is a whole number of frames, computed without float rounding
    (0.57 points of 10000 frames is 57 frames, where 0.57 * 10000 / 100 in floats is 56.99999999999999), a loss of
    exactly the budget passes, one frame more fails; latencies within the tie margin go to the scheme tried first."""
    from taskcodec.calibration.calibrate import LATENCY_TIE, SchemeResult, pick
    from taskcodec.calibration.measure import AccuracyGate

    assert 0.57 * 10000 / 100 < 57 and AccuracyGate(0.57).allowed_frames(10000) == 57
    assert AccuracyGate(0.57).check(9000, 8943, 10000)["passed"]  # 57 frames lost: 0.57 points, within the budget
    assert AccuracyGate(0.5).allowed_frames(10000) == 50 and AccuracyGate(1.0).allowed_frames(256) == 2
    assert AccuracyGate(0.5).check(9019, 8969, 10000)["passed"]
    assert not AccuracyGate(0.5).check(9019, 8968, 10000)["passed"]
    assert AccuracyGate(0.0).check(10, 11, 20)["frames_lost"] == -1
    assert not AccuracyGate(-1.0).check(100, 100, 100)["passed"]

    def row(name, ms, passed=True):
        return SchemeResult(name, 1.0, 48.0, 0.9, 0.0, 0, 50, ms, ms, passed, False)

    assert pick([row("a", 0.050), row("b", 0.050 / (1 + LATENCY_TIE) + 1e-6)]).scheme == "a"  # a tie: tried first
    assert pick([row("a", 0.050), row("b", 0.030)]).scheme == "b"
    assert pick([row("a", 0.010, passed=False), row("b", 0.030)]).scheme == "b"
    assert pick([row("a", 0.010, passed=False)]) is None
