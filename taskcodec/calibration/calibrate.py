"""`taskcodec calibrate`: an int8 encoder as explicit Q/DQ ONNX from real calibration frames, with an accuracy gate.

Every scheme is calibrated on the same frames, then measured on held-out frames against the fp32 encoder: symbol
agreement, actual coded bits per image, downstream accuracy with the bundle's classifier, and latency at batch 1 and
32. The scheme that keeps accuracy within the budget and is fastest is written into the bundle as ``encoder_int8``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from taskcodec.calibration.schemes import Scheme
from taskcodec.bundle import Bundle, add_file
from taskcodec.coding import RangeCoder, compress
from taskcodec.providers import ort_session as session, run_batched as run

INT8_FILE = "encoder_int8.onnx"
REPORT_FILE = "calibration_report.json"


class CalibrationGateError(RuntimeError):
    """No scheme kept accuracy within the budget."""


class FrameReader(CalibrationDataReader):
    def __init__(self, input_name: str, frames: np.ndarray, batch: int = 32):
        self._batches = iter([{input_name: frames[i: i + batch]} for i in range(0, len(frames), batch)])

    def get_next(self):
        return next(self._batches, None)


def latency_ms(sess, frames: np.ndarray, batch: int, repeats: int = 30) -> float:
    """Median per-frame latency over ``repeats`` calls at this batch size (after warm-up)."""
    name = sess.get_inputs()[0].name
    x = frames[:batch]
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000 / batch


@dataclass
class SchemeResult:
    scheme: str
    symbol_agreement: float
    bits_per_image: float
    accuracy: float
    accuracy_drop: float
    latency_b1_ms: float
    latency_b32_ms: float
    passed: bool
    tensorrt_compatible: bool


def quantize(fp32: Path, out: Path, scheme: Scheme, frames: np.ndarray) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = session(pre).get_inputs()[0].name
        quantize_static(str(pre), str(out), FrameReader(name, frames), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], **scheme.quantize_kwargs())
    return out


def mean_coded_bits(bundle: Bundle, symbols: np.ndarray) -> float:
    coder = RangeCoder(bundle.tables)
    return float(np.mean([8 * len(compress(s, coder, bundle.model_tag)) for s in symbols]))


def calibrate(bundle: Bundle, calib_frames: np.ndarray, eval_frames: np.ndarray, eval_labels: np.ndarray,
              schemes: list[Scheme], budget_points: float = 0.5, write: bool = True,
              progress: Callable[[str], None] = print) -> dict:
    """Try each scheme; write the fastest passing one into the bundle; raise CalibrationGateError if none passes."""
    fp32 = session(bundle.encoder_path())
    classifier = session(bundle.file("classifier"))
    ref = run(fp32, eval_frames)
    ref_acc = float((run(classifier, ref).argmax(1) == eval_labels).mean())
    report = {
        "model_id": bundle.model_id,
        "calibration_frames": int(len(calib_frames)),
        "eval_frames": int(len(eval_frames)),
        "budget_points": budget_points,
        "fp32": {"accuracy": ref_acc, "bits_per_image": mean_coded_bits(bundle, ref),
                 "latency_b1_ms": latency_ms(fp32, eval_frames, 1), "latency_b32_ms": latency_ms(fp32, eval_frames, 32)},
        "schemes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        best: tuple[SchemeResult, Path] | None = None
        for scheme in schemes:
            path = quantize(bundle.encoder_path(), Path(tmp) / f"{scheme.name}.onnx", scheme, calib_frames)
            sess = session(path)
            sym = run(sess, eval_frames)
            acc = float((run(classifier, sym).argmax(1) == eval_labels).mean())
            drop = 100 * (ref_acc - acc)
            result = SchemeResult(scheme.name, float((sym == ref).mean()), mean_coded_bits(bundle, sym), acc, drop,
                                  latency_ms(sess, eval_frames, 1), latency_ms(sess, eval_frames, 32),
                                  drop <= budget_points, scheme.tensorrt_compatible)
            report["schemes"].append(asdict(result))
            progress(f"{scheme.name:>22}: agreement {result.symbol_agreement:.4f}  accuracy {acc:.4f} "
                     f"(drop {drop:+.2f} pt)  bits {result.bits_per_image:.1f}  "
                     f"b1 {result.latency_b1_ms:.3f} ms  b32 {result.latency_b32_ms:.3f} ms  {'PASS' if result.passed else 'fail'}")
            if result.passed and (best is None or result.latency_b1_ms < best[0].latency_b1_ms):
                best = (result, path)
        if best is None:
            raise CalibrationGateError(
                f"no int8 scheme kept accuracy within {budget_points} points of fp32 ({ref_acc:.4f}); best drop: "
                f"{min(s['accuracy_drop'] for s in report['schemes']):.2f} points. Raise --budget, add calibration "
                "data, or keep the fp32 encoder.")
        report["picked"] = best[0].scheme
        if write:
            add_file(bundle, "encoder_int8", best[1], INT8_FILE, int8={"scheme": best[0].scheme})
            (bundle.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
