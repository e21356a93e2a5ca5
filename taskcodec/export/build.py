"""`taskcodec export`: a training run folder -> a model bundle through the one export path (``export.writer``):
encoder ONNX, tables, classifier ONNX (the run's MLP probe), golden vectors, and a parity report that compares the
ONNX graphs with the torch model on the whole test set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from taskcodec.bundle import Bundle
from taskcodec.data import CLASSES, load_frames
from taskcodec.export.onnx_export import export_onnx
from taskcodec.export.writer import REPORT_FILE, BundleSource, write_model_bundle

__all__ = ["REPORT_FILE", "export_run"]


def export_run(run: Path, out: Path, data_dir: Path | None = None, parity: bool = True, golden_frames: int = 64,
               name: str | None = None) -> Bundle:
    from taskcodec.training.models import SymbolEncoder
    from taskcodec.training.trainer import load_run

    run, out = Path(run), Path(out)
    compressor, probe, info = load_run(run)
    config = info["config"].to_dict()
    height, width, channels = _input_shape(config)
    probe = probe.eval()

    def classify(symbols):
        with torch.no_grad():
            return torch.cat([probe(torch.from_numpy(symbols[i: i + 1024]))
                              for i in range(0, len(symbols), 1024)]).numpy()

    source = BundleSource(
        encoder=SymbolEncoder(compressor).eval(), input_shape=(height, width, channels), tables=run / "tables.npz",
        write_classifier=lambda path: export_onnx(probe, torch.zeros(2, compressor_dim(compressor), dtype=torch.int32),
                                                  path, "symbols", "logits"),
        classify=classify, manifest=lambda _parity: _manifest(config, info, name or run.name))
    test = load_frames(data_dir or info["data"]["data"], "test", height, width, channels)  # the run's own data
    return write_model_bundle(source, out, test.frames, test.labels, golden_frames, parity=parity)


def compressor_dim(compressor: Any) -> int:
    return int(compressor.config.latent_dim)


def _input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    c, h, w = config.get("image_shape", (1, 28, 28))
    return int(h), int(w), int(c)


def _manifest(config: dict[str, Any], info: dict[str, Any], name: str) -> dict[str, Any]:
    height, width, channels = _input_shape(config)
    from taskcodec.training.augmentations import get_augmentation

    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"height": height, "width": width, "channels": channels,
                  "color_order": "gray" if channels == 1 else "rgb", "layout": "NHWC", "dtype": "uint8",
                  "normalisation": {"mean": config.get("mean"), "std": config.get("std"), "in_graph": True}},
        "latent_dim": int(config["latent_dim"]),
        "invariances": {"name": config.get("augmentations"), "description": get_augmentation(config["augmentations"]).description},
        "objective": config.get("objective"),
        "beta": config.get("beta"),
        "classes": list(info.get("classes") or CLASSES),
        "training": {"config": config, "metrics": info.get("metrics", {}), "data": info.get("data", {})},
    }
