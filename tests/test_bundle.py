"""Bundle loading validates schema, files and hashes; symbols coded with one bundle decode in another process."""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from taskcodec.bundle import BundleError, compute_model_id, load_bundle
from taskcodec.coding import EntropyTables, compress, decompress
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
    manifest["schema_version"] = 1
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema version 1, older.*taskcodec export RUN --out BUNDLE.*"
                                          r"taskcodec bundle upgrade OLD --out NEW"):
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


def _rewrite(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_typed_manifest_refuses_unknown_and_mistyped_keys_by_name(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    assert bundle.spec.stream.coder == "taskcodec-range56" and bundle.spec.stream.precision_bits == 16
    good = json.loads((tmp_path / "b" / "manifest.json").read_text())
    cases = [
        ({"colour": "gray"}, "unknown key 'colour'"),
        ({"latent_dim": "8"}, "key 'latent_dim'"),
        ({"input": dict(good["input"], color_order="cmyk")}, "key 'input.color_order'"),
        ({"input": dict(good["input"], extra=1)}, "unknown key 'input.extra'"),
        ({"stream": dict(good["stream"], coder="constriction")}, "key 'stream.coder'"),
        ({"stream": dict(good["stream"], precision_bits=40)}, "key 'stream.precision_bits'"),
        ({"stream": None}, "missing key 'stream'"),
        ({"model_id": "xyz"}, "key 'model_id'"),
    ]
    for change, message in cases:
        (tmp_path / "b" / "manifest.json").write_text(json.dumps(good))
        _rewrite(tmp_path / "b", **change)
        with pytest.raises(BundleError, match=re.escape(message)):
            load_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(good))
    assert load_bundle(tmp_path / "b").model_id == bundle.model_id


def test_model_id_covers_the_integer_cdf(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    t = bundle.tables
    cdf = t.cdf.copy()
    cdf[0, 1] += 1  # one count moved between two entries: other bytes, so another model
    other = EntropyTables(t.lower, t.length, t.pmf, cdf, t.precision)
    other.save(tmp_path / "other.npz")
    assert compute_model_id(bundle.encoder_path(), tmp_path / "other.npz") != bundle.model_id
    coarse = EntropyTables(t.lower, t.length, t.pmf, precision=12)
    coarse.save(tmp_path / "coarse.npz")
    assert compute_model_id(bundle.encoder_path(), tmp_path / "coarse.npz") != bundle.model_id
    assert compute_model_id(bundle.encoder_path(), bundle.file("tables")) == bundle.model_id


def _schema1_bundle(tmp_path):
    """A bundle as taskcodec 0.1 wrote it: float tables only, constriction named in the manifest, schema 1."""
    bundle = make_tiny_bundle(tmp_path / "v1")
    frames = np.random.default_rng(5).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    sess = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    symbols = sess.run(None, {"frames": frames})[0]
    np.savez_compressed(tmp_path / "v1" / "golden.npz", frames=frames, symbols=symbols,
                        streams=np.zeros(12, np.uint8), offsets=np.arange(0, 14, 2))
    t = bundle.tables
    np.savez(tmp_path / "v1" / "tables.npz", lower=t.lower, length=t.length, pmf=t.pmf)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    manifest.update(schema_version=1, model_id="e117a780072c62db",
                    stream={"check": "crc16-ccitt", "coder": "constriction queue RangeEncoder"},
                    entropy_tables={"dtype": "float32", "file": "tables.npz"},
                    files=dict(manifest["files"], golden="golden.npz"))
    manifest["sha256"] = {name: hashlib.sha256((tmp_path / "v1" / name).read_bytes()).hexdigest()
                          for name in manifest["files"].values()}
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "v1", symbols


def test_upgrade_converts_a_schema1_bundle(tmp_path):
    from taskcodec.export.golden import verify_golden

    old, symbols = _schema1_bundle(tmp_path)
    with pytest.raises(BundleError, match="schema version 1"):
        load_bundle(old)
    proc = subprocess.run([sys.executable, "-m", "taskcodec.cli", "bundle", "upgrade", str(old), "--out",
                           str(tmp_path / "v2")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = load_bundle(tmp_path / "v2")
    assert new.spec.schema_version == 2 and new.model_id != "e117a780072c62db" and new.model_id in proc.stdout
    assert new.manifest["upgraded_from"]["model_id"] == "e117a780072c62db"
    assert (new.file("encoder").read_bytes() == (old / "encoder.onnx").read_bytes())
    assert (new.file("classifier").read_bytes() == (old / "classifier.onnx").read_bytes())
    assert np.array_equal(new.tables.pmf, EntropyTables.load(old / "tables.npz").pmf)
    report = verify_golden(new)
    assert report.ok and report.frames == 6, report
    with np.load(new.file("golden")) as z:
        assert np.array_equal(z["symbols"], symbols)
    again = subprocess.run([sys.executable, "-m", "taskcodec.cli", "bundle", "upgrade", str(tmp_path / "v2"), "--out",
                            str(tmp_path / "v3")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "nothing to upgrade" in again.stderr


def test_default_bundle_is_schema2_and_its_golden_vectors_verify():
    from taskcodec.export.golden import verify_golden

    bundle = load_bundle()
    assert bundle.spec.schema_version == 2 and bundle.spec.stream.coder == "taskcodec-range56"
    assert bundle.manifest["upgraded_from"]["model_id"] == "e117a780072c62db"
    assert verify_golden(bundle).ok
