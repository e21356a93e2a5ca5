"""TensorRT path: the real engine build runs only where TensorRT and a GPU exist (skipped with a reason elsewhere);
the cache key, the strongly typed network request and the error paths are checked everywhere with a stand-in for
the absent GPU library."""

import importlib.util
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from taskcodec.export import tensorrt as trt_path
from tiny_bundle import make_tiny_bundle

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and shutil.which("nvidia-smi") is not None


class FakeTensorRT:
    """Records what build_engine asks of TensorRT; stands in for the GPU-only library."""

    __version__ = "10.99"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, parse_ok=True):
        self.calls = []
        fake = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return SimpleNamespace(get_input=lambda i: SimpleNamespace(name="frames"))

            def create_builder_config(self):
                return SimpleNamespace(set_memory_pool_limit=lambda *a: fake.calls.append(("pool", a)),
                                       add_optimization_profile=lambda p: None)

            def create_optimization_profile(self):
                return SimpleNamespace(set_shape=lambda *a: fake.calls.append(("profile", a)))

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return b"engine-bytes"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0 if parse_ok else 1

            def parse(self, data):
                fake.calls.append(("parse", len(data)))
                return parse_ok

            def get_error(self, i):
                return "unsupported node"

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_missing_tensorrt_gives_a_clear_error(monkeypatch):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(trt_path.TensorRTUnavailable, match="pip install tensorrt"):
        trt_path.import_tensorrt()


def test_engine_cache_keyed_by_model_trt_version_and_gpu(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    fake = FakeTensorRT()
    path = trt_path.build_engine(bundle, "fp32", tmp_path / "cache", max_batch=32, gpu="NVIDIA H100 sm90", trt=fake)
    assert path.read_bytes() == b"engine-bytes"
    assert bundle.model_id in path.name and "trt10.99" in path.name
    assert ("network_flags", 1 << fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED) in fake.calls  # strongly typed
    assert ("profile", ("frames", (1, 28, 28, 1), (8, 28, 28, 1), (32, 28, 28, 1))) in fake.calls
    builds = sum(c[0] == "build" for c in fake.calls)
    assert trt_path.build_engine(bundle, "fp32", tmp_path / "cache", gpu="NVIDIA H100 sm90", trt=fake) == path
    assert sum(c[0] == "build" for c in fake.calls) == builds  # cache hit: nothing rebuilt
    other = trt_path.build_engine(bundle, "fp32", tmp_path / "cache", gpu="NVIDIA L4 sm89", trt=fake)
    assert other != path  # another GPU gets its own engine


def test_parse_failure_and_missing_int8_encoder_are_clear(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    with pytest.raises(RuntimeError, match="could not parse.*unsupported node"):
        trt_path.build_engine(bundle, "fp32", tmp_path / "c", gpu="g", trt=FakeTensorRT(parse_ok=False))
    from taskcodec.bundle import BundleError

    with pytest.raises(BundleError, match="no int8 encoder"):
        trt_path.build_engine(bundle, "int8", tmp_path / "c", gpu="g", trt=FakeTensorRT())


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (GPU hosts only: pip install tensorrt)")
def test_real_engine_matches_onnx_runtime(tmp_path):
    from taskcodec.export.golden import run_encoder

    bundle = make_tiny_bundle(tmp_path / "b")
    path = trt_path.build_engine(bundle, "fp32", tmp_path / "cache")
    frames = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    assert (trt_path.run_engine(path, frames) == run_encoder(bundle.encoder_path(), frames)).mean() >= 0.999
