"""`taskcodec frozen bench` and `frozen bench-bundle`: zero-shot transfer benchmarks (added to the `frozen` group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from taskcodec.training.frozen_cli import BACKBONE, WEIGHTS, _errors, _fail, frozen_app


@frozen_app.command()
def bench(runs: List[Path] = typer.Argument(..., help="run folders (one rate point each)"),
          size: int = typer.Option(160, help="input size the runs were trained at"),
          eval_sets: List[str] = typer.Option(["fashion_mnist", "mnist", "lfw"], "--eval", help="datasets"),
          sizes: List[int] = typer.Option([160, 224], "--size-study", help="sizes for the accuracy/latency study"),
          out: Path = typer.Option(Path("bench/results"), help="folder for transfer.{json,md,png}"),
          note: List[str] = typer.Option([], "--note", help="a remark to print under the tables"),
          backbone: str = BACKBONE, weights: Optional[Path] = WEIGHTS) -> None:
    """Zero-shot transfer: rate and probe accuracy on unseen datasets vs JPEG and WebP at equal accuracy."""
    import sys

    from taskcodec.bench.transfer import run_transfer, write_outputs

    try:
        report = run_transfer(runs, eval_sets, size, backbone, weights, sizes=tuple(sizes), progress=typer.echo)
    except _errors() as exc:
        _fail(exc)
    report["notes"] = list(note)
    int8 = Path(out) / "transfer_int8.json"
    if int8.is_file():
        report["int8"] = json.loads(int8.read_text())
    write_outputs(report, out, command="taskcodec frozen bench " + " ".join(a for a in sys.argv[3:] if a not in note))
    typer.echo(f"wrote {out}/transfer.json, transfer.md, transfer.png")


@frozen_app.command(name="bench-bundle")
def bench_bundle(bundle_dir: Path = typer.Argument(..., help="bundle folder from `taskcodec frozen export`"),
                 eval_sets: List[str] = typer.Option(["fashion_mnist", "mnist", "lfw"], "--eval", help="datasets"),
                 out: Path = typer.Option(Path("bench/results"), help="folder for transfer_bundle.{json,md}")) -> None:
    """A deployed bundle on unseen datasets: fp32 and int8 encoders (ONNX Runtime), real bytes, probe accuracy."""
    import sys

    from taskcodec.bench.transfer import bundle_transfer, write_bundle_outputs
    from taskcodec.bundle import BundleError

    try:
        report = bundle_transfer(bundle_dir, eval_sets, progress=typer.echo)
    except (*_errors(), BundleError) as exc:
        _fail(exc)
    write_bundle_outputs(report, out, command="taskcodec frozen bench-bundle " + " ".join(sys.argv[3:]))
    typer.echo(f"wrote {out}/transfer_bundle.json, transfer_bundle.md")


