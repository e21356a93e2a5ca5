"""int8 camera encoder for the frozen-backbone bundle: ONNX Runtime static quantization calibrated on real
Fashion-MNIST train frames, and a report against the fp32 encoder (symbol agreement, coded bytes, the bundle
classifier's accuracy, latency at batch 1 and 32 with 1 thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from training.transfer_datasets import render


def tail_nodes(model_path: Path, last_convs: int = 0, depthwise: bool = False) -> list[str]:
    """Names of the nodes after the last Conv (pooling, affine, Round), plus the last ``last_convs`` Conv nodes
    (and every depthwise Conv with ``depthwise``): the part of the graph kept in fp32."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    conv_idx = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    start = conv_idx[-last_convs] if last_convs else conv_idx[-1] + 1
    names = [n.name for n in nodes[start:] if n.name]
    if depthwise:
        names += [n.name for n in nodes[:start] if n.op_type == "Conv" and
                  any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return names


def quantize_encoder(fp32: Path, out: Path, calib_frames: np.ndarray, method: str = "percentile",
                     activations: str = "u8", reduce_range: bool = False, keep_fp32_convs: int = 1,
                     fmt: str = "qdq", fp32_depthwise: bool = False) -> Path:
    """Static int8 with ONNX Runtime: per-channel weights, calibration on real frames, the tail kept in fp32."""
    import tempfile

    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from calibration.calibrate import FrameReader, session
    from calibration.schemes import Scheme

    kwargs = Scheme(method, activations, reduce_range).quantize_kwargs()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = session(pre).get_inputs()[0].name
        quantize_static(str(pre), str(out), FrameReader(name, calib_frames),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        op_types_to_quantize=["Conv", "Add", "MatMul", "Gemm"],
                        nodes_to_exclude=tail_nodes(pre, keep_fp32_convs, fp32_depthwise), **kwargs)
    return out


def int8_report(bundle, calib: int = 256, method: str = "percentile", keep_fp32_convs: int = 1,
                reduce_range: bool = False, fmt: str = "qdq", fp32_depthwise: bool = False,
                n_eval: int = 1000, write: bool = True,
                progress: Callable[[str], None] = print) -> dict:
    """Quantize the bundle's encoder on real Fashion-MNIST *train* frames, then compare with fp32 on test frames:
    symbol agreement, coded bits, the bundle classifier's accuracy, latency (ORT, 1 thread) at batch 1 and 32.
    The int8 encoder is added to the bundle when accuracy stays within 1 point."""
    import tempfile

    from calibration.calibrate import latency_ms, run as ort_run, session
    from taskcodec.bundle import add_file
    from taskcodec.coding import RangeCoder, compress
    from training.transfer_datasets import load_fashion_mnist_test, load_fashion_mnist_train

    size = bundle.input.height
    calib_frames = render(load_fashion_mnist_train().images[:calib], size)
    test = load_fashion_mnist_test()
    frames, labels = render(test.images[:n_eval], size), test.labels[:n_eval]
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "encoder_int8.onnx"
        progress(f"calibrating int8 ({method}, {calib} frames, last {keep_fp32_convs} conv(s) + tail in fp32)")
        quantize_encoder(bundle.encoder_path(), int8_path, calib_frames, method=method, reduce_range=reduce_range,
                         keep_fp32_convs=keep_fp32_convs, fmt=fmt, fp32_depthwise=fp32_depthwise)
        fp32, int8 = session(bundle.encoder_path()), session(int8_path)
        classifier = session(bundle.file("classifier"))
        result: dict = {"scheme": {"method": method, "keep_fp32_convs": keep_fp32_convs, "reduce_range": reduce_range,
                                   "format": fmt, "fp32_depthwise": fp32_depthwise, "per_channel": True, "calibration_frames": calib,
                                   "calibration_set": "fashion_mnist_train"},
                        "eval": f"{n_eval} Fashion-MNIST test frames @ {size}px"}
        coder = RangeCoder(bundle.tables)
        for name, sess in (("fp32", fp32), ("int8", int8)):
            symbols = ort_run(sess, frames, batch=32)
            pred = ort_run(classifier, symbols).argmax(1)
            result[name] = {
                "accuracy": float((pred == labels).mean()),
                "bytes_per_image": float(np.mean([len(compress(s, coder, bundle.model_tag)) for s in symbols])),
                "latency_b1_ms": latency_ms(sess, frames, 1),
                "latency_b32_ms": latency_ms(sess, frames, 32, repeats=5),
            }
            result[name + "_symbols"] = symbols
            progress(f"{name}: {result[name]}")
        s32, s8 = result.pop("fp32_symbols"), result.pop("int8_symbols")
        result["symbol_agreement"] = float((s32 == s8).mean())
        result["symbols_within_1"] = float((np.abs(s32 - s8) <= 1).mean())
        result["accuracy_drop_points"] = 100 * (result["fp32"]["accuracy"] - result["int8"]["accuracy"])
        result["latency_ratio_b1"] = result["int8"]["latency_b1_ms"] / result["fp32"]["latency_b1_ms"]
        result["latency_ratio_b32"] = result["int8"]["latency_b32_ms"] / result["fp32"]["latency_b32_ms"]
        result["passed"] = bool(result["accuracy_drop_points"] <= 1.0)
        if write and result["passed"]:
            add_file(bundle, "encoder_int8", int8_path, "encoder_int8.onnx",
                     int8={k: v for k, v in result.items() if k not in ("fp32", "int8")})
    return result
