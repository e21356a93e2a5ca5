"""The one definition of an int8 scheme, for every bundle (trained and frozen-backbone).

A scheme says *how* an encoder is quantized with ONNX Runtime's static quantization: which op types are int8, which
nodes stay fp32, how activation ranges are calibrated, the activation type, weight range and format, and whether a
per-latent correction follows. *What* it is calibrated on (``frames.calibration_frames``) and *whether* it is good
enough (``measure.AccuracyGate``) are the other two pieces of the pipeline.

U8 activations with S8 weights is ONNX Runtime's default on x86 (U8S8); without VNNI its kernels can saturate the
16-bit intermediate sums, which ``reduce_range`` (7-bit weights) avoids. S8/S8 symmetric is what TensorRT needs.

Activation ranges (``method``):

- ``minmax``: the observed minimum and maximum;
- ``entropy``: ONNX Runtime's KL-divergence (entropy) calibrator;
- ``percentile``: from our own signed histograms of the calibration frames, the ``percentile`` of |x| for ReLU/ReLU6
  outputs and ``percentile_linear`` for every other tensor (linear-bottleneck conv outputs, residual sums, whose rare
  outliers otherwise cost the bulk its resolution), as [-p, p] clamped to the observed range; one meaning for every
  bundle (``quantize.histogram_ranges``);
- ``mse``: each tensor's own uint8 MSE-optimal range over the same histograms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("minmax", "entropy", "percentile", "mse")
TRAINED_OPS = ("Conv", "MatMul", "Gemm")  # the small trained encoder: every weight layer int8
FROZEN_OPS = ("Conv", "Clip", "Add")      # MobileNetV2: convs with their ReLU6 folded in, residual adds


@dataclass(frozen=True)
class Scheme:
    """One way to quantize an encoder. The defaults are the frozen-backbone scheme that met its target
    (``frozen_int8`` module doc); :func:`trained_scheme` gives the trained bundles' grid."""

    method: str = "percentile"       # activation ranges: minmax, entropy, percentile or mse (module doc)
    activations: str = "u8"          # u8 (asymmetric) or s8 (symmetric)
    reduce_range: bool = False       # 7-bit weights, for CPUs without VNNI
    percentile: float = 99.99        # method="percentile": of |x| for ReLU/ReLU6 outputs,
    percentile_linear: float = 99.9  # and for the other activations
    ops: tuple[str, ...] = FROZEN_OPS  # op types quantized (Clip: ORT folds ReLU6 into the conv; Add: QLinearAdd)
    fp32_first_convs: int = 3        # the first N convs (and the input normalisation before them) stay fp32
    fp32_last_convs: int = 0         # also keep the last N convs in fp32
    fp32_tail: bool = True           # keep what follows the last conv's activation fp32 (pooling, affine, Round)
    fp32_depthwise: bool = False     # exclude depthwise convs
    fmt: str = "qdq"                 # qdq or qoperator
    per_channel: bool = True         # per-output-channel weight scales
    latent_correction: bool = True   # per-latent gain/offset onto the fp32 latents, fitted on the calibration frames

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fmt not in ("qdq", "qoperator"):
            raise ValueError(f"format must be qdq or qoperator, got {self.fmt!r}")
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"activations must be u8 or s8, got {self.activations!r}")
        if self.fp32_first_convs < 0 or self.fp32_last_convs < 0:
            raise ValueError("fp32_first_convs and fp32_last_convs count convs: 0 or more")
        if not (0 < self.percentile <= 100 and 0 < self.percentile_linear <= 100):
            raise ValueError("percentiles are in (0, 100]")
        if not self.ops:
            raise ValueError("a scheme quantizes at least one op type")

    @property
    def name(self) -> str:
        return f"{self.method}-{self.activations}{'-rr' if self.reduce_range else ''}"

    @property
    def tensorrt_compatible(self) -> bool:
        """TensorRT takes symmetric signed int8 Q/DQ only."""
        return self.activations == "s8" and not self.reduce_range and self.fmt == "qdq"

    @property
    def histogram_ranges(self) -> bool:
        """Ranges from our own histograms (percentile, mse) rather than ORT's calibrator."""
        return self.method in ("percentile", "mse")

    def to_dict(self) -> dict:
        return {**asdict(self), "ops": list(self.ops), "name": self.name, "weights": "s8 symmetric"}

    def quantize_kwargs(self) -> dict:
        """Arguments of ``onnxruntime.quantization.quantize_static`` (without the model, reader and exclusions)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        return {"calibrate_method": CalibrationMethod.MinMax if self.method == "minmax" else CalibrationMethod.Entropy,
                "quant_format": QuantFormat.QDQ if self.fmt == "qdq" else QuantFormat.QOperator,
                "activation_type": QuantType.QUInt8 if self.activations == "u8" else QuantType.QInt8,
                "weight_type": QuantType.QInt8, "reduce_range": self.reduce_range, "per_channel": self.per_channel,
                "op_types_to_quantize": list(self.ops),
                "extra_options": {"ActivationSymmetric": self.activations == "s8", "WeightSymmetric": True}}


FROZEN_DEFAULT = Scheme()


def trained_scheme(method: str, activations: str, reduce_range: bool) -> Scheme:
    """A scheme of the trained bundles' grid: every Conv/MatMul/Gemm int8 (the whole small encoder, no fp32 prefix or
    tail), one percentile (99.99) for every tensor, no latent correction."""
    return Scheme(method, activations, reduce_range, percentile=99.99, percentile_linear=99.99, ops=TRAINED_OPS,
                  fp32_first_convs=0, fp32_tail=False, latent_correction=False)


def all_schemes(methods: list[str], activations: list[str], reduce_range: list[bool], target: str) -> list[Scheme]:
    """The grid `taskcodec calibrate` tries, in this order (which also breaks latency ties)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown calibration method(s) {sorted(unknown)}; choose from {sorted(METHODS)}")
    bad = set(activations) - {"u8", "s8"}
    if bad:
        raise ValueError(f"unknown activation type(s) {sorted(bad)}; choose from u8, s8")
    schemes = [trained_scheme(m, a, r) for m in methods for a in activations for r in reduce_range]
    if target == "tensorrt":
        schemes = [s for s in schemes if s.tensorrt_compatible]
    if not schemes:
        raise ValueError("no scheme left to try (TensorRT needs s8 activations without reduce_range)")
    return schemes
