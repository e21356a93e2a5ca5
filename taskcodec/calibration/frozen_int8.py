"""int8 camera encoder for the frozen-backbone bundle: ONNX Runtime static quantization calibrated on real
Fashion-MNIST train frames, and a report against the fp32 encoder (symbol agreement, coded bytes, the bundle
classifier's accuracy, latency at batch 1 and 32 with 1 thread, measured interleaved).

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

import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from taskcodec.training.transfer_datasets import render

METHODS = ("minmax", "entropy", "percentile", "mse")


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantize the encoder. The defaults are the scheme that met the target (see the module doc)."""

    method: str = "percentile"      # activation calibration: minmax, entropy, percentile or mse (histogram_ranges)
    percentile: float = 99.99       # method="percentile": of |x| for ReLU6 outputs,
    percentile_linear: float = 99.9  # and for the other activations (linear-bottleneck convs, residual sums)
    calib: int = 512                # real calibration frames (Fashion-MNIST train, never the eval set)
    fp32_first_convs: int = 3       # the first N convs (and the input normalisation before them) stay fp32
    fp32_last_convs: int = 0        # also keep the last N convs in fp32
    fp32_depthwise: bool = False    # exclude depthwise convs (ORT >= 1.21 re-quantizes a float conv between DQ and Q)
    quantize_clip: bool = True      # quantize ReLU6 so ORT folds it into the conv (False: a DQ/Q pair per Clip)
    quantize_add: bool = True       # residual Adds as QLinearAdd
    fmt: str = "qdq"                # qdq or qoperator
    activations: str = "u8"         # u8 (asymmetric) or s8 (symmetric)
    reduce_range: bool = False      # 7-bit weights, for CPUs without VNNI
    per_channel: bool = True        # per-output-channel weight scales
    latent_correction: bool = True  # per-latent gain/offset onto the fp32 latents, fitted on the calibration frames

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fmt not in ("qdq", "qoperator"):
            raise ValueError(f"format must be qdq or qoperator, got {self.fmt!r}")
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"activations must be u8 or s8, got {self.activations!r}")
        if self.fp32_first_convs < 0 or self.fp32_last_convs < 0:
            raise ValueError("fp32_first_convs and fp32_last_convs count convs: 0 or more")
        if self.calib < 1:
            raise ValueError("at least one calibration frame is needed")

    def to_dict(self) -> dict:
        return {**asdict(self), "calibration_set": "fashion_mnist_train", "weights": "s8 symmetric"}

    def quantize_kwargs(self) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Entropy, "mse": CalibrationMethod.Entropy}  # histogram_ranges
        extra = {"ActivationSymmetric": self.activations == "s8", "WeightSymmetric": True,
                 "CalibStridedMinMax": 4}  # calibrate 4 batches at a time: bounded memory for any --calib
        ops = ["Conv"] + (["Clip"] if self.quantize_clip else []) + (["Add"] if self.quantize_add else [])
        return {"calibrate_method": methods[self.method],
                "quant_format": QuantFormat.QDQ if self.fmt == "qdq" else QuantFormat.QOperator,
                "activation_type": QuantType.QUInt8 if self.activations == "u8" else QuantType.QInt8,
                "weight_type": QuantType.QInt8, "reduce_range": self.reduce_range, "per_channel": self.per_channel,
                "op_types_to_quantize": ops, "extra_options": extra}


DEFAULT_SCHEME = Int8Scheme()


def fp32_nodes(model_path: Path, scheme: Int8Scheme = DEFAULT_SCHEME) -> list[str]:
    """Names of the nodes the scheme keeps in fp32: the tail after the last conv's activation (pooling, affine,
    Round), everything before the ``fp32_first_convs + 1``-th conv (one fp32 prefix: no round trip), the last
    ``fp32_last_convs`` convs (from there on everything), depthwise convs."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    conv_idx = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not conv_idx:
        raise ValueError(f"{model_path} has no Conv node")
    last = nodes[conv_idx[-1]]
    start = conv_idx[-scheme.fp32_last_convs] if scheme.fp32_last_convs else conv_idx[-1] + 1
    names = [n.name for n in nodes[start:] if n.name and n.op_type != "Constant" and not (  # the last conv's
        not scheme.fp32_last_convs and n.op_type in ("Clip", "Relu") and n.input[0] == last.output[0])]  # ReLU6
    if scheme.fp32_first_convs:
        end = conv_idx[scheme.fp32_first_convs] if scheme.fp32_first_convs < len(conv_idx) else start
        names += [n.name for n in nodes[:end] if n.name and n.op_type != "Constant"]
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

    from taskcodec.providers import ort_session

    class Reader(FrameReader, CalibrationDataReader):
        pass

    kwargs = scheme.quantize_kwargs()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = ort_session(pre).get_inputs()[0].name
        reader = Reader(name, calib_frames)
        if len(reader) % 4:  # CalibStridedMinMax needs whole groups of 4 batches
            kwargs["extra_options"] = {**kwargs["extra_options"], "CalibStridedMinMax": len(reader)}
        with one_thread_sessions():
            if scheme.method in ("percentile", "mse"):  # ranges computed here, given as ORT's calibration cache
                kwargs["calibration_cache_path"] = histogram_ranges(pre, reader, kwargs["op_types_to_quantize"],
                                                                    Path(tmp) / "ranges.json", scheme)
            quantize_static(str(pre), str(out), reader, nodes_to_exclude=fp32_nodes(pre, scheme), **kwargs)
    if scheme.latent_correction:
        correct_latents(fp32, out, calib_frames)
    return Path(out)


def _latent_model(model, tensor: str):
    """A copy of ``model`` that also outputs ``tensor``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return copy.SerializeToString()


