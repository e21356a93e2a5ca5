"""Bundle loading validates schema, files and hashes; symbols coded with one bundle decode in another process."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from taskcodec.bundle import BundleError, load_bundle
from taskcodec.coding import compress, decompress
from tiny_bundle import make_tiny_bundle


def test_tiny_bundle_encodes_frames_to_symbols(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    again = load_bundle(tmp_path / "b")
    assert again.model_id == bundle.model_id and len(bundle.model_tag) == 8
    sess = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    symbols = sess.run(None, {"frames": frames})[0]
    assert symbols.dtype == np.int32 and symbols.shape == (4, 8)
    for s in symbols:
        assert np.array_equal(decompress(compress(s, bundle.tables, bundle.model_tag), bundle.tables, bundle.model_tag), s)


def test_bundle_errors_are_clear(tmp_path):
    make_tiny_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not a taskcodec bundle"):
        load_bundle(tmp_path / "nowhere")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "classifier.onnx").write_bytes(b"edited")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "classifier.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")
    manifest["schema_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(tmp_path / "b")


def test_bytes_decode_identically_in_a_fresh_process(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    rng = np.random.default_rng(1)
    symbols = rng.integers(-6, 6, (20, 8)).astype(np.int32)
    blobs = [compress(s, bundle.tables, bundle.model_tag).hex() for s in symbols]
    code = ("import json,sys,numpy as np; from taskcodec.bundle import load_bundle; from taskcodec.coding import decompress;"
            "b=load_bundle(sys.argv[1]); print(json.dumps([decompress(bytes.fromhex(h), b.tables, b.model_tag).tolist()"
            " for h in json.load(sys.stdin)]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], input=json.dumps(blobs), text=True,
                         capture_output=True, check=True).stdout
    assert np.array_equal(np.array(json.loads(out)), symbols)
