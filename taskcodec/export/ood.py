"""The out-of-domain threshold of a bundle (read by taskcodec.server.ood): a reference set of training-frame symbols
and a threshold on the score chosen on held-out in-domain frames for a stated false-alarm rate.

Held-out frames: the even-indexed half of the test split (``test[0::2]``), so the odd half stays unseen for measuring
the false-alarm rate (`taskcodec bench ood`). Symbols come from the bundle's own ONNX encoder, exactly what cameras
send.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from taskcodec.bundle import Bundle, add_file
from taskcodec.data import load_frames
from taskcodec.export.golden import run_encoder
from taskcodec.server.ood import REFERENCE_ROLE, OutOfDomain

REFERENCE_FILE = "ood_reference.npz"
REFERENCE_ROWS = 4096
K = 10
CALIBRATION_SPLIT = "test[0::2]"


def threshold_for(scores: np.ndarray, false_alarm_rate: float) -> float:
    """The smallest threshold with at most ``false_alarm_rate`` of ``scores`` strictly above it."""
    s = np.sort(np.asarray(scores, np.float64))
    allowed = int(np.floor(false_alarm_rate * len(s)))
    return float(s[len(s) - 1 - allowed]) if len(s) else float("inf")


def build_ood(bundle: Bundle, train_frames: np.ndarray, held_out_frames: np.ndarray, false_alarm_rate: float,
              data: str, score: str = "knn", k: int = K, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(manifest ``ood`` section, reference symbols) for this bundle."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train_frames), min(REFERENCE_ROWS, len(train_frames)), replace=False))
    reference = run_encoder(bundle.encoder_path(), train_frames[pick]).astype(np.int32)
    held = run_encoder(bundle.encoder_path(), held_out_frames)
    test = OutOfDomain(score, np.inf, k, reference, bundle.tables)
    threshold = threshold_for(test.scores(held), false_alarm_rate)
    section = {"score": score, "k": k, "threshold": threshold, "false_alarm_rate": false_alarm_rate,
               "calibration": {"data": data, "split": CALIBRATION_SPLIT, "frames": int(len(held_out_frames)),
                               "reference_frames": int(len(reference)), "reference_split": "train"}}
    return section, reference


def add_ood(bundle: Bundle, run: Path, data: str | None, false_alarm_rate: float = 0.01) -> Bundle:
    """Write the reference set and the ``ood`` manifest section into an exported bundle."""
    import json

    run_data = json.loads((Path(run) / "data.json").read_text())["data"] if (Path(run) / "data.json").is_file() \
        else "fashion-mnist"
    spec = data or run_data
    s = bundle.input
    limit = None if s.height * s.width * s.channels <= 28 * 28 else 4096  # large frames: a subset fits in memory
    train = load_frames(spec, "train", s.height, s.width, s.channels, limit=limit)
    test = load_frames(spec, "test", s.height, s.width, s.channels, limit=limit)
    section, reference = build_ood(bundle, train.frames, test.frames[0::2], false_alarm_rate, str(spec))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / REFERENCE_FILE
        np.savez_compressed(path, symbols=reference)
        return add_file(bundle, REFERENCE_ROLE, path, REFERENCE_FILE, ood=section)
