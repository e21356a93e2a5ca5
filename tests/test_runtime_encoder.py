"""Execution-provider choice and the ONNX encoder + range coder: payloads decode to the encoder's symbols, stage
times are kept apart, and a model that does not fit the bundle is refused clearly."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from taskcodec.runtime.encoder import EncoderError, FrameEncoder
from taskcodec.bundle import BundleError, load_bundle
from taskcodec.coding import decompress
from taskcodec.providers import ProviderError, canonical, choose_providers
from tiny_bundle import make_tiny_bundle


def test_choose_providers():
    available = ort.get_available_providers()
    assert choose_providers(None)[-1] == "CPUExecutionProvider"
    assert choose_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto") == choose_providers(None)
    assert canonical("cuda") == "CUDAExecutionProvider" and canonical("CPUExecutionProvider") == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(ProviderError, match="not available"):
            choose_providers(["cuda"])
        assert "CUDAExecutionProvider" not in choose_providers(None)
    with pytest.raises(ProviderError, match="not available"):
        choose_providers("NoSuchExecutionProvider")


def test_encoder_payloads_decode_to_symbols(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    enc = FrameEncoder(bundle, threads=1, providers="cpu")
    frames = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    payloads = enc.encode(frames)
    symbols = enc.symbols(frames)
    assert len(payloads) == 5
    for p, s in zip(payloads, symbols):
        assert np.array_equal(decompress(p, bundle.tables, bundle.model_tag), s)
    stats = enc.stats.to_dict()
    assert stats["frames"] == 5 and stats["bits_per_frame"] > 0 and 0 < stats["coding_share"] < 1


def test_encoder_refuses_what_does_not_fit(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="no int8 encoder"):
        FrameEncoder(bundle, "int8")
    with pytest.raises(EncoderError, match="threads"):
        FrameEncoder(bundle, threads=0)
    # a bundle whose manifest promises another input size than its encoder takes
    other = make_tiny_bundle(tmp_path / "o")
    manifest = json.loads((other.path / "manifest.json").read_text())
    manifest["input"]["height"] = 32
    (other.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EncoderError, match="does not match"):
        FrameEncoder(load_bundle(other.path))
