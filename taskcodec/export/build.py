"""`taskcodec export`: a training run folder -> a model bundle (encoder ONNX, tables, classifier ONNX, golden vectors),
with a parity report that compares the ONNX graphs with the torch model on the whole test set."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskcodec.export.golden import GOLDEN_FILE, make_golden, run_encoder
from taskcodec.export.onnx_export import export_onnx
from taskcodec.bundle import Bundle, add_file, write_bundle
from taskcodec.providers import ort_session, run_batched
from taskcodec.data import CLASSES, load_frames

REPORT_FILE = "export_report.json"


def export_run(run: Path, out: Path, data_dir: Path | None = None, parity: bool = True, golden_frames: int = 64,
               name: str | None = None) -> Bundle:
    from taskcodec.training.models import SymbolEncoder
    from taskcodec.training.trainer import encode_symbols, load_run

    run, out = Path(run), Path(out)
    compressor, probe, info = load_run(run)
    config = info["config"].to_dict()
    torch.manual_seed(0)
    encoder = SymbolEncoder(compressor).eval()
    height, width, channels = _input_shape(config)
    example = torch.zeros(2, height, width, channels, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(encoder, example, tmp / "encoder.onnx", "frames", "symbols")
        export_onnx(probe.eval(), torch.zeros(2, compressor_dim(compressor), dtype=torch.int32), tmp / "classifier.onnx",
                    "symbols", "logits")
        bundle = write_bundle(out, files={"encoder": tmp / "encoder.onnx", "tables": run / "tables.npz",
                                          "classifier": tmp / "classifier.onnx"},
                              manifest=_manifest(config, info, name or run.name))
    test = load_frames(data_dir or info["data"]["data"], "test", height, width, channels)  # the run's own data
    test_images, test_labels = test.frames, test.labels
    frames = test_images[..., None] if test_images.ndim == 3 else test_images
    bundle = add_file(bundle, "golden", make_golden(bundle, frames[:golden_frames], out / GOLDEN_FILE))
    if parity:
        report = parity_report(bundle, compressor, probe, frames, test_labels, encode_symbols)
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return bundle


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
        "entropy_tables": {"file": "tables.npz", "dtype": "float32",
                           "layout": "per dimension: lower, length; pmf[d, i] = P(lower+i), pmf[d, length] = escape"},
        "stream": {"check": "crc16-ccitt over model tag, payload length and payload, 2 bytes",
                   "coder": "constriction queue RangeEncoder, 32-bit words big-endian, trailing bytes dropped (zero-padded on decode)"},
        "invariances": {"name": config.get("augmentations"), "description": get_augmentation(config["augmentations"]).description},
        "objective": config.get("objective"),
        "beta": config.get("beta"),
        "classes": list(info.get("classes") or CLASSES),
        "training": {"config": config, "metrics": info.get("metrics", {}), "data": info.get("data", {})},
    }


def parity_report(bundle: Bundle, compressor, probe, frames: np.ndarray, labels: np.ndarray, encode_symbols) -> dict:
    """ONNX vs torch on the full test set: symbol agreement and downstream accuracy."""
    torch_symbols = encode_symbols(compressor, frames)
    onnx_symbols = run_encoder(bundle.encoder_path(), frames)
    with torch.no_grad():
        torch_logits = torch.cat([probe(torch.from_numpy(torch_symbols[i: i + 1024]))
                                  for i in range(0, len(torch_symbols), 1024)]).numpy()
    onnx_logits = run_batched(ort_session(bundle.file("classifier")), onnx_symbols, 1024)
    diff = np.abs(torch_symbols.astype(np.int64) - onnx_symbols)
    return {
        "model_id": bundle.model_id,
        "test_images": int(len(frames)),
        "latent_entries": int(diff.size),
        "symbol_agreement": float((diff == 0).mean()),
        "max_symbol_difference": int(diff.max()),
        "accuracy_torch": float((torch_logits.argmax(1) == labels).mean()),
        "accuracy_onnx": float((onnx_logits.argmax(1) == labels).mean()),
    }
