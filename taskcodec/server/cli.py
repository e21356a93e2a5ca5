"""`taskcodec serve`, `taskcodec cameras add/list/remove/rotate`, `taskcodec operators`, `taskcodec db`. Heavy imports (fastapi, uvicorn, onnxruntime) happen
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


def _storage(db: Path, **kwargs):
    from taskcodec.server.storage import SQLiteStorage, StorageError

    try:
        return SQLiteStorage(db, **kwargs)
    except StorageError as exc:
        _fail(str(exc))


db_app = typer.Typer(help="The server database: schema migration and integrity check.", no_args_is_help=True)


@db_app.command("migrate")
def db_migrate(db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Bring the database schema to this version (PRAGMA user_version); `serve` also does it at start."""
    from taskcodec.server.storage import SCHEMA_VERSION

    import sqlite3

    if not db.is_file():
        _fail(f"no database {db}")
    before = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    storage = _storage(db, migrate=True)
    storage.close()
    typer.echo(f"{db}: schema version {before} -> {SCHEMA_VERSION}" if before != SCHEMA_VERSION
               else f"{db}: schema version {SCHEMA_VERSION}, up to date")


@db_app.command("check")
def db_check(db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """PRAGMA quick_check; exit 2 with the findings on a damaged database."""
    if not db.is_file():
        _fail(f"no database {db}")
    storage = _storage(db, migrate=False, check=True)
    storage.close()
    typer.echo(f"{db}: ok")


@db_app.command("retention")
def db_retention(days: float = typer.Option(..., "--days", min=0.0, help="Delete frames captured more than this many "
                                            "days ago"),
                 db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Retention by age: delete frames captured before now - DAYS (in short transactions; safe while `serve`
    runs). Run it periodically (cron / systemd timer); freed pages are reused for new frames."""
    import time

    if not db.is_file():
        _fail(f"no database {db}")
    storage = _storage(db)
    cutoff = int((time.time() - days * 86400) * 1000)
    n = storage.delete_before(cutoff)
    storage.close()
    typer.echo(f"{db}: deleted {n} frames captured before {cutoff} ms ({days:g} days)")


@db_app.command("compact")
def db_compact(db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file"),
               older_than_s: float = typer.Option(600.0, "--older-than-s", min=0.0, help="pack frames stored before "
                                                  "now - this (rounded down to the hour unless --no-align)"),
               align: bool = typer.Option(True, "--align/--no-align", help="round the cutoff down to the hour")
               ) -> None:
    """Pack closed camera-hours of frames into compressed blocks (what `serve` does in the background every few
    minutes; safe while it runs). Readers see packed and recent frames alike."""
    if not db.is_file():
        _fail(f"no database {db}")
    storage = _storage(db)
    r = storage.compact(settle_s=older_than_s, align_hour=align)
    storage.close()
    typer.echo(f"{db}: packed {r['frames']} frames of {r['cameras']} cameras ({r['blocks_written']} blocks written, "
               f"stored before {r['cutoff_ms']} ms) in {r['seconds']:.1f} s")


@cameras_app.command("add")
def cameras_add(camera_id: str = typer.Argument(..., help="Camera id, 1-128 of A-Z a-z 0-9 . _ : -"),
                db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file"),
                group: Optional[str] = typer.Option(None, "--group", help="Put it in this group (model rollouts "
                                                    "address groups; see taskcodec models assign)")) -> None:
    """Register a camera and print its token ONCE (only a salted hash is stored)."""
    from taskcodec.server.auth import AuthError, add_camera
    from taskcodec.server.storage import StorageError

    storage = _storage(db)
    try:
        token = add_camera(storage, camera_id)
    except (AuthError, StorageError) as exc:
        _fail(str(exc))
    if group:
        from taskcodec.server.registry import Registry

        Registry(db).set_group(camera_id, group)
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
    """Revoke a camera's token (its stored frames are kept). Its open sessions on a running server end within
    seconds (every batch re-checks the token in its transaction; idle sessions every few seconds)."""
    if not _storage(db).remove_camera(camera_id):
        _fail(f"no camera {camera_id!r} in {db}")
    typer.echo(f"camera {camera_id!r} removed")


@cameras_app.command("rotate")
def cameras_rotate(camera_id: str, db: Path = typer.Option(DEFAULT_DB, "--db", help="SQLite database file")) -> None:
    """Give a camera a new token, printed ONCE; the old token stops working and its open sessions end."""
    from taskcodec.server.auth import AuthError, rotate_camera
    from taskcodec.server.storage import StorageError

    try:
        token = rotate_camera(_storage(db), camera_id)
    except (AuthError, StorageError) as exc:
        _fail(str(exc))
    typer.echo(token)
    typer.secho(f"camera {camera_id!r}: new token; store it now, it is not shown again (the old one no longer works)",
                err=True)


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
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML server configuration (see "
                                               "taskcodec/server/config.py); flags given here override it"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Model bundle folder (default: the embedded one)"),
    db: Optional[Path] = typer.Option(None, "--db", help=f"SQLite database file (created 0600 if missing; default "
                                      f"{DEFAULT_DB})"),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (default 8000); 0 picks a free one (see "
                                       "--port-file)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Server processes sharing the port and the database"),
    port_file: Optional[Path] = typer.Option(None, "--port-file", help="Write the bound port here once listening"),
    microbatch: Optional[bool] = typer.Option(None, "--microbatch/--no-microbatch",
                                              help="Batch decode/classify/commit across connections (default on)"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="critical|error|warning|info|debug"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate chain: serve https:// and "
                                            "wss:// (with --tls-key)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key; its password, if any, from "
                                           "TASKCODEC_TLS_KEY_PASSWORD or tls.key_password_file in --config"),
    ws_ping_interval: Optional[float] = typer.Option(
        None, "--ws-ping-interval", min=0.0,
        help="Seconds between server keepalive pings (0: none; default 120). Cameras ping every 60 s and acks prove "
             "liveness while frames flow, so the server pings rarely: each ping costs ~4 packets on a link of a few "
             "bytes per frame"),
) -> None:
    """Run the ingest server (WebSocket /v1/stream, POST /v1/ingest, queries, /healthz, /metrics)."""
    from taskcodec.server.config import ConfigError, build_config

    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    overrides = {"bundle": bundle, "db": db, "host": host, "port": port, "workers": workers, "port_file": port_file,
                 "microbatch": microbatch, "log_level": log_level, "ws_ping_interval": ws_ping_interval,
                 "tls.cert": tls_cert, "tls.key": tls_key}
    try:
        config = build_config(config_file, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    run_server(config)


def configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if level == "trace" else getattr(logging, level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_server(config) -> None:
    """Serve ``config`` (a ServerConfig) until SIGINT/SIGTERM."""
    import json

    import uvicorn

    from taskcodec.server.app import create_app
    from taskcodec.server.config import ConfigError
    from taskcodec.server.limits import GuardedH11Protocol, GuardedWebSocketProtocol

    try:  # /v1/stream on picows, on the same port (server/stream.py routes by request line)
        from taskcodec.server.stream import FrontProtocol as http_protocol
    except ImportError:
        http_protocol = GuardedH11Protocol
    from taskcodec.server.storage import StorageError
    from taskcodec.bundle import BundleError, load_bundle

    configure_logging(config.log_level)
    try:
        loaded = load_bundle(config.bundle)
        # fails early, in this process, on a bad db path, a damaged or too new database; migrates an old one
        app = create_app(loaded, config=config)
    except (BundleError, StorageError, ConfigError) as exc:  # ConfigError: e.g. TASKCODEC_EVENTS_* (events.py)
        _fail(str(exc))
    tls = {}
    if config.tls is not None:
        import ssl

        try:
            password = config.tls.key_password()
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.tls.cert, config.tls.key,
                                                                                  password)
        except (OSError, ssl.SSLError) as exc:
            _fail(f"cannot use TLS certificate {config.tls.cert} / key {config.tls.key}: {exc}")
        tls = dict(ssl_certfile=str(config.tls.cert), ssl_keyfile=str(config.tls.key), ssl_keyfile_password=password)
    host, port = config.host, config.port
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
    typer.secho(f"taskcodec server: model {loaded.model_id}, db {config.db}, {config.scheme}://{host}:{bound} "
                f"({config.workers} worker(s))", err=True)
    extra = {"loop": "uvloop"} if _has("uvloop") else {}
    ping = config.ws_ping_interval or None
    limits = config.limits
    # The first WebSocket message is bounded by limits.max_hello_bytes in GuardedWebSocketProtocol (raised to
    # ws_max_size after authentication); h11 bounds request heads to 16 KiB; GuardedH11Protocol times them out.
    common = dict(log_level=config.log_level, access_log=False, ws_max_size=limits.max_message_bytes,
                  ws=GuardedWebSocketProtocol, http=http_protocol, ws_ping_interval=ping, ws_ping_timeout=ping,
                  # no permessage-deflate: payloads are a few bytes of range-coded data; compressing costs CPU
                  ws_per_message_deflate=False,
                  timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
                  h11_max_incomplete_event_size=16 << 10, log_config=None, **tls, **extra)
    if config.workers == 1:
        uconfig = uvicorn.Config(app, **common)
        uconfig.taskcodec_limits = limits
        server = uvicorn.Server(uconfig)
        if config.port_file:
            _write_port_file(config.port_file, bound)
        server.run(sockets=[sock])
        return
    from uvicorn.supervisors import Multiprocess

    os.environ["TASKCODEC_SERVER_CONFIG"] = json.dumps(config.model_dump(mode="json"))
    uconfig = uvicorn.Config("taskcodec.server.app_env:app", factory=True, workers=config.workers, **common)
    uconfig.taskcodec_limits = limits
    if config.port_file:
        _write_port_file(config.port_file, bound)
    Multiprocess(uconfig, sockets=[sock]).run()


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
    app.add_typer(db_app, name="db")
