"""`taskcodec frozen int8`: the frozen bundle's int8 encoder (added to the `frozen` command group of training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from taskcodec.training.frozen_cli import _errors, _fail, frozen_app

CALIB = typer.Option(512, help="real calibration frames (Fashion-MNIST train, never the eval set)")
METHOD = typer.Option("percentile", help="activation calibration: minmax, entropy, percentile or mse")
PERCENTILE = typer.Option(99.99, help="--method percentile: percentile of |x| for ReLU6 outputs")
PCT_LINEAR = typer.Option(99.9, help="--method percentile: for the other activations (linear convs, residual sums)")
FP32_FIRST = typer.Option(3, help="the first N convs (after the input normalisation) stay fp32; 0: all int8")
KEEP_FP32 = typer.Option(0, help="last Conv layers kept in fp32 (the pooling/affine/Round tail always is)")
FP32_DW = typer.Option(False, help="exclude depthwise convs from quantization (ORT >= 1.21 still runs them int8 "
                                     "when their neighbours are quantized)")
QUANT_CLIP = typer.Option(True, "--quantize-clip/--fp32-clip", help="quantize ReLU6 so ORT folds it into the conv")
QUANT_ADD = typer.Option(True, "--quantize-add/--fp32-add", help="residual Adds as QLinearAdd")
FMT = typer.Option("qdq", "--format", help="qdq or qoperator")
ACTS = typer.Option("u8", "--activations", help="u8 (asymmetric) or s8 (symmetric) activations")
REDUCE = typer.Option(False, help="7-bit weights (for CPUs without VNNI)")
LATCORR = typer.Option(True, "--latent-correction/--no-latent-correction",
                       help="per-latent gain/offset onto the fp32 latents, fitted on the calibration frames")
EVAL = typer.Option(10000, "--eval-frames", help="Fashion-MNIST test frames for accuracy and agreement (10000: all)")
BUDGET = typer.Option(1.0, "--budget", help="largest accuracy loss in points that int8 may cost (the accuracy gate)")


def _scheme(method, percentile, percentile_linear, fp32_first_convs, keep_fp32_convs, fp32_depthwise,
            quantize_clip, quantize_add, fmt, activations, reduce_range, latent_correction):
    from taskcodec.calibration.schemes import Scheme

    ops = ("Conv",) + (("Clip",) if quantize_clip else ()) + (("Add",) if quantize_add else ())
    return Scheme(method=method, percentile=percentile, percentile_linear=percentile_linear, ops=ops,
                  fp32_first_convs=fp32_first_convs, fp32_last_convs=keep_fp32_convs, fp32_depthwise=fp32_depthwise,
                  fmt=fmt, activations=activations, reduce_range=reduce_range, latent_correction=latent_correction)


@frozen_app.command(name="int8")
def int8_cmd(bundle_dir: Path = typer.Argument(..., help="bundle folder from `taskcodec frozen export`"),
             calib: int = CALIB, method: str = METHOD, percentile: float = PERCENTILE,
             percentile_linear: float = PCT_LINEAR,
             fp32_first_convs: int = FP32_FIRST, keep_fp32_convs: int = KEEP_FP32, fp32_depthwise: bool = FP32_DW,
             quantize_clip: bool = QUANT_CLIP, quantize_add: bool = QUANT_ADD, fmt: str = FMT,
             activations: str = ACTS, reduce_range: bool = REDUCE, latent_correction: bool = LATCORR,
             eval_frames: int = EVAL, budget: float = BUDGET,
             write: bool = typer.Option(False, help="add the int8 encoder to the bundle when accuracy passes"),
             log: Optional[Path] = typer.Option(None, help="append this scheme's result to a JSON list (a sweep log)"),
             note: str = typer.Option("", help="a label stored with the result in --log")) -> None:
    """Try one int8 scheme on an existing bundle: accuracy, symbol agreement, bytes, latency vs fp32 (1 thread)."""
    import torch

    from taskcodec.bundle import BundleError, load_bundle
    from taskcodec.calibration.frozen_int8 import int8_report

    torch.set_num_threads(1)
    try:
        scheme = _scheme(method, percentile, percentile_linear, fp32_first_convs, keep_fp32_convs, fp32_depthwise,
                         quantize_clip, quantize_add, fmt, activations, reduce_range, latent_correction)
        result = int8_report(load_bundle(bundle_dir), scheme, n_eval=eval_frames, write=write, budget_points=budget,
                             calib=calib, progress=typer.echo)
    except (*_errors(), BundleError) as exc:
        _fail(exc)
    if log is not None:
        entries = json.loads(log.read_text()) if log.is_file() else []
        entries.append({"note": note, **result})
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps(entries, indent=2) + "\n")
        typer.echo(f"appended to {log} ({len(entries)} entries)")


