"""`taskcodec calibrate`: the int8 encoder of a trained bundle as explicit Q/DQ ONNX, chosen from a grid of schemes
by the accuracy gate.

Every scheme (``schemes.all_schemes``) is quantized (``quantize.quantize``) on the same calibration frames, then
measured on held-out frames against the fp32 encoder (``measure.Comparison``): symbol agreement, actual coded bits
per image, downstream accuracy with the bundle's classifier, and latency at batch 1 and 32 (all encoders interleaved,
one thread, in a shuffled order every round). Of the schemes within the budget (``measure.AccuracyGate``) the
fastest at batch 1 is written into the bundle as ``encoder_int8``; latencies within ``LATENCY_TIE`` of the fastest
count as a tie, won by the scheme tried first (the grid's order: minmax, entropy, percentile; u8 before s8; without
reduce_range first), so a re-run on a noisy machine picks the same scheme.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from taskcodec.bundle import Bundle, add_file
from taskcodec.calibration.measure import TRAINED_BUDGET_POINTS, AccuracyGate, Comparison, interleaved_latency
from taskcodec.calibration.quantize import quantize
from taskcodec.calibration.schemes import Scheme

INT8_FILE = "encoder_int8.onnx"
REPORT_FILE = "calibration_report.json"
# a scheme must be more than 10 % faster than one tried before it to be picked instead: measured in a shuffled
# order every round, two schemes that make the same int8 graph (minmax-u8, entropy-u8 on the default bundle) come
# out within 3 % of each other (in a fixed order, up to 2x apart)
LATENCY_TIE = 0.10


class CalibrationGateError(RuntimeError):
    """No scheme kept accuracy within the budget."""


@dataclass
class SchemeResult:
    scheme: str
    symbol_agreement: float
    bits_per_image: float
    accuracy: float
    accuracy_drop: float
    frames_lost: int
    frames_allowed: int
    latency_b1_ms: float
    latency_b32_ms: float
    passed: bool
    tensorrt_compatible: bool


def pick(results: list[SchemeResult]) -> SchemeResult | None:
    """The fastest passing scheme at batch 1, ties (within LATENCY_TIE) to the one tried first."""
    passing = [r for r in results if r.passed]
    if not passing:
        return None
    fastest = min(r.latency_b1_ms for r in passing)
    return next(r for r in passing if r.latency_b1_ms <= fastest * (1 + LATENCY_TIE))


def calibrate(bundle: Bundle, calib_frames: np.ndarray, eval_frames: np.ndarray, eval_labels: np.ndarray,
              schemes: list[Scheme], budget_points: float = TRAINED_BUDGET_POINTS, write: bool = True,
              progress: Callable[[str], None] = print, latency_rounds: int = 10) -> dict:
    """Try each scheme; write the picked one into the bundle; raise CalibrationGateError if none passes."""
    gate = AccuracyGate(budget_points)
    ref = Comparison(bundle, eval_frames, eval_labels)
    n = len(eval_labels)
    report = {
        "model_id": bundle.model_id,
        "calibration_frames": int(len(calib_frames)),
        "eval_frames": int(n),
        "budget_points": budget_points,
        "frames_allowed": gate.allowed_frames(n),
        "fp32": {"accuracy": ref.fp32["accuracy"], "bits_per_image": 8 * ref.fp32["bytes_per_image"]},
        "schemes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        sessions, measured, paths = {"fp32": ref.fp32_session}, {}, {}
        for scheme in schemes:
            path = Path(tmp) / f"{scheme.name}.onnx"
            paths[scheme.name] = quantize(bundle.encoder_path(), path, calib_frames, scheme)
            measured[scheme.name], sessions[scheme.name] = ref.compare(paths[scheme.name], gate)
        latency = {b: interleaved_latency(sessions, eval_frames, b, rounds=latency_rounds, repeats=20, shuffle=0)
                   for b in (1, 32)}
        report["fp32"].update(latency_b1_ms=latency[1]["fp32"], latency_b32_ms=latency[32]["fp32"])
        results = []
        for scheme in schemes:
            m = measured[scheme.name]
            result = SchemeResult(scheme.name, m["symbol_agreement"], 8 * m["int8"]["bytes_per_image"],
                                  m["int8"]["accuracy"], m["accuracy_drop_points"], m["frames_lost"],
                                  m["frames_allowed"], latency[1][scheme.name], latency[32][scheme.name], m["passed"],
                                  scheme.tensorrt_compatible)
            results.append(result)
            report["schemes"].append(asdict(result))
            progress(f"{scheme.name:>22}: agreement {result.symbol_agreement:.4f}  accuracy {result.accuracy:.4f} "
                     f"(drop {result.accuracy_drop:+.2f} pt, {result.frames_lost:+d} frames)  "
                     f"bits {result.bits_per_image:.1f}  b1 {result.latency_b1_ms:.3f} ms  "
                     f"b32 {result.latency_b32_ms:.3f} ms  {'PASS' if result.passed else 'fail'}")
        best = pick(results)
        if best is None:
            raise CalibrationGateError(
                f"no int8 scheme kept accuracy within {budget_points} points ({gate.allowed_frames(n)} of {n} frames) "
                f"of fp32 ({ref.fp32['accuracy']:.4f}); best drop: {min(r.accuracy_drop for r in results):.2f} points. "
                "Raise --budget, add calibration data, or keep the fp32 encoder.")
        report["picked"] = best.scheme
        if write:
            add_file(bundle, "encoder_int8", paths[best.scheme], INT8_FILE, int8={"scheme": best.scheme})
            (bundle.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
