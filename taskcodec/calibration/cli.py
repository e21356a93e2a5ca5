"""Command: `taskcodec calibrate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def fashion_frames(bundle, split: str, data: Optional[str]):
    """Frames of a dataset in the bundle's input layout (resized and colour-converted as the runtime does); the
    dataset is ``data`` (a --data spec) or the one the bundle was trained on (Fashion-MNIST for older bundles)."""
    from taskcodec.data import load_frames

    spec = bundle.input
    if data is None:
        data = ((bundle.manifest.get("training") or {}).get("data") or {}).get("data")
    images = load_frames(data, split, spec.height, spec.width, spec.channels)
    return images.frames, images.labels


def new_bundle(source, out: Path, force: bool):
    """A copy of ``source`` at ``out`` to calibrate (the source, e.g. the bundle inside the installed package, is
    never edited)."""
    import shutil

    from taskcodec.bundle import BundleError, load_bundle

    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} already exists; pass --force to replace it")
        if not (out / "manifest.json").is_file():
            raise BundleError(f"{out} exists and is not a bundle; refusing to replace it")
        shutil.rmtree(out)
    if Path(out).resolve() == Path(source.path).resolve():
        raise BundleError("--out must differ from the source bundle")
    shutil.copytree(source.path, out, dirs_exist_ok=True)
    return load_bundle(out)


def restamp(bundle, parent_id: str):
    """The calibrated bundle gets its own model id (parent id + int8 encoder hash) and golden vectors coded with it,
    so servers and cameras never confuse it with the bundle it came from."""
    import hashlib
    import tempfile

    import numpy as np

    from taskcodec.bundle import add_file, load_bundle
    from taskcodec.providers import ort_session, run_batched
    from taskcodec.coding import RangeCoder, compress

    h = hashlib.sha256(parent_id.encode() + bundle.file("encoder_int8").read_bytes()).hexdigest()[:16]
    int8 = dict(bundle.manifest.get("int8") or {}, calibrated_from=parent_id)
    bundle = add_file(bundle, "encoder_int8", bundle.file("encoder_int8"), bundle.manifest["files"]["encoder_int8"],
                      model_id=h, int8=int8)
    if bundle.has("golden"):
        with np.load(bundle.file("golden")) as z:
            frames = z["frames"]
        symbols = run_batched(ort_session(bundle.encoder_path()), frames, 256)
        coder = RangeCoder(bundle.tables)
        streams = [compress(s, coder, bundle.model_tag) for s in symbols]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / bundle.manifest["files"]["golden"]
            np.savez_compressed(path, frames=frames, symbols=symbols,
                                streams=np.frombuffer(b"".join(streams), np.uint8),
                                offsets=np.cumsum([0] + [len(s) for s in streams]).astype(np.int64))
            bundle = add_file(bundle, "golden", path, path.name)
    return load_bundle(bundle.path)


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
        out: Optional[Path] = typer.Option(None, "--out", help="New bundle to write (a copy of BUNDLE with the int8 "
                                           "encoder and its own model id); BUNDLE itself is never edited."),
        force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
        data: Optional[str] = typer.Option(None, "--data", help="calibration + evaluation frames: fashion-mnist[:DIR], "
                                           "folder:PATH or csv:FILE (default: the bundle's training data)."),
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
        if out is None and not dry_run:
            typer.echo("error: pass --out NEW_BUNDLE (calibration writes a new bundle with its own model id) or "
                       "--dry-run to only measure", err=True)
            raise typer.Exit(2)
        try:
            schemes = all_schemes(methods.split(","), activations.split(","), rr, target)
            source = load_bundle(bundle)
            calib, _ = fashion_frames(source, "train", data)
            frames, labels = fashion_frames(source, "test", data)
            b = source if dry_run else new_bundle(source, out, force)
        except (ValueError, BundleError, DataError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        from taskcodec.calibration.frames import calibration_indices

        calib = calib[calibration_indices(len(calib), min(calib_frames, len(calib)))]
        try:
            report = calibrate(b, calib, frames[:eval_frames], labels[:eval_frames], schemes, budget, write=not dry_run)
        except CalibrationGateError as exc:
            if not dry_run:
                import shutil

                shutil.rmtree(out, ignore_errors=True)  # no half-made bundle left behind
            typer.echo(f"calibration gate: {exc}", err=True)
            raise typer.Exit(1)
        if not dry_run:
            b = restamp(load_bundle(out), source.model_id)
        if markdown:
            write_markdown(report, markdown)
            markdown.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"picked {report['picked']}" + ("" if dry_run else f"; new bundle {b.path} model id {b.model_id} "
                                                   f"(from {source.model_id})"))
