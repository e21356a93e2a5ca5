"""How an int8 encoder is judged against its fp32 encoder, for every bundle: the one accuracy gate, the comparison on
the evaluation frames (symbols, real coded bytes, the bundle classifier's accuracy) and latency measured interleaved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from taskcodec.coding import RangeCoder, compress
from taskcodec.providers import ort_session, run_batched

# The budgets each command starts from (same gate, same meaning). The small trained encoder loses <= 0.07 points in
# every scheme tried, so its gate is tight; the frozen MobileNetV2 encoder's measured default loses 0.53-0.60 points.
TRAINED_BUDGET_POINTS = 0.5
FROZEN_BUDGET_POINTS = 1.0


@dataclass(frozen=True)
class AccuracyGate:
    """int8 may cost at most ``budget_points`` points of accuracy on the evaluation frames, counted in frames: on n
    frames it may classify at most floor(budget_points * n / 100) fewer frames correctly than fp32, computed exactly
    (the budget as the decimal it is written as), so 0.5 points of 10000 frames is 50 frames and a loss of exactly
    the budget passes. A negative budget demands that int8 gain that many frames."""

    budget_points: float

    def allowed_frames(self, n: int) -> int:
        return math.floor(Fraction(repr(float(self.budget_points))) * n / 100)

    def check(self, fp32_correct: int, int8_correct: int, n: int) -> dict:
        lost, allowed = int(fp32_correct) - int(int8_correct), self.allowed_frames(n)
        return {"frames_lost": lost, "frames_allowed": allowed, "accuracy_drop_points": 100.0 * lost / n if n else 0.0,
                "passed": lost <= allowed}


class Comparison:
    """The fp32 encoder on the evaluation frames, computed once; any int8 encoder is then compared with it."""

    def __init__(self, bundle, frames: np.ndarray, labels: np.ndarray, batch: int = 32):
        if len(frames) != len(labels) or not len(frames):
            raise ValueError(f"{len(frames)} evaluation frames with {len(labels)} labels")
        self.bundle, self.frames, self.labels, self.batch = bundle, frames, np.asarray(labels), batch
        self.classifier = ort_session(bundle.file("classifier"))
        self.coder = RangeCoder(bundle.tables)
        self.fp32_session = ort_session(bundle.encoder_path())
        self.fp32_symbols = run_batched(self.fp32_session, frames, batch)
        self.fp32 = self.stats(self.fp32_symbols)

    def stats(self, symbols: np.ndarray) -> dict:
        """Correct frames and accuracy with the bundle classifier, mean real stream bytes per frame."""
        correct = int((run_batched(self.classifier, symbols).argmax(1) == self.labels).sum())
        return {"correct": correct, "accuracy": correct / len(self.labels),
                "bytes_per_image": float(np.mean([len(compress(s, self.coder, self.bundle.model_tag))
                                                  for s in symbols]))}

    def compare(self, int8: Path, gate: AccuracyGate) -> tuple[dict, object]:
        """-> (int8 stats, symbol agreement and the gate's verdict; the int8 session, for latency)."""
        session = ort_session(int8)
        symbols = run_batched(session, self.frames, self.batch)
        diff = np.abs(symbols.astype(np.int64) - self.fp32_symbols)
        int8 = self.stats(symbols)
        return {"int8": int8, "symbol_agreement": float((diff == 0).mean()),
                "symbols_within_1": float((diff <= 1).mean()), "symbol_mean_abs_error": float(diff.mean()),
                **gate.check(self.fp32["correct"], int8["correct"], len(self.labels))}, session


def interleaved_latency(sessions: dict, frames: np.ndarray, batch: int, rounds: int = 10, repeats: int = 5,
                        shuffle: int | None = None) -> dict[str, float]:
    """Per-frame ms at this batch size for each session, measured in alternation (A x repeats, B x repeats, A ...)
    so that load from other processes hits all of them alike: median over rounds of the median over repeats.
    ``shuffle``: a seed to draw a new order every round (many sessions: no session always runs first)."""
    x = frames[:batch]
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    per: dict[str, list[float]] = {k: [] for k in sessions}
    order, rng = list(sessions), None if shuffle is None else np.random.default_rng(shuffle)
    for _ in range(rounds):
        for k in (order if rng is None else rng.permutation(order)):
            s = sessions[k]
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times.append(time.perf_counter() - t)
            per[k].append(float(np.median(times)) * 1000 / len(x))
    return {k: float(np.median(v)) for k, v in per.items()}
