"""Quantize an encoder with one :class:`~taskcodec.calibration.schemes.Scheme`: ONNX Runtime static quantization
calibrated (one thread, a few batches at a time) on real frames, with the scheme's fp32 nodes, activation ranges and
optional per-latent correction; and :func:`graph_check`, what ONNX Runtime actually runs of the result."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from taskcodec.calibration.frames import FrameReader
from taskcodec.calibration.schemes import FROZEN_DEFAULT, Scheme
from taskcodec.providers import ort_session, run_batched

# ORT's calibrators keep every activation of the frames they collect in memory, which grows with the input size:
# collect at most this many input values at once (4 batches of 32 RGB frames of 160 px: MobileNetV2 fits in a few
# GB). Small inputs are collected in one go (the 28 px trained encoder: all 512 frames).
CHUNK_VALUES = 4 * 32 * 160 * 160 * 3


def chunk_batches(reader: FrameReader, frames: np.ndarray) -> int:
    """How many of the reader's batches to calibrate at once: as many as CHUNK_VALUES allows, a divisor of their
    number (ORT's strided calibration needs one)."""
    per_batch = max(1, len(frames) // max(len(reader), 1)) * int(np.prod(frames.shape[1:]))
    chunk = min(max(1, CHUNK_VALUES // per_batch), max(len(reader), 1))
    while len(reader) % chunk:
        chunk -= 1
    return chunk


def quantize(fp32: Path, out: Path, calib_frames: np.ndarray, scheme: Scheme = FROZEN_DEFAULT) -> Path:
    """Static int8 of the encoder ``fp32`` into ``out``, calibrated on all of ``calib_frames`` (uint8, the bundle's
    input layout)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    kwargs = scheme.quantize_kwargs()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        reader = FrameReader(ort_session(pre).get_inputs()[0].name, calib_frames)
        chunk = chunk_batches(reader, calib_frames)
        kwargs["extra_options"]["CalibStridedMinMax"] = chunk
        with one_thread_sessions():
            if scheme.histogram_ranges:  # ranges computed here, given as ORT's calibration cache
                kwargs["calibration_cache_path"] = histogram_ranges(pre, reader, kwargs["op_types_to_quantize"],
                                                                    Path(tmp) / "ranges.json", scheme, chunk)
            quantize_static(str(pre), str(out), reader, nodes_to_exclude=fp32_nodes(pre, scheme), **kwargs)
    if scheme.latent_correction:
        correct_latents(fp32, out, calib_frames)
    return Path(out)


def fp32_nodes(model_path: Path, scheme: Scheme = FROZEN_DEFAULT) -> list[str]:
    """Names of the nodes the scheme keeps in fp32: the tail after the last conv's activation (pooling, affine,
    Round; ``fp32_tail``), everything before the ``fp32_first_convs + 1``-th conv (one fp32 prefix: no round trip),
    the last ``fp32_last_convs`` convs (from there on everything), depthwise convs."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    if not (scheme.fp32_tail or scheme.fp32_first_convs or scheme.fp32_last_convs or scheme.fp32_depthwise):
        return []  # everything of the scheme's op types is int8
    conv_idx = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not conv_idx:
        raise ValueError(f"{model_path} has no Conv node")
    last = nodes[conv_idx[-1]]
    if scheme.fp32_last_convs:
        start = conv_idx[-scheme.fp32_last_convs]
    else:
        start = conv_idx[-1] + 1 if scheme.fp32_tail else len(nodes)
    names = [n.name for n in nodes[start:] if n.name and n.op_type != "Constant" and not (  # the last conv's
        not scheme.fp32_last_convs and n.op_type in ("Clip", "Relu") and n.input[0] == last.output[0])]  # ReLU6
    if scheme.fp32_first_convs:
        end = conv_idx[scheme.fp32_first_convs] if scheme.fp32_first_convs < len(conv_idx) else start
        names += [n.name for n in nodes[:end] if n.name and n.op_type != "Constant"]
    if scheme.fp32_depthwise:
        names += [n.name for n in nodes[:start] if n.op_type == "Conv" and
                  any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return names


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
                     scheme: Scheme, chunk: int, num_bins: int = 2048) -> Path:
    """Activation ranges from signed 2048-bin histograms of the calibration frames (ORT's entropy collector,
    ``chunk`` batches at a time), written as an ORT calibration cache for
    ``quantize_static(calibration_cache_path=...)``.
    ``percentile``: ``scheme.percentile`` for ReLU6 outputs and ``scheme.percentile_linear`` for the other tensors
    (linear-bottleneck conv outputs, residual sums, whose rare outliers cost the most resolution); ``mse``: each
    tensor's own uint8 MSE optimum (``_mse_range``)."""
    import onnx
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData, create_calibrator,
                                                    save_tensors_data)

    producer = {o: n.op_type for n in onnx.load(str(model)).graph.node for o in n.output}
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(Path(model), op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": num_bins})
        for start in range(0, len(reader), chunk):
            reader.set_range(start, min(start + chunk, len(reader)))
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
    import onnx
    import onnxruntime as ort

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
