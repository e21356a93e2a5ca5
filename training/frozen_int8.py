"""int8 camera encoder for the frozen-backbone bundle: ONNX Runtime static quantization calibrated on real
Fashion-MNIST train frames, and a report against the fp32 encoder (symbol agreement, coded bytes, the bundle
classifier's accuracy, latency at batch 1 and 32 with 1 thread, measured interleaved).

What makes it fast (measured on this CPU, bench/results/transfer_int8_sweep.json): *every* Conv, Add and ReLU6
(Clip) is quantized, so ORT fuses each DQ -> Conv -> Clip -> Q into one QLinearConv and each residual into a
QLinearAdd, runs them NHWC with u8 activations x s8 per-channel weights (VNNI), and no DequantizeLinear ->
QuantizeLinear round trip is left between two convolutions (``graph_check``). Leaving a Clip or a depthwise conv in
fp32 puts a DQ/Q pair around it and made the encoder slower than fp32. The first conv stays fp32: its input is the
normalised image (Sub/Mul on the uint8 frame), which ORT runs ~20x slower once the layout pass has moved it to NHWC;
in fp32 that conv runs NCHWc, the normalisation stays NCHW, and the int8 part starts at its ReLU6 output.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from training.transfer_datasets import render

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantize the encoder. The defaults are the scheme that met the target (see the module doc)."""

    method: str = "minmax"          # activation calibration: minmax, entropy or percentile
    percentile: float = 99.999      # for method="percentile"
    calib: int = 512                # real calibration frames (Fashion-MNIST train, never the eval set)
    fp32_first_conv: bool = True    # keep the first conv (and the input normalisation before it) in fp32
    fp32_last_convs: int = 0        # also keep the last N convs in fp32
    fp32_depthwise: bool = False    # exclude depthwise convs (ORT >= 1.21 re-quantizes a float conv between DQ and Q)
    quantize_clip: bool = True      # quantize ReLU6 so ORT folds it into the conv (False: a DQ/Q pair per Clip)
    quantize_add: bool = True       # residual Adds as QLinearAdd
    fmt: str = "qdq"                # qdq or qoperator
    activations: str = "u8"         # u8 (asymmetric) or s8 (symmetric)
    reduce_range: bool = False      # 7-bit weights, for CPUs without VNNI
    per_channel: bool = True        # per-output-channel weight scales

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fmt not in ("qdq", "qoperator"):
            raise ValueError(f"format must be qdq or qoperator, got {self.fmt!r}")
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"activations must be u8 or s8, got {self.activations!r}")
        if self.calib < 1:
            raise ValueError("at least one calibration frame is needed")

    def to_dict(self) -> dict:
        return {**asdict(self), "calibration_set": "fashion_mnist_train", "weights": "s8 symmetric"}

    def quantize_kwargs(self) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        extra = {"ActivationSymmetric": self.activations == "s8", "WeightSymmetric": True,
                 "CalibStridedMinMax": 4}  # calibrate 4 batches at a time: bounded memory for any --calib
        if self.method == "percentile":
            extra["CalibPercentile"] = self.percentile
        ops = ["Conv"] + (["Clip"] if self.quantize_clip else []) + (["Add"] if self.quantize_add else [])
        return {"calibrate_method": methods[self.method],
                "quant_format": QuantFormat.QDQ if self.fmt == "qdq" else QuantFormat.QOperator,
                "activation_type": QuantType.QUInt8 if self.activations == "u8" else QuantType.QInt8,
                "weight_type": QuantType.QInt8, "reduce_range": self.reduce_range, "per_channel": self.per_channel,
                "op_types_to_quantize": ops, "extra_options": extra}


DEFAULT_SCHEME = Int8Scheme()


