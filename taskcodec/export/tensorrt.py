"""TensorRT engines from a bundle's ONNX encoder (TensorRT 10/11 Python API).

The network is *strongly typed*: precisions come from the graph itself (the explicit Q/DQ nodes of the int8 encoder),
never from an implicit calibrator, which TensorRT 11 removed. Engines are cached under a key made of the model id,
the precision, the TensorRT version and the GPU (name and compute capability), because an engine is only valid for
exactly that combination.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from taskcodec.bundle import Bundle

INSTALL_HINT = ("TensorRT is not installed (it is for GPU hosts only: pip install tensorrt, or use JetPack's "
                "python3-libnvinfer on a Jetson); the ONNX Runtime CPU/CUDA providers need no TensorRT")


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU) is not available on this host."""


def import_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(INSTALL_HINT) from exc


def gpu_identity() -> str:
    """'<name> sm<major><minor>' of GPU 0, from nvidia-smi; raises TensorRTUnavailable without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise TensorRTUnavailable(f"no NVIDIA GPU found (nvidia-smi: {exc})") from exc
    name, cap = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
    return f"{name} sm{cap.replace('.', '')}"


@dataclass(frozen=True)
class EngineKey:
    model_id: str
    precision: str
    tensorrt_version: str
    gpu: str

    def filename(self) -> str:
        gpu = hashlib.sha256(self.gpu.encode()).hexdigest()[:8]
        return f"{self.model_id}-{self.precision}-trt{self.tensorrt_version}-{gpu}.engine"


def build_engine(bundle: Bundle, precision: str = "int8", cache_dir: Path = Path("~/.cache/taskcodec/trt"),
                 max_batch: int = 64, workspace_mib: int = 1024, gpu: str | None = None, trt=None) -> Path:
    """Build (or reuse from the cache) a serialized engine for the bundle's fp32 or int8 (Q/DQ) encoder."""
    trt = trt or import_tensorrt()
    key = EngineKey(bundle.model_id, precision, trt.__version__, gpu or gpu_identity())
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / key.filename()
    if path.is_file() and path.stat().st_size > 0:
        return path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.encoder_path(precision)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    spec = bundle.input
    shape = lambda n: (n, spec.height, spec.width, spec.channels)  # noqa: E731
    profile.set_shape(network.get_input(0).name, shape(1), shape(min(8, max_batch)), shape(max_batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(path)
    return path


def run_engine(engine_path: Path, frames, trt=None):
    """Run a cached engine on uint8 frames [N,H,W,C] (torch CUDA tensors carry the buffers); returns int32 symbols."""
    trt = trt or import_tensorrt()
    import torch  # GPU hosts that build engines have torch with CUDA; the edge runtime uses ONNX Runtime instead

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    name_in, name_out = engine.get_tensor_name(0), engine.get_tensor_name(1)
    x = torch.as_tensor(frames).cuda().contiguous()
    context.set_input_shape(name_in, tuple(x.shape))
    y = torch.empty(tuple(context.get_tensor_shape(name_out)), dtype=torch.int32, device="cuda")
    context.set_tensor_address(name_in, x.data_ptr())
    context.set_tensor_address(name_out, y.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    if not context.execute_async_v3(stream):
        raise RuntimeError("TensorRT execution failed")
    torch.cuda.synchronize()
    return y.cpu().numpy()