def correct_latents(fp32: Path, int8: Path, frames: np.ndarray, batch: int = 32) -> dict:
    """Per-latent least-squares gain and offset, fitted on calibration frames, that map the int8 encoder's latents
    (the input of Round) onto the fp32 encoder's; written into the int8 graph as a Mul + Add before Round (fp32,
    256 values per frame). int8 noise inflates every latent's variance; the fitted gain (< 1) shrinks it back."""
    import onnx
    from onnx import numpy_helper

    from taskcodec.providers import ort_session, run_batched

    def latents(model_bytes):
        return run_batched(ort_session(model_bytes), frames, batch, output=-1)

    models = {k: onnx.load(str(p)) for k, p in (("fp32", fp32), ("int8", int8))}
    rounds = {k: [n for n in m.graph.node if n.op_type == "Round"] for k, m in models.items()}
    if len(rounds["fp32"]) != 1 or len(rounds["int8"]) != 1:
        raise ValueError("latent correction needs exactly one Round node (the symbol quantizer) in the encoder")
    y32 = latents(_latent_model(models["fp32"], rounds["fp32"][0].input[0]))
    y8 = latents(_latent_model(models["int8"], rounds["int8"][0].input[0]))
    d8 = y8 - y8.mean(0)
    gain = ((d8 * (y32 - y32.mean(0))).sum(0) / np.maximum((d8 ** 2).sum(0), 1e-12)).astype(np.float32)
    offset = (y32.mean(0) - gain * y8.mean(0)).astype(np.float32)
    model, node = models["int8"], rounds["int8"][0]
    src = node.input[0]
    model.graph.initializer.extend([numpy_helper.from_array(gain, "latent_correction_gain"),
                                    numpy_helper.from_array(offset, "latent_correction_offset")])
    idx = list(model.graph.node).index(node)
    model.graph.node.insert(idx, onnx.helper.make_node("Add", ["latent_corrected_scaled", "latent_correction_offset"],
                                                       ["latent_corrected"], name="latent_correction_add"))
    model.graph.node.insert(idx, onnx.helper.make_node("Mul", [src, "latent_correction_gain"],
                                                       ["latent_corrected_scaled"], name="latent_correction_mul"))
    node.input[0] = "latent_corrected"
    onnx.save(model, str(int8))
    rms = lambda y: float(np.sqrt(((y - y32) ** 2).mean()))  # noqa: E731
    return {"gain_min": float(gain.min()), "gain_max": float(gain.max()),
            "calib_latent_rms_before": rms(y8), "calib_latent_rms_after": rms(gain * y8 + offset)}


def _mse_range(hist: np.ndarray, edges: np.ndarray, lowest: float, highest: float, levels: int = 255,
               grid: int = 100) -> tuple[float, float]:
    """[lo, hi] (containing 0, as ORT's scale/zero-point need) minimising the expected squared error of uint8
    quantization over a histogram: clipping error outside, uniform rounding noise (step^2 / 12) inside."""
    centers = (edges[:-1] + edges[1:]) / 2
    p = hist / max(hist.sum(), 1)
    lowest, highest = min(float(lowest), 0.0), max(float(highest), 0.0)
    los = np.linspace(lowest, 0.0, grid) if lowest < 0 else np.zeros(1)
    his = np.linspace(0.0, highest, grid + 1)[1:] if highest > 0 else np.full(1, 1e-6)
    above = np.where(centers[None, :] > his[:, None], centers[None, :] - his[:, None], 0.0) ** 2 @ p
    mass_above = (centers[None, :] > his[:, None]) @ p
    best = (np.inf, 0.0, 0.0)
    for lo in los:
        below = np.where(centers < lo, lo - centers, 0.0) ** 2 @ p
        inside = 1.0 - mass_above - p[centers < lo].sum()
        err = above + below + inside * ((his - lo) / levels) ** 2 / 12
        i = int(np.argmin(err))
        if err[i] < best[0]:
            best = (float(err[i]), float(lo), float(his[i]))
    return best[1], best[2]


