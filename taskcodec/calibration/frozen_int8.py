"""int8 camera encoder for the frozen-backbone bundle, through the one int8 pipeline (``schemes``, ``frames``,
``quantize``, ``measure``): its default scheme (``DEFAULT_SCHEME``), calibrated on real Fashion-MNIST train frames, and
a report against the fp32 encoder (symbol agreement, coded bytes, the bundle classifier's accuracy under the accuracy
gate, latency at batch 1 and 32 with 1 thread, measured interleaved, and what ORT runs of the graph).

What makes it fast (measured on this CPU, bench/results/transfer_int8_sweep.json): *every* Conv, Add and ReLU6
(Clip) is quantized, so ORT fuses each DQ -> Conv -> Clip -> Q into one QLinearConv and each residual into a
QLinearAdd, runs them NHWC with u8 activations x s8 per-channel weights (VNNI), and no DequantizeLinear ->
QuantizeLinear round trip is left between two convolutions (``graph_check``). A ReLU6 left in fp32 puts a DQ/Q pair
after every conv. The first conv must stay fp32: its input is the normalised image (Sub/Mul on the uint8 frame),
which ORT runs ~20x slower once its layout pass has moved it to NHWC; in fp32 that conv runs NCHWc and the
normalisation stays NCHW. The default keeps the stem and block 1 (the first 3 convs, 80x80) fp32 as one prefix, so
the int8 part starts once, at block 1's output: the most sensitive block, for ~0.1 ms.

What keeps it accurate: the error is mostly activation rounding (with every ReLU6 output and residual sum quantized
but the convs of only one block int8, the latent error is already 2/3 of the full model's), so the activation
ranges matter more than anything else. ``percentile`` ranges from our own histograms, 99.99 % of |x|
for ReLU6 outputs and 99.9 % for the linear-bottleneck conv outputs and residual sums (their rare outliers otherwise
cost the bulk its resolution), beat minmax, ORT's entropy (128 bins), one percentile for all, and per-tensor MSE on
the fp32 latents of held-out train frames. An optional per-latent gain/offset (``latent_correction``) fitted on the
calibration frames shrinks the int8 noise further (the noise inflates every latent's variance).

Measured (all 10000 Fashion-MNIST test frames, runs/bundles/frozen160): default scheme 70.5 % symbol agreement,
-0.53 points, 0.51x fp32 latency at batch 1 and 32; bench/results/transfer_int8_sweep.json has every scheme tried.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from taskcodec.calibration.frames import FROZEN_POOL, calibration_frames, eval_frames
from taskcodec.calibration.measure import FROZEN_BUDGET_POINTS, AccuracyGate, Comparison, interleaved_latency
from taskcodec.calibration.quantize import graph_check, quantize
from taskcodec.calibration.schemes import FROZEN_DEFAULT, Scheme

DEFAULT_SCHEME = FROZEN_DEFAULT
CALIB_FRAMES = 512


def int8_report(bundle, scheme: Scheme = DEFAULT_SCHEME, n_eval: int = 10000, write: bool = True,
                latency_rounds: int = 10, budget_points: float = FROZEN_BUDGET_POINTS, max_latency_ratio: float = 0.7,
                calib: int = CALIB_FRAMES, progress: Callable[[str], None] = print) -> dict:
    """Quantize the bundle's encoder on ``calib`` real Fashion-MNIST *train* frames (the head's training subset),
    then compare with fp32 on the first ``n_eval`` test frames: symbol agreement, coded bytes, the bundle classifier's
    accuracy, latency (ORT, 1 thread, interleaved) at batch 1 and 32. The int8 encoder is added to the bundle when
    the accuracy gate passes (``budget_points``, the gate the runtime relies on); ``passed`` also needs the latency
    target. ``latency_rounds=0`` skips timing (tests)."""
    from taskcodec.bundle import add_file

    calib_frames = calibration_frames(bundle.input, calib, pool=FROZEN_POOL)
    frames, labels = eval_frames(bundle.input, n_eval)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "encoder_int8.onnx"
        progress(f"calibrating int8 on {calib} frames: {scheme}")
        quantize(bundle.encoder_path(), int8_path, calib_frames, scheme)
        ref = Comparison(bundle, frames, labels)
        measured, int8 = ref.compare(int8_path, AccuracyGate(budget_points))
        result: dict = {"scheme": {**scheme.to_dict(), "calib": calib, "calibration_set": "fashion_mnist_train"},
                        "eval": f"{len(labels)} Fashion-MNIST test frames @ {bundle.input.height}px",
                        "graph": graph_check(int8_path), "fp32": ref.fp32, "int8": measured.pop("int8")}
        if latency_rounds:
            for batch in (1, 32):
                ms = interleaved_latency({"fp32": ref.fp32_session, "int8": int8}, frames, batch, rounds=latency_rounds)
                for name in ms:
                    result[name][f"latency_b{batch}_ms"] = ms[name]
                result[f"latency_ratio_b{batch}"] = ms["int8"] / ms["fp32"]
        result.update(measured)
        result["accuracy_passed"] = result.pop("passed")
        result["latency_passed"] = bool(latency_rounds) and all(
            result[f"latency_ratio_b{b}"] <= max_latency_ratio for b in (1, 32))
        result["passed"] = result["accuracy_passed"] and result["latency_passed"]
        result["targets"] = {"accuracy_drop_points_max": budget_points, "latency_ratio_max": max_latency_ratio}
        for name in ("fp32", "int8"):
            progress(f"{name}: {result[name]}")
        ratios = " ".join(f"b{b} {result[f'latency_ratio_b{b}']:.3f}" for b in (1, 32)
                          if f"latency_ratio_b{b}" in result)
        progress(f"symbol agreement {result['symbol_agreement']:.4f}, accuracy drop "
                 f"{result['accuracy_drop_points']:.2f} points ({result['frames_lost']} frames, "
                 f"{result['frames_allowed']} allowed), latency ratio int8/fp32 {ratios or 'not measured'}")
        if write and result["accuracy_passed"]:
            add_file(bundle, "encoder_int8", int8_path, "encoder_int8.onnx",
                     int8={k: v for k, v in result.items() if k not in ("fp32", "int8", "graph")})
    return result
