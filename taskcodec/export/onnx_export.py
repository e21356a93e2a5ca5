"""torch -> ONNX with the dynamo exporter, a dynamic batch dimension, and a check that ONNX Runtime loads the result."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> Path:
    """Export ``module(example)`` to ``path`` with batch as the one dynamic dimension; weights embedded in the file."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET, input_names=[input_name],
            output_names=[output_name], dynamic_shapes=({0: batch},), external_data=False, verbose=False,
        )
    program.optimize()
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return Path(path)