def fp32_nodes(model_path: Path, scheme: Int8Scheme = DEFAULT_SCHEME) -> list[str]:
    """Names of the nodes the scheme keeps in fp32: the tail after the last conv's activation (pooling, affine,
    Round), the first conv, the last ``fp32_last_convs`` convs (from there on everything), depthwise convs."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    conv_idx = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not conv_idx:
        raise ValueError(f"{model_path} has no Conv node")
    last = nodes[conv_idx[-1]]
    start = conv_idx[-scheme.fp32_last_convs] if scheme.fp32_last_convs else conv_idx[-1] + 1
    names = [n.name for n in nodes[start:] if n.name and n.op_type != "Constant" and not (  # the last conv's
        not scheme.fp32_last_convs and n.op_type in ("Clip", "Relu") and n.input[0] == last.output[0])]  # ReLU6
    if scheme.fp32_first_conv:
        names.append(nodes[conv_idx[0]].name)
    if scheme.fp32_depthwise:
        names += [n.name for n in nodes[:start] if n.op_type == "Conv" and
                  any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return names


class FrameReader:
    """Calibration batches of uint8 frames; ``set_range`` lets ORT calibrate a few batches at a time."""

    def __init__(self, input_name: str, frames: np.ndarray, batch: int = 32):
        self._items = [{input_name: frames[i: i + batch]} for i in range(0, len(frames), batch)]
        self.set_range(0, len(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._items[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


@contextlib.contextmanager
def one_thread_sessions():
    """ORT's calibrator builds its own InferenceSession with default (all-core) threading; make it 1 thread."""
    import onnxruntime as ort

    original = ort.SessionOptions

    def make():
        options = original()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        return options

    ort.SessionOptions = make
    try:
        yield
    finally:
        ort.SessionOptions = original


def quantize_encoder(fp32: Path, out: Path, calib_frames: np.ndarray, scheme: Int8Scheme = DEFAULT_SCHEME) -> Path:
    """Static int8 with ONNX Runtime, calibrated (1 thread) on ``calib_frames`` (all of them: pass ``scheme.calib``)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from calibration.calibrate import session

    class Reader(FrameReader, CalibrationDataReader):
        pass

    kwargs = scheme.quantize_kwargs()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = session(pre).get_inputs()[0].name
        reader = Reader(name, calib_frames)
        if len(reader) % 4:  # CalibStridedMinMax needs whole groups of 4 batches
            kwargs["extra_options"] = {**kwargs["extra_options"], "CalibStridedMinMax": len(reader)}
        with one_thread_sessions():
            quantize_static(str(pre), str(out), reader, nodes_to_exclude=fp32_nodes(pre, scheme), **kwargs)
    return Path(out)


def graph_check(model_path: Path) -> dict:
    """What ORT (level ALL, 1 thread) actually runs: op counts of the optimized graph, and the DequantizeLinear ->
    QuantizeLinear pairs left in it (each one is an int8 -> fp32 -> int8 round trip)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware-specific optimized model" warning
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    producer = {o: n for n in graph.node for o in n.output}

    def from_dequantize(tensor: str) -> bool:  # does this fp32 tensor derive from a DequantizeLinear output?
        stack, seen = [tensor], set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "DequantizeLinear":
                return True
            stack.extend(node.input)
        return False

    fp32_between = sum(n.op_type == "QuantizeLinear" and from_dequantize(n.input[0]) for n in graph.node)
    ops = Counter((f"{n.domain}:" if n.domain else "") + n.op_type for n in graph.node)
    return {"ops": dict(sorted(ops.items())), "dq_to_q_round_trips": fp32_between}


def interleaved_latency(sessions: dict, frames: np.ndarray, batch: int, rounds: int = 10, repeats: int = 5
                        ) -> dict[str, float]:
    """Per-frame ms at this batch size for each session, measured in alternation (A x repeats, B x repeats, A ...)
    so that load from other processes hits all of them alike: median over rounds of the median over repeats."""
    x = frames[:batch]
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    per: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times.append(time.perf_counter() - t)
            per[k].append(float(np.median(times)) * 1000 / len(x))
    return {k: float(np.median(v)) for k, v in per.items()}


