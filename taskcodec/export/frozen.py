"""Frozen-backbone run -> model bundle through the one export path (``export.writer``): the encoder (backbone +
learned transform + rounding) to ONNX, a logistic probe on the symbols as the server-side classifier, the run's
tables, golden vectors and the ONNX-vs-torch parity report."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from taskcodec.bundle import Bundle
from taskcodec.training.backbones import frozen_encoder
from taskcodec.training.frozen import CACHE_DIR, FeatureStore, SymbolEncoder, load_run, probe_pipeline, weights_key
from taskcodec.training.transfer_datasets import render


def classifier_onnx(path: Path, probe, latent_dim: int) -> Path:
    """The fitted probe (scaler + logistic regression) as ONNX: int32 symbols [N, D] -> logits [N, K]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scaler, lr = probe[0], probe[-1]
    w = (lr.coef_ / scaler.scale_[None, :]).T.astype(np.float32)  # fold the standardisation into the weights
    b = (lr.intercept_ - lr.coef_ @ (scaler.mean_ / scaler.scale_)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["symbols"], ["s"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["s", "w"], ["sw"]),
         helper.make_node("Add", ["sw", "b"], ["logits"])],
        "frozen_probe",
        [helper.make_tensor_value_info("symbols", TensorProto.INT32, ["N", latent_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def export_symbol_encoder(encoder: torch.nn.Module, size: int, path: Path) -> Path:
    from taskcodec.export.onnx_export import export_onnx

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    return export_onnx(encoder.eval(), example, Path(path), "frames", "symbols")


def export_bundle(run: Path, out: Path, weights: str | Path | None = None, progress: Callable[[str], None] = print,
                  golden_frames: int = 16, parity_frames: int = 64, cache_dir: Path = CACHE_DIR) -> Bundle:
    """Run folder -> bundle through the one export path (``export.writer``): fp32 encoder ONNX (uint8 NHWC RGB ->
    int32 symbols), the run's tables, a Fashion-MNIST probe on the symbols as the server-side classifier, golden
    vectors, and the ONNX-vs-torch parity report on ``parity_frames`` real frames (its symbol agreement is also kept
    in the manifest)."""
    from taskcodec.export.writer import BundleSource, write_model_bundle

    model, config, info = load_run(run)
    store = FeatureStore(config.size, config.backbone, weights, cache_dir)
    train = store.get(config.train_set)
    probe = probe_pipeline().fit(model.symbols(train["emb"]).astype(np.float32), train["labels"])
    classes = list(store.dataset(config.train_set).classes)

    def manifest(parity: dict) -> dict:
        return {
            "name": f"frozen-{config.backbone}-{config.size}-beta{config.beta:g}",
            "input": {"height": config.size, "width": config.size, "channels": 3, "color_order": "rgb",
                      "layout": "NHWC", "dtype": "uint8"},
            "latent_dim": model.latent_dim,
            "classes": classes,
            "invariances": [config.augmentation] if config.views else [],
            "backbone": {"name": config.backbone, "weights_sha256_10": weights_key(config.backbone, weights),
                         "frozen": True},
            "frozen_compressor": {"config": asdict(config), "onnx_torch_symbol_agreement": parity["symbol_agreement"]},
        }

    source = BundleSource(
        encoder=SymbolEncoder(frozen_encoder(config.backbone, weights), model).eval(),
        input_shape=(config.size, config.size, 3), tables=Path(run) / "tables.npz",
        write_classifier=lambda path: classifier_onnx(path, probe, model.latent_dim),
        classify=lambda symbols: probe.decision_function(symbols.astype(np.float32)), manifest=manifest)
    test = store.dataset("fashion_mnist")
    frames = render(test.images[:parity_frames], config.size)
    return write_model_bundle(source, out, frames, test.labels[:parity_frames], golden_frames, progress=progress)
