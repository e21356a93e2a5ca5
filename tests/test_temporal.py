"""Temporal coding (taskcodec.coding.temporal) on real frames of the dwell camera through the default bundle:
lossless when SAME is exact, never a frame decoded against a reference the decoder does not have, and a budget kept
over 60-second windows."""

from __future__ import annotations

import numpy as np
import pytest

from taskcodec.bench.temporal import Pipeline, dwell_video, run_temporal, window_rates
from taskcodec.bundle import load_bundle
from taskcodec.coding import RangeCoder
from taskcodec.coding.temporal import COND, KEY, SAME, TemporalDecoder, TemporalEncoder, TemporalError, fit_residual_tables


@pytest.fixture(scope="module")
def video():
    bundle = load_bundle(None)
    pipe = Pipeline(bundle)
    train, _ = dwell_video(7, 400, 5.0, "1-3")
    diffs = np.diff(pipe.symbols(train), axis=0)
    residual = RangeCoder(fit_residual_tables(diffs[np.abs(diffs).sum(1) > 0]))
    frames, labels = dwell_video(3, 600, 5.0, "1-3")
    return pipe.symbols(frames), pipe.enc.coder, residual, bundle.model_tag


def test_exact_temporal_coding_is_lossless_and_cheaper(video):
    sym, key, residual, tag = video
    enc, dec = TemporalEncoder(key, residual, tag, key_interval=50), TemporalDecoder(key, residual, tag)
    kinds, total = [], 0
    for s in sym:
        kind, payload = enc.encode(s)
        np.testing.assert_array_equal(dec.decode(kind, payload), s)
        kinds.append(kind)
        total += len(payload)
    independent = sum(len(key.compress(s, tag)) for s in sym)
    assert {KEY, COND, SAME} <= set(kinds)
    assert total < 0.7 * independent


def test_random_losses_and_restarts_never_leave_an_undecodable_frame(video):
    sym, key, residual, tag = video
    rng = np.random.default_rng(0)
    enc, dec = TemporalEncoder(key, residual, tag, key_interval=50, same_l1=4), TemporalDecoder(key, residual, tag)
    delivered = 0
    for i, s in enumerate(sym):
        kind, payload = enc.encode(s)
        event = rng.random()
        if event < 0.05:        # the frame is lost (dropped from a full spool): the runtime tells its encoder
            enc.reset()
            continue
        if event < 0.07:        # the server restarted and lost its state: the camera reconnects
            dec.reset()
            if kind != KEY:     # a frame that depends on the lost state is refused, never decoded wrongly
                with pytest.raises(TemporalError):
                    dec.decode(kind, payload)
            enc.reset()
            continue
        got = dec.decode(kind, payload)  # raises TemporalError if a reference were missing
        assert np.abs(got - s).sum() <= 4
        delivered += 1
    assert delivered > 0.9 * len(sym) - 20


def test_budget_is_kept_over_60_second_windows(video):
    sym, key, residual, tag = video
    for budget in (20.0, 40.0):
        sizes, _, kinds = run_temporal(sym, key, residual, tag, 50, 4, budget_bps=budget, fps=5.0)
        rates = window_rates(sizes, 5.0, 60.0)
        assert rates and max(rates) <= 1.05 * budget, (budget, rates)
        assert sum(k in (KEY, COND) for k in kinds) > 10