def _percentile_range(hist: np.ndarray, edges: np.ndarray, lowest: float, highest: float, percentile: float
                      ) -> tuple[float, float]:
    """ORT's symmetric percentile rule on a signed histogram over [-t, t]: the ``percentile`` of |x|, as [-p, p]
    clamped to the observed [lowest, highest]."""
    half = len(hist) // 2
    folded = hist[half:] + hist[:half][::-1]  # |x| histogram (the bins are symmetric around 0)
    cdf = np.cumsum(folded) / max(folded.sum(), 1)
    t = float(edges[half:][min(int(np.searchsorted(cdf, percentile / 100.0)) + 1, half)])
    return max(-t, float(lowest)), min(t, float(highest))


def histogram_ranges(model: Path, reader: FrameReader, op_types: list[str], out: Path,
                     scheme: Int8Scheme, num_bins: int = 2048) -> Path:
    """Activation ranges from signed 2048-bin histograms of the calibration frames (ORT's entropy collector, 4
    batches at a time), written as an ORT calibration cache for ``quantize_static(calibration_cache_path=...)``.
    ``percentile``: ``scheme.percentile`` for ReLU6 outputs and ``scheme.percentile_linear`` for the other tensors
    (linear-bottleneck conv outputs, residual sums, whose rare outliers cost the most resolution); ``mse``: each
    tensor's own uint8 MSE optimum (``_mse_range``)."""
    import tempfile

    import onnx
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData, create_calibrator,
                                                    save_tensors_data)

    producer = {o: n.op_type for n in onnx.load(str(model)).graph.node for o in n.output}
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(Path(model), op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": num_bins})
        for start in range(0, len(reader), 4):
            reader.set_range(start, min(start + 4, len(reader)))
            calibrator.collect_data(reader)
        histograms = calibrator.collector.histogram_dict
        del calibrator
    ranges = {}
    for name, (hist, edges, lowest, highest, _) in histograms.items():
        hist, edges = np.asarray(hist, np.float64), np.asarray(edges, np.float64)
        if scheme.method == "mse":
            lo, hi = _mse_range(hist, edges, lowest, highest)
        else:
            p = scheme.percentile if producer.get(name) in ("Clip", "Relu") else scheme.percentile_linear
            lo, hi = _percentile_range(hist, edges, lowest, highest, p)
        ranges[name] = TensorData(lowest=np.float32(min(lo, 0.0)), highest=np.float32(max(hi, 0.0)))
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, ranges), out)
    return out


def graph_check(model_path: Path) -> dict:
    """What ORT (level ALL, 1 thread) actually runs: op counts of the optimized graph, and the DequantizeLinear ->
    QuantizeLinear pairs left in it (each one is an int8 -> fp32 -> int8 round trip)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from taskcodec.providers import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        ort_session(model_path, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    optimized_model_filepath=optimized,
                    log_severity_level=3)  # the "hardware-specific optimized model" warning
        graph = onnx.load(optimized).graph
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


def int8_report(bundle, scheme: Int8Scheme = DEFAULT_SCHEME, n_eval: int = 10000, write: bool = True,
                latency_rounds: int = 10, budget_points: float = 1.0, max_latency_ratio: float = 0.7,
                progress: Callable[[str], None] = print) -> dict:
    """Quantize the bundle's encoder on real Fashion-MNIST *train* frames, then compare with fp32 on test frames:
    symbol agreement, coded bytes, the bundle classifier's accuracy, latency (ORT, 1 thread, interleaved) at batch 1
    and 32. The int8 encoder is added to the bundle when accuracy stays within ``budget_points`` (the gate the
    runtime relies on); ``passed`` also needs the latency target. ``latency_rounds=0`` skips timing (tests)."""
    import tempfile

    from taskcodec.providers import ort_session as session, run_batched as ort_run
    from taskcodec.bundle import add_file
    from taskcodec.coding import RangeCoder, compress
    from taskcodec.training.transfer_datasets import load_fashion_mnist_test, load_fashion_mnist_train

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
        ratios = " ".join(f"b{b} {result[f'latency_ratio_b{b}']:.3f}" for b in (1, 32)
                          if f"latency_ratio_b{b}" in result)
        progress(f"symbol agreement {result['symbol_agreement']:.4f}, accuracy drop "
                 f"{result['accuracy_drop_points']:.2f} points, latency ratio int8/fp32 {ratios or 'not measured'}")
        if write and result["accuracy_passed"]:
            add_file(bundle, "encoder_int8", int8_path, "encoder_int8.onnx",
                     int8={k: v for k, v in result.items() if k not in ("fp32", "int8", "graph")})
    return result
