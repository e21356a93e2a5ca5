"""The int8 schemes calibration tries: calibration method x activation type x reduce_range.

U8 activations with S8 weights is ONNX Runtime's default on x86 (U8S8); without VNNI its kernels can saturate the
16-bit intermediate sums, which ``reduce_range`` (7-bit weights) avoids. S8/S8 symmetric is what TensorRT needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxruntime.quantization import CalibrationMethod, QuantType

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


@dataclass(frozen=True)
class Scheme:
    method: str
    activations: str  # "u8" or "s8"
    reduce_range: bool

    @property
    def name(self) -> str:
        return f"{self.method}-{self.activations}{'-rr' if self.reduce_range else ''}"

    @property
    def tensorrt_compatible(self) -> bool:
        """TensorRT takes symmetric signed int8 Q/DQ only."""
        return self.activations == "s8" and not self.reduce_range

    def quantize_kwargs(self) -> dict:
        symmetric = self.activations == "s8"
        return {
            "calibrate_method": METHODS[self.method],
            "activation_type": QuantType.QUInt8 if self.activations == "u8" else QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "reduce_range": self.reduce_range,
            "per_channel": True,
            "extra_options": {"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                              **({"CalibPercentile": 99.99} if self.method == "percentile" else {})},
        }


def all_schemes(methods: list[str], activations: list[str], reduce_range: list[bool], target: str) -> list[Scheme]:
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown calibration method(s) {sorted(unknown)}; choose from {sorted(METHODS)}")
    schemes = [Scheme(m, a, r) for m in methods for a in activations for r in reduce_range]
    if target == "tensorrt":
        schemes = [s for s in schemes if s.tensorrt_compatible]
    if not schemes:
        raise ValueError("no scheme left to try (TensorRT needs s8 activations without reduce_range)")
    return schemes
