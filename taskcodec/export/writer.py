"""The one way a training run becomes a model bundle, for trained and frozen-backbone runs alike: the camera encoder
(``training.models.SymbolEncoder``: uint8 NHWC frames -> int32 symbols) and the server-side classifier to ONNX, a
torch-vs-ONNX parity report on real frames (``export_report.json``), the run's tables, the manifest, and golden
vectors (frames -> symbols -> bytes, checked by `taskcodec verify-bundle`).

Each kind of run only says what differs (:class:`BundleSource`): ``export.build`` for trained runs, ``export.frozen``
for frozen-backbone runs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from taskcodec.bundle import Bundle, add_file, write_bundle
from taskcodec.export.golden import GOLDEN_FILE, make_golden
from taskcodec.export.onnx_export import export_onnx
from taskcodec.providers import ort_session, run_batched

REPORT_FILE = "export_report.json"


@dataclass
class BundleSource:
    """What a run hands to :func:`write_model_bundle`."""

    encoder: torch.nn.Module                       # uint8 [N, H, W, C] frames -> int32 [N, D] symbols
    input_shape: tuple[int, int, int]              # H, W, C
    tables: Path                                   # the run's frozen entropy tables
    write_classifier: Callable[[Path], Any]        # writes the classifier ONNX (int32 symbols -> logits) to a path
    classify: Callable[[np.ndarray], np.ndarray]   # the same classifier in the training framework: symbols -> logits
    manifest: Callable[[dict], dict]               # the manifest's fields, given the parity report


@torch.inference_mode()
def torch_symbols(encoder: torch.nn.Module, frames: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The torch encoder on uint8 frames, in batches -> int32 symbols."""
    return torch.cat([encoder(torch.from_numpy(np.array(frames[i: i + batch])))
                      for i in range(0, len(frames), batch)]).numpy().astype(np.int32)


def parity_report(source: BundleSource, encoder_onnx: Path, classifier_onnx: Path, frames: np.ndarray,
                  labels: np.ndarray) -> dict:
    """ONNX vs torch on real frames: symbol agreement, largest difference and downstream accuracy."""
    reference = torch_symbols(source.encoder, frames)
    onnx_symbols = run_batched(ort_session(encoder_onnx), frames)
    diff = np.abs(reference.astype(np.int64) - onnx_symbols)
    torch_pred = source.classify(reference).argmax(1)
    onnx_pred = run_batched(ort_session(classifier_onnx), onnx_symbols, 1024).argmax(1)
    return {"test_images": int(len(frames)), "latent_entries": int(diff.size),
            "symbol_agreement": float((diff == 0).mean()), "max_symbol_difference": int(diff.max()),
            "accuracy_torch": float((torch_pred == labels).mean()),
            "accuracy_onnx": float((onnx_pred == labels).mean())}


def write_model_bundle(source: BundleSource, out: Path, frames: np.ndarray, labels: np.ndarray, golden_frames: int,
                       parity: bool = True, progress: Callable[[str], None] = lambda _: None) -> Bundle:
    """Export, check parity on ``frames`` (when ``parity``), write the bundle at ``out`` with golden vectors from
    the first ``golden_frames`` frames, and its parity report as ``export_report.json``."""
    out = Path(out)
    height, width, channels = source.input_shape
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        progress("exporting the encoder to ONNX")
        export_onnx(source.encoder.eval(), torch.zeros(2, height, width, channels, dtype=torch.uint8),
                    tmp / "encoder.onnx", "frames", "symbols")
        source.write_classifier(tmp / "classifier.onnx")
        report = parity_report(source, tmp / "encoder.onnx", tmp / "classifier.onnx", frames, labels) if parity else {}
        if parity:
            progress(f"ONNX vs torch on {report['test_images']} real frames: symbol agreement "
                     f"{report['symbol_agreement']:.6f}, accuracy {report['accuracy_onnx']:.4f} / "
                     f"{report['accuracy_torch']:.4f}")
        bundle = write_bundle(out, files={"encoder": tmp / "encoder.onnx", "tables": source.tables,
                                          "classifier": tmp / "classifier.onnx"}, manifest=source.manifest(report))
        bundle = add_file(bundle, "golden", make_golden(bundle, frames[:golden_frames], tmp / GOLDEN_FILE))
    progress(f"golden vectors: {min(golden_frames, len(frames))} frames ({GOLDEN_FILE})")
    if parity:
        (out / REPORT_FILE).write_text(json.dumps({"model_id": bundle.model_id, **report}, indent=2) + "\n")
    return bundle
