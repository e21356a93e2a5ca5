"""`taskcodec cluster …`: the scale-out mode's processes and its local development cluster."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import List, Optional

import typer

cluster_app = typer.Typer(help="Scale-out mode: NATS JetStream ingest log + PostgreSQL store, stateless gateways "
                               "and workers.", no_args_is_help=True)

NATS = typer.Option(..., "--nats", help="NATS server URLs, comma-separated (nats://127.0.0.1:4222,…)")
PG = typer.Option(..., "--pg", help="PostgreSQL connection string (host=… port=… user=… dbname=…)", envvar="TASKCODEC_PG")
BUNDLES = typer.Option(..., "--bundle", help="model bundle folder(s) served (repeatable)")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(2)


def _bundles(paths: list[Path]):
    from taskcodec.bundle import BundleError, load_bundle

    try:
        return [load_bundle(p) for p in paths]
    except BundleError as exc:
        _fail(str(exc))


def _run_until_signal(coro_factory) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    try:  # uvloop (libuv) where installed: a cheaper event loop for many small messages
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


@cluster_app.command()
def gateway(nats: str = NATS, pg: str = PG, bundle: List[Path] = BUNDLES,
            host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8100, "--port"),
            port_file: Optional[Path] = typer.Option(None, "--port-file", help="write the bound port here")) -> None:
    """A camera-facing gateway: wire protocol in, JetStream out (acks after a replicated store)."""
    from taskcodec.server.cluster.gateway import run_gateway

    tags = {b.model_tag for b in _bundles(bundle)}
    _run_until_signal(lambda stop: run_gateway(nats.split(","), pg, tags, host, port,
                                               str(port_file) if port_file else None, stop))


@cluster_app.command()
def worker(nats: str = NATS, pg: str = PG, bundle: List[Path] = BUNDLES,
           ready_file: Optional[Path] = typer.Option(None, "--ready-file", help="touch this once consuming"),
           compact_interval_s: float = typer.Option(300.0, min=0, help="pack closed camera-hours into blocks this "
                                                    "often (0: this worker never compacts)"),
           compact_settle_s: float = typer.Option(600.0, help="pack only hours closed at least this long ago")) -> None:
    """A decode/classify worker: JetStream durable pull consumer -> PostgreSQL (insert-or-ignore)."""
    from taskcodec.server.cluster.worker import run_worker

    loaded = _bundles(bundle)
    _run_until_signal(lambda stop: run_worker(nats.split(","), pg, loaded, stop, str(ready_file) if ready_file else None,
                                              compact_interval_s, compact_settle_s))


@cluster_app.command()
def migrate(pg: str = PG) -> None:
    """Create or upgrade the PostgreSQL schema."""
    from taskcodec.server.cluster.pgstore import PgStoreError, migrate as run

    try:
        typer.echo(f"schema version {run(pg)}")
    except PgStoreError as exc:
        _fail(str(exc))


@cluster_app.command()
def retention(days: int = typer.Option(..., "--days", min=1, help="keep this many days of frames"), pg: str = PG) -> None:
    """Drop whole day partitions of frames older than --days (the hourly class counts are kept)."""
    import datetime as dt

    from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

    try:
        store = PgStore(pg)
    except PgStoreError as exc:
        _fail(str(exc))
    cutoff = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=days)
    dropped = store.drop_partitions_before(cutoff)
    store.close()
    typer.echo(f"dropped {len(dropped)} partition(s) before {cutoff}: {', '.join(dropped) or '-'}")


@cluster_app.command()
def compact(pg: str = PG, older_than_s: float = typer.Option(600.0, "--older-than-s", help="pack capture hours "
                                                              "that ended before now - this")) -> None:
    """Pack closed camera-hours of frames into compressed blocks (workers do it every few minutes)."""
    from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

    try:
        store = PgStore(pg)
    except PgStoreError as exc:
        _fail(str(exc))
    r = store.compact(settle_s=older_than_s)
    store.close()
    typer.echo(f"packed {r['frames']} frames of {r['cameras']} cameras ({r['blocks_written']} blocks written, "
               f"capture hours before {r['cutoff_ms']} ms) in {r['seconds']:.1f} s")


@cluster_app.command("add-camera")
def add_camera(camera_id: str, pg: str = PG) -> None:
    """Register a camera in the cluster's PostgreSQL; prints its token once."""
    from taskcodec.server.auth import AuthError, add_camera as add
    from taskcodec.server.cluster.pgstore import PgStore, PgStoreError

    try:
        store = PgStore(pg)
        typer.echo(add(store, camera_id))
        store.close()
    except (AuthError, PgStoreError) as exc:
        _fail(str(exc))


@cluster_app.command()
def up(bundle: List[Path] = typer.Option([], "--bundle", help="bundle(s) (default: the embedded one)"),
       gateways: int = typer.Option(1, min=1), workers: int = typer.Option(2, min=1),
       folder: Optional[Path] = typer.Option(None, "--dir", help="keep the cluster's data here (default: a temp dir)")
       ) -> None:
    """Start a local cluster (3 JetStream nodes R3, PostgreSQL, gateways, workers) until Ctrl-C, then tear it down."""
    import time

    from taskcodec.bundle import load_bundle
    from taskcodec.server.cluster.local import ClusterError, LocalCluster

    paths = bundle or [load_bundle(None).path]
    try:
        with LocalCluster(paths, gateways=gateways, workers=workers, folder=folder) as c:
            typer.echo(f"NATS {','.join(c.nats_urls)}\nPostgreSQL {c.pg_dsn}")
            for i in range(gateways):
                typer.echo(f"gateway {i}: {c.gateway_url(i)}")
            typer.echo(f"MQTT (cameras publish QoS 1 to taskcodec/v1/ingest/<camera>; see `taskcodec mqtt-capture`): "
                       f"{', '.join(c.mqtt_url(i) for i in range(c.n_nats))}")
            typer.echo("add cameras with: taskcodec cluster add-camera ID --pg '<PostgreSQL above>'; Ctrl-C stops")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                typer.echo("stopping")
    except ClusterError as exc:
        _fail(str(exc))


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
