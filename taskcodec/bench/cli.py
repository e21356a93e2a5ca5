"""`taskcodec bench ...`: a thin dispatcher to the benchmark modules (each benchmark lives in its own module and
writes JSON + markdown + PNG through taskcodec.report). Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

bench_app = typer.Typer(help="Benchmarks: classical codec baselines and more; results as JSON + markdown + PNG.",
                        no_args_is_help=True)


@bench_app.command("classical")
def classical(
    qualities: Optional[List[str]] = typer.Option(
        None, "--qualities", "-q",
        help="Codec and qualities, repeatable: jpeg=1,5,10  webp=0,1,5  png=lossless  avif=0,20. "
             "Default: jpeg 1,5,10,20,50,90; webp 0,1,5,20,50,90; png lossless; avif 0,20,50."),
    epochs: int = typer.Option(3, "--epochs", min=1, help="CNN epochs per codec/quality (and for the raw row)."),
    baseline_epochs: int = typer.Option(8, "--baseline-epochs", min=0,
                                        help="Also train the raw-pixel CNN this long (0: skip)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for classical.{json,md,png}."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (the CPU is shared: keep 1)."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", min=1, help="Train the codec CNNs (and the raw row) on the first N train images only."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", min=1, help="Use only the first N test images."),
    baseline_train_limit: Optional[int] = typer.Option(None, "--baseline-train-limit", min=1,
                                                       help="Train images for the baseline (default: all)."),
    data: Optional[Path] = typer.Option(None, "--data", help="fashion-mnist[:DIR] (default: the system dataset) or "
                                        "fashion-mnist-placed[:DIR] (items at random placements)."),
    report_only: bool = typer.Option(False, "--report-only",
                                     help="Only rewrite classical.md and classical.png from OUT/classical.json."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Reuse rows already in OUT/classical.json measured with the same settings."),
) -> None:
    """Bytes per image vs accuracy for JPEG/WebP/PNG/AVIF: a CNN retrained on each codec's decoded images."""
    from taskcodec.bench.classical import CodecError, parse_qualities, run_benchmark
    from taskcodec.data import DataError

    if report_only:
        from taskcodec.bench.classical import load_results, write_results

        try:
            paths = write_results(load_results(out), out)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            typer.echo(f"error: cannot rebuild the report from {out}: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo("wrote " + ", ".join(map(str, paths)))
        return
    try:
        parsed = parse_qualities(qualities) if qualities else None
        results = run_benchmark(parsed, epochs=epochs, baseline_epochs=baseline_epochs, seed=seed, threads=threads,
                                train_limit=train_limit, test_limit=test_limit,
                                baseline_train_limit=baseline_train_limit, data=data, out=out, resume=resume,
                                progress=True, log=typer.echo)
    except (CodecError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out / 'classical.json'}, {out / 'classical.md'}, {out / 'classical.png'} "
               f"({len(results['rows'])} rows)")


from taskcodec.bench.fleet_cli import fleet as _fleet  # noqa: E402  (light: typer only)

bench_app.command("fleet")(_fleet)

from taskcodec.bench.faults import faults_cmd as _faults  # noqa: E402  (issue 11: fault injection, light)

bench_app.command("faults")(_faults)

from taskcodec.bench.server_faults import server_faults_cmd as _server_faults  # noqa: E402  (issue 11, server side)

bench_app.command("server-faults")(_server_faults)

from taskcodec.bench.perf_cli import runtime as _runtime, server as _server  # noqa: E402  (light: typer only)

bench_app.command("server")(_server)
bench_app.command("runtime")(_runtime)

from taskcodec.bench.tasks import tasks_cmd as _tasks  # noqa: E402  (light: numpy + typer)

bench_app.command("tasks")(_tasks)

from taskcodec.bench.ood import ood_cmd as _ood  # noqa: E402  (issue 16: out-of-domain flag)

bench_app.command("ood")(_ood)

from taskcodec.bench.natural import natural_cmd as _natural  # noqa: E402  (issue 16: natural-image example)

bench_app.command("natural")(_natural)


from taskcodec.bench.coder import coder_cmd as _coder  # noqa: E402  (issue 10: entropy coder, light)

bench_app.command("coder")(_coder)


