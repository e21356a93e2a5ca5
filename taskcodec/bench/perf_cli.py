"""`taskcodec bench server` and `taskcodec bench runtime`: CPU per frame of the ingest server and of the edge runtime
on this machine. Heavy imports happen inside the commands."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def server(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Model bundle folder (default: the embedded one)"),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for serve_bench_d<D>.{json,md,png}"),
    frames: int = typer.Option(2000, "--frames", min=10, help="Frames per stage measurement"),
    seconds: float = typer.Option(5.0, "--seconds", min=0.5, help="Duration of each pipeline run"),
    cameras: str = typer.Option("50,500", "--cameras", help="Simulated camera counts, comma-separated"),
    load_cameras: int = typer.Option(0, "--load-cameras", min=0,
                                     help="Also run a real server with this many 1-fps WebSocket cameras (0: skip)"),
    load_seconds: float = typer.Option(20.0, "--load-seconds", min=2.0),
) -> None:
    """Measure the server's CPU per frame (decode, classify, store) in-process and micro-batching vs per-message."""
    from rich.console import Console

    from taskcodec.bench import server_cpu as perf
    from taskcodec.bundle import BundleError, load_bundle

    try:
        loaded = load_bundle(bundle)
        counts = tuple(int(c) for c in cameras.split(","))
    except BundleError as exc:
        _fail(str(exc))
    except ValueError:
        _fail(f"--cameras must be comma-separated integers, got {cameras!r}")
    with Console(stderr=True).status("measuring server CPU per frame (about a minute)"):
        result = perf.run(loaded, out, frames=frames, cameras=counts, seconds=seconds, load_cameras=load_cameras,
                          load_seconds=load_seconds)
    typer.echo(perf.to_markdown(result))
    typer.echo(f"wrote {out}/serve_bench_d{loaded.latent_dim}.{{json,md,png}}")



def runtime(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle folder (default: the embedded one)."),
    frames: int = typer.Option(500, "--frames", "-n", min=10, help="Frames per run."),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads."),
    precision: Optional[list[str]] = typer.Option(None, "--precision", help="fp32/int8 (default: all the bundle has)."),
    spool_sync: Optional[list[str]] = typer.Option(None, "--spool-sync", help="full and/or normal (default: full)."),
    out: Path = typer.Option(Path("bench/results/runtime"), "--out", help="Folder for runtime_profile.{json,md}."),
    note: str = typer.Option("", "--note", help="Free text recorded with the results (e.g. where the bundle came from)."),
    stages: bool = typer.Option(True, "--stages/--no-stages", help="Unpaced runs: per-stage time, coding share, RSS."),
    cpu: bool = typer.Option(False, "--cpu/--no-cpu", help="Also paced runs: process CPU per frame (runtime_cpu.{json,md})."),
    fps: float = typer.Option(30.0, "--fps", min=1.0, help="Frame rate of the CPU runs."),
    cpu_frames: int = typer.Option(900, "--cpu-frames", min=100, help="Frames per CPU run (the first 60 are warm-up)."),
    preprocess: bool = typer.Option(False, "--preprocess-check/--no-preprocess-check",
                                    help="Also compare the runtime's preprocessing with the direct INTER_AREA resize "
                                         "on 10k frames (preprocess_check.{json,md})."),
    capture_args: str = typer.Option("", "--capture-args", help="Extra `runtime capture` flags for the CPU runs, "
                                                                  "e.g. '--max-delay 0.2'."),
) -> None:
    """Measure per-stage time per frame, the range-coding share and peak RSS of `runtime capture` on this machine,
    and its process CPU per frame at a camera's frame rate (640x480 virtual camera, rendering excluded)."""
    from taskcodec.bench.runtime_profile import profile as run_profile
    from taskcodec.bundle import BundleError

    try:
        for sync in spool_sync or []:
            if sync not in ("full", "normal"):
                raise typer.BadParameter(f"spool sync must be full or normal, got {sync!r}", param_hint="--spool-sync")
        if stages:
            result = run_profile(bundle, frames, out, threads, precision, spool_syncs=spool_sync, note=note)
            from taskcodec.bench.runtime_profile import markdown

            typer.echo(markdown(result))
            typer.echo(f"wrote {out / 'runtime_profile.json'} and {out / 'runtime_profile.md'}")
        if preprocess:
            from taskcodec.bench.runtime_profile import preprocess_check

            preprocess_check(bundle, out)
            typer.echo((out / "preprocess_check.md").read_text())
        if cpu:
            from taskcodec.bench.runtime_profile import cpu_markdown, cpu_profile

            result = cpu_profile(bundle, out, frames=cpu_frames, fps=fps, precisions=precision, spool_syncs=spool_sync,
                                 threads=threads, note=note, capture_args=shlex.split(capture_args))
            typer.echo(cpu_markdown(result))
            typer.echo(f"wrote {out / 'runtime_cpu.json'} and {out / 'runtime_cpu.md'}")
    except (BundleError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


