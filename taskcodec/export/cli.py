"""Commands: `taskcodec export`, `taskcodec verify-bundle`, `taskcodec tensorrt`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing folder unless --force; even then only a bundle (or an empty folder) goes."""
    import shutil

    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        _fail(f"{out} already exists; pass --force to replace it")
    if not (out / "manifest.json").is_file():
        _fail(f"{out} exists and is not a bundle (no manifest.json); refusing to replace it even with --force")
    shutil.rmtree(out)


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter logs warnings with tracebacks even when it succeeds: keep its logs and output, and show
    them only if the export fails."""
    import io
    import logging

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        typer.echo(buffer.getvalue(), err=True)
        raise
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved):
            lg.handlers, lg.propagate, lg.level = handlers, propagate, level


def register(app: typer.Typer) -> None:
    import taskcodec.export.frozen_cli  # noqa: F401  (adds its commands to the `frozen` group)

    @app.command("export")
    def export_cmd(
        run: Path = typer.Argument(..., help="Training run folder (from `taskcodec train`)."),
        out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
        data: Optional[str] = typer.Option(None, "--data", help="test frames for parity, golden vectors and the "
                                           "out-of-domain threshold: fashion-mnist[:DIR], folder:PATH or csv:FILE "
                                           "(default: the run's own data)."),
        parity: bool = typer.Option(True, help="Compare ONNX with torch on the full test set."),
        force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
        ood_rate: float = typer.Option(0.01, "--ood-false-alarm", min=0.0, max=0.5,
                                       help="False-alarm rate of the out-of-domain flag on held-out in-domain "
                                       "frames (0: no flag)."),
    ) -> None:
        """Export a run to a model bundle: encoder ONNX (uint8 frames -> symbols), tables, classifier, golden vectors,
        and the out-of-domain threshold."""
        from taskcodec.bundle import BundleError
        from taskcodec.data import DataError
        from taskcodec.training.trainer import RunError

        if not (run / "config.json").is_file():
            _fail(f"{run} is not a training run folder (no config.json)")
        _check_out(out, force)
        try:
            with _quiet_exporter():
                from taskcodec.export.build import REPORT_FILE, export_run

                bundle = export_run(run, out, data, parity=parity)
                if ood_rate > 0:
                    from taskcodec.export.ood import add_ood

                    bundle = add_ood(bundle, run, data, ood_rate)
        except (DataError, BundleError, RunError, ValueError) as exc:
            shutil.rmtree(out, ignore_errors=True)  # no half-made bundle left behind (--out was checked above)
            _fail(str(exc))
        typer.echo(f"bundle {bundle.path} model id {bundle.model_id}")
        if parity:
            report = json.loads((out / REPORT_FILE).read_text())
            typer.echo(f"parity on {report['test_images']} test frames: symbols equal "
                       f"{100 * report['symbol_agreement']:.2f} % (largest difference {report['max_symbol_difference']}), "
                       f"accuracy torch {report['accuracy_torch']:.4f} / ONNX {report['accuracy_onnx']:.4f}")
        ood = bundle.manifest.get("ood")
        if ood:
            typer.echo(f"out-of-domain flag: {ood['score']} > {ood['threshold']:.4g} "
                       f"({100 * ood['false_alarm_rate']:.1f} % false alarms on {ood['calibration']['frames']} "
                       f"held-out frames of {ood['calibration']['data']})")

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