def int8_report(bundle, scheme: Int8Scheme = DEFAULT_SCHEME, n_eval: int = 2000, write: bool = True,
                latency_rounds: int = 10, budget_points: float = 1.0, max_latency_ratio: float = 0.7,
                progress: Callable[[str], None] = print) -> dict:
    """Quantize the bundle's encoder on real Fashion-MNIST *train* frames, then compare with fp32 on test frames:
    symbol agreement, coded bytes, the bundle classifier's accuracy, latency (ORT, 1 thread, interleaved) at batch 1
    and 32. The int8 encoder is added to the bundle when accuracy stays within ``budget_points`` (the gate the
    runtime relies on); ``passed`` also needs the latency target. ``latency_rounds=0`` skips timing (tests)."""
    import tempfile

    from calibration.calibrate import run as ort_run, session
    from taskcodec.bundle import add_file
    from taskcodec.coding import RangeCoder, compress
    from training.transfer_datasets import load_fashion_mnist_test, load_fashion_mnist_train

    size = bundle.input.height
    train = load_fashion_mnist_train()
    if scheme.calib > len(train):
        raise ValueError(f"--calib {scheme.calib}: only {len(train)} calibration frames available")
    calib_frames = render(train.images[:scheme.calib], size)
    test = load_fashion_mnist_test(max(2000, n_eval))
    frames, labels = render(test.images[:n_eval], size), test.labels[:n_eval]
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "encoder_int8.onnx"
        progress(f"calibrating int8 on {scheme.calib} frames: {scheme}")
        quantize_encoder(bundle.encoder_path(), int8_path, calib_frames, scheme)
        fp32, int8 = session(bundle.encoder_path()), session(int8_path)
        classifier = session(bundle.file("classifier"))
        result: dict = {"scheme": scheme.to_dict(), "eval": f"{n_eval} Fashion-MNIST test frames @ {size}px",
                        "graph": graph_check(int8_path)}
        coder = RangeCoder(bundle.tables)
        symbols = {}
        for name, sess in (("fp32", fp32), ("int8", int8)):
            symbols[name] = ort_run(sess, frames, batch=32)
            pred = ort_run(classifier, symbols[name]).argmax(1)
            result[name] = {"accuracy": float((pred == labels).mean()),
                            "bytes_per_image": float(np.mean([len(compress(s, coder, bundle.model_tag))
                                                              for s in symbols[name]]))}
        if latency_rounds:
            for batch in (1, 32):
                ms = interleaved_latency({"fp32": fp32, "int8": int8}, frames, batch, rounds=latency_rounds)
                for name in ms:
                    result[name][f"latency_b{batch}_ms"] = ms[name]
                result[f"latency_ratio_b{batch}"] = ms["int8"] / ms["fp32"]
        s32, s8 = symbols["fp32"], symbols["int8"]
        result["symbol_agreement"] = float((s32 == s8).mean())
        result["symbols_within_1"] = float((np.abs(s32 - s8) <= 1).mean())
        result["symbol_mean_abs_error"] = float(np.abs(s32 - s8).mean())
        result["accuracy_drop_points"] = 100 * (result["fp32"]["accuracy"] - result["int8"]["accuracy"])
        result["accuracy_passed"] = bool(result["accuracy_drop_points"] <= budget_points)
        result["latency_passed"] = bool(latency_rounds) and all(
            result[f"latency_ratio_b{b}"] <= max_latency_ratio for b in (1, 32))
        result["passed"] = result["accuracy_passed"] and result["latency_passed"]
        result["targets"] = {"accuracy_drop_points_max": budget_points, "latency_ratio_max": max_latency_ratio}
        for name in ("fp32", "int8"):
            progress(f"{name}: {result[name]}")
        progress(f"symbol agreement {result['symbol_agreement']:.4f}, accuracy drop "
                 f"{result['accuracy_drop_points']:.2f} points, latency ratio b1 "
                 f"{result.get('latency_ratio_b1', float('nan')):.3f} b32 {result.get('latency_ratio_b32', float('nan')):.3f}")
        if write and result["accuracy_passed"]:
            add_file(bundle, "encoder_int8", int8_path, "encoder_int8.onnx",
                     int8={k: v for k, v in result.items() if k not in ("fp32", "int8", "graph")})
    return result