@bench_app.command("cluster")
def cluster(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
    cameras: List[int] = typer.Option([2000], "--cameras", help="Simulated one-fps cameras (repeatable)."),
    gateways: List[int] = typer.Option([1], "--gateways", help="Gateway counts to measure (repeatable)."),
    workers: List[int] = typer.Option([1], "--workers", help="Worker counts to measure (repeatable)."),
    seconds: float = typer.Option(30.0, "--seconds", min=5.0, help="Measured window per configuration."),
    load_procs: int = typer.Option(2, "--load-procs", min=1, help="Load-generator processes."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for cluster.{json,md,png}."),
    query_rows: int = typer.Option(0, "--query-rows", min=0, help="Also time the queries at this many stored frames."),
) -> None:
    """Scale-out mode (local 3-node JetStream + PostgreSQL): frames/s and server CPU per frame vs gateways/workers."""
    from taskcodec.bench.cluster import run

    result = run(bundle, cameras, gateways, workers, seconds, load_procs, out, query_rows, log=typer.echo)
    from taskcodec.bench.cluster import markdown

    typer.echo(markdown(result))


@bench_app.command("serve-load")
def serve_load(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
    cameras: List[int] = typer.Option([1000], "--cameras", help="Simulated one-fps cameras (repeatable)."),
    seconds: float = typer.Option(30.0, "--seconds", min=10.0, help="Load duration per configuration."),
    load_procs: int = typer.Option(2, "--load-procs", min=1, help="Load-generator processes."),
    variant: List[str] = typer.Option([""], "--variant", help="Extra `taskcodec serve` options (repeatable)."),
    profile: bool = typer.Option(False, "--profile", help="Record the server with py-spy (-f raw) meanwhile."),
    name: str = typer.Option("serve_load", "--name", help="Result file stem."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for NAME.{json,md}."),
) -> None:
    """Embedded server (`taskcodec serve`) under many one-fps cameras: server CPU per frame (psutil), py-spy."""
    from taskcodec.bench.serve_load import markdown, run

    typer.echo(markdown(run(bundle, cameras, seconds, load_procs, out, variant, profile, name, log=typer.echo)))


@bench_app.command("storage-size")
def storage_size(
    frames: int = typer.Option(300_000, "--frames", min=1000, help="Frames to store per layout."),
    cameras: int = typer.Option(1000, "--cameras", min=1, help="One-fps cameras they come from."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for storage_size{,_pg}.{json,md}."),
    pg: bool = typer.Option(False, "--pg", help="Also PostgreSQL (a local instance; storage_size_pg.*)."),
    sqlite: bool = typer.Option(True, "--sqlite/--no-sqlite", help="The SQLite layouts (storage_size.*)."),
    queries_at_scale: bool = typer.Option(
        False, "--queries-at-scale", help="Only the query latencies of the packed store as it grows to --frames "
        "(filled by the product's write path, compacted every hour by its compaction; storage_size_queries.*)."),
) -> None:
    """Bytes on disk per 6-byte frame: SQLite (the server's schema vs compact rows vs packed camera-hours) and,
    with --pg, PostgreSQL (the cluster schema vs packed camera-hours)."""
    from taskcodec.bench.storage_size import markdown, run, run_pg, run_scale

    if queries_at_scale:
        run_scale(frames, cameras, out, sqlite=sqlite, pg=pg, log=typer.echo)
        return
    if sqlite:
        typer.echo(markdown(run(frames, cameras, out, log=typer.echo)))
    if pg:
        run_pg(frames, cameras, out, log=typer.echo)


@bench_app.command("temporal")
def temporal(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
    frames: int = typer.Option(1500, "--frames", min=100, help="Frames per video (test, validation, training)."),
    fps: float = typer.Option(5.0, "--fps", help="Scene frame rate of the dwell video."),
    dwell: str = typer.Option("1-3", "--dwell", help="Dwell time range in seconds (1-3: mean 2 s)."),
    key_interval: List[int] = typer.Option([50, 200], "--key-interval", min=1,
                                           help="Key intervals to try (a key frame at least every N frames)."),
    same_l1: List[int] = typer.Option([0, 4, 8, 9, 10, 11, 12, 16], "--same-l1", help="SAME thresholds to try."),
    budget: List[float] = typer.Option([10, 20, 30, 50, 100], "--budget-bps", help="Budgets (bit/s per camera)."),
    crf: List[int] = typer.Option([36, 42, 48, 51], "--crf", help="H.264 CRFs."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for temporal.{json,md,png}."),
) -> None:
    """Temporal vs independent coding vs H.264 on the dwell video, and accuracy against a bandwidth budget."""
    from taskcodec.bench.temporal import markdown, run

    typer.echo(markdown(run(bundle, frames, fps, dwell, key_interval, same_l1, budget, crf, out, log=typer.echo)))


def register(app: typer.Typer) -> None:
    import taskcodec.bench.transfer_cli  # noqa: F401  (adds its commands to the `frozen` group)
    from taskcodec.bench.cluster_scale import command as cluster_scale  # issue 12: 10k cameras for minutes

    bench_app.command("cluster-scale")(cluster_scale)

    app.add_typer(bench_app, name="bench")
