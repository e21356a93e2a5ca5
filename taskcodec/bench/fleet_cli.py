"""`taskcodec bench fleet`: the command, registered on the bench sub-app by bench/cli.py (heavy imports inside)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def fleet(
    cameras: int = typer.Option(20, "--cameras", "-n", min=1, help="Cameras in the fleet run."),
    fps: float = typer.Option(5.0, "--fps", min=0.01, max=120, help="Frames per second per camera."),
    duration: float = typer.Option(30.0, "--duration", min=0.5, help="Seconds of capture."),
    max_delay: float = typer.Option(10.0, "--max-delay", min=0, help="Uplink batching delay in seconds (0: each "
                                                                       "frame at once)."),
    find_capacity: bool = typer.Option(False, "--find-capacity", help="Also search the largest number of 1-fps "
                                                                      "cameras sustained (p99 < 250 ms, zero loss)."),
    curve: bool = typer.Option(False, "--curve", help="Also measure the JPEG/taskcodec IP-bytes ratio over fps "
                                                      "(1, 5, 15) and max-delay (0, 1, 10 s)."),
    runtime_rss: bool = typer.Option(False, "--runtime-process", help="Also run a real `runtime capture` process: "
                                                                       "peak RSS and range-coding share."),
    run: bool = typer.Option(True, "--run/--no-run", help="The fleet run itself (and its baselines)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="JPEG and H.264 uploads of the same "
                                                                              "frames."),
    h264: bool = typer.Option(True, "--h264/--no-h264", help="Include the H.264 baseline."),
    capacity_start: int = typer.Option(50, "--capacity-start", min=1, help="First step of the capacity ramp."),
    capacity_step: float = typer.Option(20.0, "--capacity-step", min=2, help="Seconds of capture per capacity step."),
    capacity_max: int = typer.Option(2000, "--capacity-max", min=1, help="Stop the ramp here."),
    camera_work: str = typer.Option("live", "--camera-work", help="live: preprocess + encode every frame in the "
                                                                  "client; cached: encode each pooled frame once."),
    capacity_camera_work: str = typer.Option("cached", "--capacity-camera-work",
                                             help="Camera work during the capacity search (see --camera-work)."),
    curve_cameras: int = typer.Option(4, "--curve-cameras", min=1),
    curve_duration: float = typer.Option(30.0, "--curve-duration", min=1),
    pool: int = typer.Option(200, "--pool", min=1, help="Distinct pre-rendered camera frames."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Model bundle (default: the embedded one)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for fleet.{json,md,png}."),
    netns: bool = typer.Option(True, "--netns/--no-netns", help="Count IP bytes on a veth pair to a network "
                                                                "namespace (needs root); off: application bytes only."),
    merge: bool = typer.Option(True, "--merge/--fresh", help="Keep sections of OUT/fleet.json not run this time."),
    data: Optional[Path] = typer.Option(None, "--data", help="Fashion-MNIST folder (default: system dataset)."),
) -> None:
    """Fleet bandwidth and capacity: N cameras against the real server; bytes per frame (payload, WebSocket, IP),
    server CPU, latency and accuracy, vs JPEG and H.264 uploads."""
    from taskcodec.bench.fleet import RunConfig, run_benchmark
    from taskcodec.bench.fleet_client import FleetError
    from taskcodec.bench.fleet_servers import ServiceError
    from taskcodec.bundle import BundleError
    from taskcodec.data import DataError

    for name, value in (("--camera-work", camera_work), ("--capacity-camera-work", capacity_camera_work)):
        if value not in ("live", "cached"):
            typer.echo(f"error: {name} must be live or cached, got {value!r}", err=True)
            raise typer.Exit(2)
    try:
        cfg = RunConfig(cameras, fps, duration, max_delay, camera_work) if run else None
        results = run_benchmark(cfg, bundle_path=bundle, out=out, baselines=baselines, h264=h264,
                                capacity=find_capacity, curve=curve, runtime_rss=runtime_rss,
                                capacity_start=capacity_start, capacity_step_s=capacity_step,
                                capacity_max=capacity_max, capacity_camera_work=capacity_camera_work,
                                curve_cameras=curve_cameras, curve_duration=curve_duration, pool_size=pool,
                                use_netns=netns, merge=merge, command="taskcodec " + " ".join(sys.argv[1:]),
                                data=str(data) if data else None, log=typer.echo)
    except (ValueError, BundleError, DataError, FleetError, ServiceError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from taskcodec.bench.fleet import targets

    for t in targets(results):
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        typer.echo(f"  [{mark}] {t['target']}: {t['measured'] or '-'}")
    typer.echo(f"wrote {out / 'fleet.json'}, {out / 'fleet.md'}" + (", fleet.png" if (out / "fleet.png").exists()
                                                                    else ""))
