"""`taskcodec serve` and `taskcodec cameras add/list/remove`. Heavy imports (fastapi, uvicorn, onnxruntime) happen
inside the commands so `taskcodec --help` stays fast."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import typer

DEFAULT_DB = Path("taskcodec-server.db")

cameras_app = typer.Typer(help="Register, list and remove cameras allowed to upload.", no_args_is_help=True)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _storage(db: Path):
    from taskcodec.server.storage import SQLiteStorage, StorageError

    try:
        return SQLiteStorage(db)
    except StorageError as exc:
        _fail(str(exc))


@cameras_app.command("add")
def cameras_add(camera_id: str = typer.Argument(..., help="Camera id, 1-128 of A-Z a-z 0-9 . _ : -"),
                db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Register a camera and print its token ONCE (only a salted hash is stored)."""
    from taskcodec.server.auth import AuthError, add_camera
    from taskcodec.server.storage import StorageError

    storage = _storage(db)
    try:
        token = add_camera(storage, camera_id)
    except (AuthError, StorageError) as exc:
        _fail(str(exc))
    typer.echo(token)
    typer.secho(f"camera {camera_id!r} added; store this token now, it is not shown again", err=True)


@cameras_app.command("list")
def cameras_list(db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """List registered cameras with their frame counts."""
    from datetime import datetime, timezone

    storage = _storage(db)
    counts = storage.frame_counts()
    for cam in storage.list_cameras():
        created = datetime.fromtimestamp(cam.created / 1000, timezone.utc).isoformat(timespec="seconds")
        typer.echo(f"{cam.id}\tcreated {created}\t{counts.get(cam.id, 0)} frames")


@cameras_app.command("remove")
def cameras_remove(camera_id: str, db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Revoke a camera's token (its stored frames are kept)."""
    if not _storage(db).remove_camera(camera_id):
        _fail(f"no camera {camera_id!r} in {db}")
    typer.echo(f"camera {camera_id!r} removed")


operators_app = typer.Typer(help="Operator API keys for the query API, dashboard and /metrics (scopes: "
                                 "metrics < read < admin).", no_args_is_help=True)


@operators_app.command("add")
def operators_add(name: str = typer.Argument(..., help="Operator name, 1-64 of A-Z a-z 0-9 . _ : @ -"),
                  scope: str = typer.Option(..., "--scope", help="metrics (scrape /metrics), read, or admin"),
                  db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Create an operator API key and print it ONCE (only its hash is stored). Send it as Authorization: Bearer KEY."""
    from taskcodec.server.auth import AuthError, add_operator
    from taskcodec.server.storage import StorageError

    storage = _storage(db)
    try:
        key = add_operator(storage, name, scope)
    except (AuthError, StorageError) as exc:
        _fail(str(exc))
    typer.echo(key)
    typer.secho(f"operator {name!r} ({scope}) added; store this key now, it is not shown again", err=True)


@operators_app.command("list")
def operators_list(db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """List operators and their scopes (never their keys)."""
    from datetime import datetime, timezone

    for op in _storage(db).list_operators():
        created = datetime.fromtimestamp(op.created / 1000, timezone.utc).isoformat(timespec="seconds")
        typer.echo(f"{op.name}\t{op.scope}\tcreated {created}")


@operators_app.command("remove")
def operators_remove(name: str, db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Revoke an operator's key."""
    if not _storage(db).remove_operator(name):
        _fail(f"no operator {name!r} in {db}")
    typer.echo(f"operator {name!r} removed")


def serve(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Model bundle folder (default: the embedded one)"),
    db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file (created if missing)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one (see --port-file)"),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes sharing the port and the database"),
    port_file: Optional[Path] = typer.Option(None, "--port-file", help="Write the bound port here once listening"),
    microbatch: bool = typer.Option(True, "--microbatch/--no-microbatch",
                                    help="Batch decode/classify/commit across connections"),
    log_level: str = typer.Option("warning", "--log-level"),
    ws: str = typer.Option("auto", "--ws",
                           help="uvicorn WebSocket implementation: auto, websockets, websockets-sansio, wsproto"),
    ws_ping_interval: float = typer.Option(
        120.0, "--ws-ping-interval", min=0.0,
        help="Seconds between server keepalive pings (0: none). Cameras ping every 60 s and acks prove liveness while "
             "frames flow, so the server pings rarely: each ping costs ~4 packets on a link of a few bytes per frame"),
) -> None:
    """Run the ingest server (WebSocket /v1/stream, POST /v1/ingest, queries, /healthz, /metrics)."""
    import uvicorn

    from taskcodec.server.app import create_app
    from taskcodec.server.storage import StorageError
    from taskcodec.bundle import BundleError, load_bundle

    try:
        loaded = load_bundle(bundle)
        app = create_app(loaded, db, microbatch=microbatch)  # fails early on a bad db path, in this process
    except (BundleError, StorageError) as exc:
        _fail(str(exc))
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it Nagle + delayed ACKs add 40 ms to every reply.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc}")
    sock.listen(2048)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    typer.secho(f"taskcodec server: model {loaded.model_id}, db {db}, http://{host}:{bound} ({workers} worker(s))",
                err=True)
    extra = {"loop": "uvloop"} if _has("uvloop") else {}
    if _has("httptools"):
        extra["http"] = "httptools"
    ping = ws_ping_interval or None
    common = dict(log_level=log_level, access_log=False, ws_max_size=64 << 20, ws=ws, ws_ping_interval=ping,
                  ws_ping_timeout=ping, **extra)
    if workers == 1:
        server = uvicorn.Server(uvicorn.Config(app, **common))
        if port_file:
            _write_port_file(port_file, bound)
        server.run(sockets=[sock])
        return
    from uvicorn.supervisors import Multiprocess

    os.environ.update(TASKCODEC_SERVER_BUNDLE=str(loaded.path), TASKCODEC_SERVER_DB=str(db),
                      TASKCODEC_SERVER_MICROBATCH="1" if microbatch else "0")
    config = uvicorn.Config("taskcodec.server.app_env:app", factory=True, workers=workers, **common)
    if port_file:
        _write_port_file(port_file, bound)
    Multiprocess(config, sockets=[sock]).run()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)  # atomic: a reader never sees a half-written port


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(cameras_app, name="cameras")
    app.add_typer(operators_app, name="operators")
