"""Command: `taskcodec calibrate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def fashion_frames(bundle, split: str, data: Optional[Path]):
    """Fashion-MNIST images in the bundle's input layout (resized and colour-converted if it wants other frames)."""
    import cv2
    import numpy as np

    from taskcodec.data import load_fashion_mnist

    images, labels = load_fashion_mnist(split, data)
    spec = bundle.input
    if (spec.height, spec.width) != images.shape[1:]:
        images = np.stack([cv2.resize(im, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR) for im in images])
    frames = images[..., None] if spec.channels == 1 else np.repeat(images[..., None], spec.channels, axis=-1)
    return np.ascontiguousarray(frames), labels


def write_markdown(report: dict, path: Path) -> None:
    fp = report["fp32"]
    lines = [f"# int8 calibration of bundle {report['model_id']}", "",
             f"{report['calibration_frames']} calibration frames (training split), {report['eval_frames']} evaluation "
             f"frames (test split); latency is ONNX Runtime CPU, one thread, median per frame. Machine: {_machine()}.", "",
             "| scheme | symbol agreement | bits/image | accuracy | drop (pt) | b1 ms/frame | b32 ms/frame | gate |",
             "|---|---|---|---|---|---|---|---|",
             f"| fp32 | 1.0000 | {fp['bits_per_image']:.1f} | {fp['accuracy']:.4f} | 0.00 | {fp['latency_b1_ms']:.3f} | "
             f"{fp['latency_b32_ms']:.3f} | reference |"]
    for s in report["schemes"]:
        picked = " **picked**" if s["scheme"] == report.get("picked") else ""
        lines.append(f"| {s['scheme']} | {s['symbol_agreement']:.4f} | {s['bits_per_image']:.1f} | {s['accuracy']:.4f} | "
                     f"{s['accuracy_drop']:.2f} | {s['latency_b1_ms']:.3f} | {s['latency_b32_ms']:.3f} | "
                     f"{'pass' if s['passed'] else 'fail'}{picked} |")
    path.write_text("\n".join(lines) + "\n")


def _machine() -> str:
    import os
    import platform

    import onnxruntime

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def register(app: typer.Typer) -> None:
    import taskcodec.calibration.frozen_cli  # noqa: F401  (adds its commands to the `frozen` group)

    @app.command("calibrate")
    def calibrate_cmd(
        bundle: Optional[Path] = typer.Argument(None, help="Bundle folder (default: the embedded one)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Fashion-MNIST idx folder (calibration + evaluation frames)."),
        calib_frames: int = typer.Option(512, help="Calibration frames from the training split."),
        eval_frames: int = typer.Option(10000, help="Evaluation frames from the test split."),
        methods: str = typer.Option("minmax,entropy,percentile", help="Calibration methods to try."),
        activations: str = typer.Option("u8,s8", help="Activation types to try (u8, s8)."),
        reduce_range: str = typer.Option("both", help="reduce_range: on, off or both."),
        budget: float = typer.Option(0.5, help="Largest accuracy loss in points that int8 may cost."),
        target: str = typer.Option("cpu", help="cpu (any scheme) or tensorrt (symmetric s8 only)."),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report as a markdown table."),
        dry_run: bool = typer.Option(False, help="Measure only; do not write the int8 encoder into the bundle."),
    ) -> None:
        """Make the int8 encoder (explicit Q/DQ ONNX) from real frames; fail if int8 costs more than --budget points."""
        from taskcodec.calibration.calibrate import CalibrationGateError, calibrate
        from taskcodec.calibration.schemes import all_schemes
        from taskcodec.bundle import BundleError, load_bundle
        from taskcodec.data import DataError

        rr = {"on": [True], "off": [False], "both": [False, True]}.get(reduce_range)
        if rr is None or target not in ("cpu", "tensorrt") or budget < 0:
            raise typer.BadParameter("--reduce-range is on/off/both, --target cpu/tensorrt, --budget >= 0")
        try:
            schemes = all_schemes(methods.split(","), activations.split(","), rr, target)
            b = load_bundle(bundle)
            calib, _ = fashion_frames(b, "train", data)
            frames, labels = fashion_frames(b, "test", data)
        except (ValueError, BundleError, DataError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        rng = __import__("numpy").random.default_rng(0)
        calib = calib[rng.choice(len(calib), min(calib_frames, len(calib)), replace=False)]
        try:
            report = calibrate(b, calib, frames[:eval_frames], labels[:eval_frames], schemes, budget, write=not dry_run)
        except CalibrationGateError as exc:
            typer.echo(f"calibration gate: {exc}", err=True)
            raise typer.Exit(1)
        if markdown:
            write_markdown(report, markdown)
            markdown.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"picked {report['picked']}" + ("" if dry_run else f"; written to {b.path}"))
