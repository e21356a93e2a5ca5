"""Frozen-backbone run -> model bundle: the encoder (backbone + learned transform + rounding) to ONNX, a logistic
probe on the symbols as the server-side classifier, the run's tables and golden vectors."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from taskcodec.training.backbones import frozen_encoder
from taskcodec.training.frozen import FeatureStore, SymbolEncoder, load_run, probe_pipeline, weights_key
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


def export_symbol_encoder(encoder: SymbolEncoder, size: int, path: Path) -> Path:
    from taskcodec.export.onnx_export import export_onnx

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    return export_onnx(encoder.eval(), example, Path(path), "frames", "symbols")


def export_bundle(run: Path, out: Path, weights: str | Path | None = None, progress: Callable[[str], None] = print,
                  golden_frames: int = 16) -> "Bundle":  # noqa: F821
    """Run folder -> bundle: fp32 encoder ONNX (uint8 NHWC RGB -> int32 symbols), the run's tables, a
    Fashion-MNIST probe on the symbols as the server-side classifier, and golden vectors (frames -> symbols ->
    bytes, checked by `taskcodec verify-bundle`); checks ONNX symbols == torch symbols."""
    import tempfile

    from taskcodec.providers import ort_session, run_batched
    from taskcodec.export.golden import GOLDEN_FILE, make_golden
    from taskcodec.bundle import add_file, write_bundle

    model, config, info = load_run(run)
    encoder = SymbolEncoder(frozen_encoder(config.backbone, weights), model).eval()
    store = FeatureStore(config.size, config.backbone, weights)
    train = store.get(config.train_set)
    probe = probe_pipeline().fit(model.symbols(train["emb"]).astype(np.float32), train["labels"])
    classes = list(store.dataset(config.train_set).classes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        progress("exporting the encoder to ONNX")
        export_symbol_encoder(encoder, config.size, tmp / "encoder.onnx")
        classifier_onnx(tmp / "classifier.onnx", probe, model.latent_dim)
        frames = render(store.dataset("fashion_mnist").images[:64], config.size)
        onnx_symbols = run_batched(ort_session(tmp / "encoder.onnx"), frames, batch=32)
        with torch.inference_mode():
            torch_symbols = encoder(torch.from_numpy(frames)).numpy()
        agreement = float((onnx_symbols == torch_symbols).mean())
        progress(f"ONNX vs torch symbol agreement on 64 real frames: {agreement:.6f}")
        bundle = write_bundle(
            out,
            files={"encoder": tmp / "encoder.onnx", "tables": Path(run) / "tables.npz",
                   "classifier": tmp / "classifier.onnx"},
            manifest={
                "name": f"frozen-{config.backbone}-{config.size}-beta{config.beta:g}",
                "input": {"height": config.size, "width": config.size, "channels": 3, "color_order": "rgb",
                          "layout": "NHWC", "dtype": "uint8"},
                "latent_dim": model.latent_dim,
                "classes": classes,
                "invariances": [config.augmentation] if config.views else [],
                "entropy_tables": {"layout": "lower/length/pmf float32, escape at index length"},
                "backbone": {"name": config.backbone, "weights_sha256_10": weights_key(config.backbone, weights),
                             "frozen": True},
                "frozen_compressor": {"config": asdict(config), "onnx_torch_symbol_agreement": agreement},
            },
        )
        # golden vectors: any machine can prove it encodes and decodes these frames to the same bytes
        bundle = add_file(bundle, "golden", make_golden(bundle, frames[:golden_frames], tmp / GOLDEN_FILE))
    progress(f"golden vectors: {golden_frames} frames ({GOLDEN_FILE})")
    return bundle
