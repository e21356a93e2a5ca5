"""Export: a short real training run -> bundle; ONNX symbols equal torch's, golden vectors verify in a fresh
process, and the embedded default bundle decodes its committed golden vectors bit-exactly."""

import json
import subprocess
import sys

import numpy as np
import pytest

from taskcodec.export.build import REPORT_FILE, export_run
from taskcodec.export.golden import verify_golden
from taskcodec.bundle import load_bundle


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from taskcodec.training.models import CompressorConfig
    from taskcodec.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    cfg = CompressorConfig(epochs=1, train_subset=2048, test_subset=1000, batch_size=128, probe_epochs=3,
                           quantile_steps=200, latent_dim=16, channels=(8, 16, 32))
    return train(cfg, out=out / "run", progress=False)


def test_export_parity_and_golden(short_run, tmp_path):
    bundle = export_run(short_run, tmp_path / "bundle")
    report = json.loads((tmp_path / "bundle" / REPORT_FILE).read_text())
    assert report["symbol_agreement"] >= 0.999
    assert abs(report["accuracy_onnx"] - report["accuracy_torch"]) <= 0.001
    assert bundle.input.height == 28 and bundle.input.channels == 1 and bundle.latent_dim == 16
    assert verify_golden(bundle).ok
    out = subprocess.run([sys.executable, "-m", "taskcodec.cli", "verify-bundle", str(bundle.path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "symbols equal 64, bytes equal 64, decoded equal 64" in out.stdout


def test_default_bundle_golden_vectors_decode_bit_exactly():
    bundle = load_bundle(None)
    report = verify_golden(bundle)
    assert report.ok and report.frames >= 64
    with np.load(bundle.file("golden")) as z:
        assert z["symbols"].shape[1] == bundle.latent_dim
