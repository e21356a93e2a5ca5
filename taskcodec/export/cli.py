"""Commands: `taskcodec export`, `taskcodec verify-bundle`, `taskcodec tensorrt`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    import taskcodec.export.frozen_cli  # noqa: F401  (adds its commands to the `frozen` group)

    @app.command("export")
    def export_cmd(
        run: Path = typer.Argument(..., help="Training run folder (from `taskcodec train`)."),
        out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
        data: Optional[Path] = typer.Option(None, "--data", help="Fashion-MNIST idx folder (for parity and golden vectors)."),
        parity: bool = typer.Option(True, help="Compare ONNX with torch on the full test set."),
    ) -> None:
        """Export a run to a model bundle: encoder ONNX (uint8 frames -> symbols), tables, classifier, golden vectors."""
        from taskcodec.export.build import REPORT_FILE, export_run

        if not (run / "config.json").is_file():
            raise typer.BadParameter(f"{run} is not a training run folder (no config.json)", param_hint="RUN")
        bundle = export_run(run, out, data, parity=parity)
        typer.echo(f"bundle {bundle.path} model id {bundle.model_id}")
        if parity:
            typer.echo(json.dumps(json.loads((out / REPORT_FILE).read_text()), indent=2))

    @app.command("verify-bundle")
    def verify_cmd(bundle: Optional[Path] = typer.Argument(None, help="Bundle folder (default: the embedded one).")) -> None:
        """Prove this machine decodes the bundle's golden vectors bit-exactly (frames -> symbols -> bytes -> symbols)."""
        from taskcodec.export.golden import verify_golden
        from taskcodec.bundle import BundleError, load_bundle

        try:
            b = load_bundle(bundle)
            report = verify_golden(b)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        typer.echo(f"{b.path} ({b.model_id}): {report.frames} frames, symbols equal {report.symbols_equal}, "
                   f"bytes equal {report.bytes_equal}, decoded equal {report.decoded_equal}")
        if not report.ok:
            raise typer.Exit(1)

    @app.command("tensorrt")
    def tensorrt_cmd(
        bundle: Optional[Path] = typer.Argument(None, help="Bundle folder (default: the embedded one)."),
        precision: str = typer.Option("int8", help="fp32 or int8 (the Q/DQ encoder from `taskcodec calibrate`)."),
        cache: Path = typer.Option(Path("~/.cache/taskcodec/trt"), help="Engine cache folder."),
        max_batch: int = typer.Option(64, help="Largest batch of the optimisation profile."),
    ) -> None:
        """Build (or reuse) a TensorRT engine for the bundle's encoder, strongly typed from its ONNX."""
        from taskcodec.export.tensorrt import TensorRTUnavailable, build_engine
        from taskcodec.bundle import load_bundle

        try:
            path = build_engine(load_bundle(bundle), precision, cache, max_batch)
        except TensorRTUnavailable as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        typer.echo(str(path))
