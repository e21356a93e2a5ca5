"""A tiny but real bundle built with onnx.helper (no torch): uint8 frames -> linear encoder -> int32 symbols, and a
linear classifier on the symbols. It exercises runtime/ and server/ mechanics quickly; end-to-end accuracy tests use
the embedded default bundle instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from taskcodec.bundle import Bundle, write_bundle
from taskcodec.coding import EntropyTables


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_tiny_bundle(out: Path, height: int = 28, width: int = 28, channels: int = 1, latent_dim: int = 8,
                     seed: int = 0) -> Bundle:
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_in = height * width * channels
    w = (rng.standard_normal((n_in, latent_dim)) * 3.0 / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(latent_dim).astype(np.float32)
    enc = helper.make_graph(
        [
            helper.make_node("Cast", ["frames"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["x"]),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Round", ["y"], ["r"]),
            helper.make_node("Cast", ["r"], ["symbols"], to=TensorProto.INT32),
        ],
        "tiny_encoder",
        [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", height, width, channels])],
        [helper.make_tensor_value_info("symbols", TensorProto.INT32, ["N", latent_dim])],
        [numpy_helper.from_array(np.array([-1, n_in], np.int64), "shape"),
         numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
         numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    _save(enc, out / "encoder.src.onnx")
    cw = rng.standard_normal((latent_dim, 10)).astype(np.float32)
    cls = helper.make_graph(
        [helper.make_node("Cast", ["symbols"], ["s"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["s", "cw"], ["logits"])],
        "tiny_classifier",
        [helper.make_tensor_value_info("symbols", TensorProto.INT32, ["N", latent_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(cw, "cw")],
    )
    _save(cls, out / "classifier.src.onnx")
    lower = np.full(latent_dim, -4, np.int32)
    support = np.arange(-4, 5)
    tables = EntropyTables.from_pmfs(lower, [np.exp(-0.5 * support**2 / 2.0) for _ in range(latent_dim)])
    tables.save(out / "tables.src.npz")
    bundle = write_bundle(
        out,
        files={"encoder": out / "encoder.src.onnx", "tables": out / "tables.src.npz",
               "classifier": out / "classifier.src.onnx"},
        manifest={
            "name": "tiny-test-bundle",
            "input": {"height": height, "width": width, "channels": channels,
                      "color_order": "gray" if channels == 1 else "rgb", "layout": "NHWC", "dtype": "uint8"},
            "latent_dim": latent_dim,
            "classes": [f"class-{i}" for i in range(10)],
            "invariances": [],
            "entropy_tables": {"layout": "lower/length/pmf float32, escape at index length"},
        },
    )
    for src in ("encoder.src.onnx", "classifier.src.onnx", "tables.src.npz"):
        (out / src).unlink()
    return bundle
