"""`taskcodec frozen export`: a frozen-backbone run to a model bundle (added to the `frozen` command group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from taskcodec.training.frozen_cli import WEIGHTS, _errors, _fail, frozen_app

from taskcodec.calibration.frozen_cli import EVAL


@frozen_app.command()
def export(run: Path = typer.Argument(..., help="run folder from `taskcodec frozen train`"),
           out: Path = typer.Option(..., "--out", help="bundle folder to write"),
           int8: bool = typer.Option(True, help="also calibrate an int8 encoder with the measured default scheme "
                                                "(calibration.frozen_int8.DEFAULT_SCHEME) and add it if the accuracy "
                                                "gate passes; `taskcodec frozen int8 BUNDLE --write` tries others"),
           eval_frames: int = EVAL,
           report: Path = typer.Option(Path("bench/results/transfer_int8.json"), help="int8 report (JSON)"),
           weights: Optional[Path] = WEIGHTS) -> None:
    """Export the whole camera encoder (backbone + affine + Round; uint8 NHWC RGB in, int32 symbols out) as a
    bundle with golden vectors; optionally add a calibrated int8 encoder with a symbol-agreement / accuracy /
    latency report."""
    import torch

    from taskcodec.bundle import BundleError
    from taskcodec.export.frozen import export_bundle
    from taskcodec.calibration.frozen_int8 import DEFAULT_SCHEME, int8_report

    torch.set_num_threads(1)
    try:
        bundle = export_bundle(run, out, weights, progress=typer.echo)
        typer.echo(f"bundle {bundle.path} model_id={bundle.model_id}")
        if int8:
            result = int8_report(bundle, DEFAULT_SCHEME, n_eval=eval_frames, progress=typer.echo)
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2) + "\n")
            typer.echo(json.dumps(result, indent=2))
    except (*_errors(), BundleError) as exc:
        _fail(exc)


