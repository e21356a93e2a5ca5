"""Short real training runs on real Fashion-MNIST: rate responds to beta, training helps the probe, the frozen tables
code real latents exactly, and the exportable SymbolEncoder computes exactly round(latents)."""

import json

import numpy as np
import pytest
import torch

from taskcodec.coding import compress, decompress
from taskcodec.data import load_fashion_mnist
from taskcodec.training.augmentations import REGISTRY, get_augmentation
from taskcodec.training.entropy_bottleneck import EntropyBottleneck
from taskcodec.training.models import CompressorConfig, SymbolEncoder
from taskcodec.training.probes import accuracy, fit_probe
from taskcodec.training.trainer import RunError, encode_symbols, load_run, train, train_model

torch.set_num_threads(1)
QUICK = dict(train_subset=768, test_subset=500, batch_size=64, probe_epochs=8, quantile_steps=500, threads=1)


@pytest.fixture(scope="module")
def data():
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    return xtr[:768], ytr[:768], xte[:500], yte[:500]


@pytest.fixture(scope="module")
def bince_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bince")
    return train(CompressorConfig(epochs=2, **QUICK), out=out, progress=False)


def test_augmentations_are_deterministic_bounded_and_registered():
    x = torch.rand(16, 1, 28, 28)
    for name in ("none", "fashion", "fashion+label", "geometric", "photometric"):
        aug = get_augmentation(name)
        a = aug(x, torch.Generator().manual_seed(3))
        b = aug(x, torch.Generator().manual_seed(3))
        assert a.shape == x.shape and torch.equal(a, b)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6
        assert REGISTRY[name].description
    assert torch.equal(get_augmentation("none")(x), x)
    assert not torch.allclose(get_augmentation("fashion")(x, torch.Generator().manual_seed(0)), x)
    assert get_augmentation("fashion+label").uses_labels and not get_augmentation("fashion").uses_labels
    with pytest.raises(ValueError, match="unknown augmentations"):
        get_augmentation("rotations-of-doom")


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        CompressorConfig(objective="jpeg")
    with pytest.raises(ValueError):
        CompressorConfig(augmentations="nope")


def test_rate_falls_as_beta_rises(data):
    xtr, ytr, xte, _ = data
    bits = {}
    for beta in (0.001, 0.5):  # a short schedule needs a high lr for the rate to move far
        model = train_model(CompressorConfig(epochs=3, beta=beta, lr=1e-2, **QUICK), xtr, ytr, progress=False)
        with torch.no_grad():
            bits[beta] = float(model.bottleneck.bits(torch.as_tensor(encode_symbols(model, xte), dtype=torch.float32)).mean())
    assert bits[0.5] < 0.8 * bits[0.001], bits


def test_run_folder_metrics_and_trained_beats_untrained(bince_run, tmp_path):
    metrics = json.loads((bince_run / "metrics.json").read_text())
    for key in ("accuracy_linear", "accuracy_mlp", "estimated_bits_model", "coded_bits_mean", "train_time_s"):
        assert key in metrics
    untrained = train(CompressorConfig(epochs=0, **QUICK), out=tmp_path / "untrained", progress=False)
    base = json.loads((untrained / "metrics.json").read_text())
    assert metrics["accuracy_linear"] > base["accuracy_linear"] + 0.03, (metrics, base)
    assert metrics["accuracy_mlp"] > 0.5


def test_load_run_rebuilds_and_symbol_encoder_equals_round_latents(bince_run, data):
    _, _, xte, yte = data
    model, probe, info = load_run(bince_run)
    frames = torch.from_numpy(xte[:64].copy()).unsqueeze(-1)
    sym = SymbolEncoder(model)(frames)
    assert sym.dtype == torch.int32 and sym.shape == (64, model.config.latent_dim)
    with torch.no_grad():
        expected = torch.round(model.latents(model.normalise(frames))).to(torch.int32)
    assert torch.equal(sym, expected)
    assert np.array_equal(encode_symbols(model, xte[:64]), sym.numpy())
    # The stored probe reproduces the reported accuracy on the same symbols.
    acc = accuracy(probe, encode_symbols(model, xte), yte)
    assert acc == pytest.approx(info["metrics"]["accuracy_mlp"], abs=1e-9)


def test_tables_round_trip_real_latents_exactly(bince_run, data):
    _, _, xte, _ = data
    model, _, info = load_run(bince_run)
    tables = info["tables"]
    symbols = encode_symbols(model, xte)
    est = tables.estimated_bits(symbols)
    for s, e in zip(symbols, est):
        stream = compress(s, tables, b"tag")
        assert np.array_equal(decompress(stream, tables, b"tag"), s)
        assert 8 * (len(stream) - 2) <= e * 1.02 + 32
    # Symbols far outside the learned support still round-trip (escape), nothing is clamped.
    wild = symbols[0].copy()
    wild[:3] = [10_000, -10_000, 2**31 - 1]
    assert np.array_equal(decompress(compress(wild, tables), tables), wild)


def test_bottleneck_tables_match_its_density():
    torch.manual_seed(0)
    eb = EntropyBottleneck(4)
    eb.fit_quantiles(steps=1500)
    tables = eb.tables()
    y = torch.randn(256, 4) * 3
    with torch.no_grad():
        model_bits = eb.eval()(y)[1].numpy()
    table_bits = tables.estimated_bits(torch.round(y).numpy().astype(np.int32))
    assert np.allclose(model_bits, table_bits, rtol=1e-3, atol=1e-2)
    assert (tables.pmf[np.arange(4), tables.length] >= 1e-6).all()


@pytest.mark.parametrize("objective", ["vic", "vc"])
def test_reconstruction_objectives_run(objective, tmp_path):
    run = train(CompressorConfig(objective=objective, beta=0.1, epochs=1, augmentations="fashion", **QUICK),
                out=tmp_path / objective, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["objective"] == objective and np.isfinite(metrics["coded_bits_mean"])
    model, _, _ = load_run(run)
    assert model.decoder is not None


def test_load_run_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="not a complete run folder"):
        load_run(tmp_path)


def test_probe_learns_separable_symbols():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    symbols = (np.eye(10)[labels] * 6 + rng.integers(-1, 2, (2000, 10)) + 40).astype(np.int32)
    for hidden in (0, 32):
        probe = fit_probe(symbols, labels, hidden=hidden, epochs=10)
        assert accuracy(probe, symbols, labels) > 0.95
