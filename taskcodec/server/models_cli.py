"""`taskcodec models add|list|remove|assign|rollback|status|keygen|sign` and `taskcodec cameras set-group` (issue 13:
model registry and over-the-air rollout; server/registry.py does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from taskcodec.server.cli import DEFAULT_DB, _fail, _storage, cameras_app

models_app = typer.Typer(help="The server's model registry and over-the-air rollout to cameras.",
                         no_args_is_help=True)
DB = typer.Option(DEFAULT_DB, "--db", help="SQLite database file (the registry folder is next to it)")


def _registry(db: Path):
    from taskcodec.server.registry import Registry

    _storage(db).close()  # creates / migrates the schema like `serve` would; refuses a damaged or too new file
    return Registry(db)


def _when(ms: int | None) -> str:
    from datetime import datetime, timezone

    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


@models_app.command("add")
def models_add(bundle: Path = typer.Argument(..., help="Bundle folder"), db: Path = DB) -> None:
    """Verify a bundle (schema, every file's sha256, model id, golden vectors on this machine) and copy it into the
    registry. A running server picks it up when a camera first names it."""
    from taskcodec.server.registry import RegistryError

    try:
        record, new = _registry(db).add(bundle)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(f"{record.id}\t{record.name}\t{'signed' if record.signed else 'UNSIGNED'}\t"
               f"{'added' if new else 'already registered'}\t{record.folder}")
    if not record.signed:
        typer.secho("warning: the bundle is not signed; cameras refuse unsigned bundles (taskcodec models sign "
                    "BUNDLE --key KEY, then add it again)", err=True, fg="yellow")


@models_app.command("list")
def models_list(db: Path = DB) -> None:
    """Registered models: id, name, signed, golden vectors, when added, folder."""
    for r in _registry(db).list():
        typer.echo(f"{r.id}\t{r.name}\t{'signed' if r.signed else 'unsigned'}\t"
                   f"{'golden' if r.golden else 'no-golden'}\t{_when(r.added)}\t{r.folder}")


@models_app.command("remove")
def models_remove(model_id: str, db: Path = DB) -> None:
    """Remove a model no camera is assigned to or runs and no stored frame references (refused otherwise)."""
    from taskcodec.server.registry import RegistryError

    try:
        _registry(db).remove(model_id)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(f"model {model_id} removed")


@models_app.command("assign")
def models_assign(model_id: str = typer.Argument(..., help="A registered model id"),
                  camera: Optional[str] = typer.Option(None, "--camera", help="One camera"),
                  group: Optional[str] = typer.Option(None, "--group", help="A camera group"),
                  canary: float = typer.Option(1.0, "--canary", help="Share of the group's cameras (0 < share <= 1) "
                                               "that get it; the rest keep their previous assignment"),
                  db: Path = DB) -> None:
    """Assign a model to a camera or a group; cameras pick it up at their next assignment poll."""
    from taskcodec.server.registry import RegistryError

    reg = _registry(db)
    try:
        a = reg.assign(model_id, camera=camera, group=group, canary=canary)
    except RegistryError as exc:
        _fail(str(exc))
    now = [c for c, (m, _) in reg.resolve_all(None).items() if m == model_id]
    typer.echo(f"assignment {a.id}: {a.kind} {a.target} -> {a.model_id}"
               + (f" (canary {a.canary:g})" if a.canary < 1 else "") + f"; cameras now assigned to it: "
               f"{', '.join(now) or 'none'}")


@models_app.command("rollback")
def models_rollback(camera: Optional[str] = typer.Option(None, "--camera"),
                    group: Optional[str] = typer.Option(None, "--group"), db: Path = DB) -> None:
    """Undo the newest active assignment of a group (or camera): its previous assignment applies again."""
    from taskcodec.server.registry import RegistryError

    if (camera is None) == (group is None):
        _fail("give exactly one of --camera or --group")
    reg = _registry(db)
    try:
        a = reg.rollback(camera=camera, group=group)
    except RegistryError as exc:
        _fail(str(exc))
    typer.echo(f"rolled back assignment {a.id} ({a.kind} {a.target} -> {a.model_id})")


@models_app.command("status")
def models_status(db: Path = DB, as_json: bool = typer.Option(False, "--json", help="JSON instead of a table")) -> None:
    """Per camera: group, assigned model, what it runs and its last rollout report (a refusal shows its reason)."""
    import json

    rows = _registry(db).overview(None)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo("\t".join([r["camera_id"], f"group={r['group'] or '-'}",
                              f"assigned={r['assigned_model_id'] or '(server default)'} ({r['assigned_by']})",
                              f"running={r['running_model_id'] or '?'}", f"state={r['state'] or '-'}",
                              f"updated={_when(r['updated_ms'])}"] + ([f"reason={r['reason']}"] if r["reason"] else [])))


@models_app.command("keygen")
def models_keygen(key: Path = typer.Argument(..., help="Private key file to create (PEM, 0600); the public key "
                                             "goes to KEY.pub")) -> None:
    """Make an operator Ed25519 signing key. Give KEY.pub to cameras (runtime capture --trusted-key KEY.pub)."""
    from taskcodec.bundle import generate_signing_key

    try:
        private, public = generate_signing_key(key)
    except FileExistsError:
        _fail(f"{key} exists; not overwriting a key")
    typer.echo(f"private key {private} (keep it offline), public key {public}")


@models_app.command("sign")
def models_sign(bundle: Path = typer.Argument(..., help="Bundle folder"),
                key: Path = typer.Option(..., "--key", help="Ed25519 private key (taskcodec models keygen)")) -> None:
    """Sign a bundle's manifest (which names every file's sha256): writes BUNDLE/manifest.sig."""
    from taskcodec.bundle import BundleError, sign_bundle

    try:
        sig = sign_bundle(bundle, key)
    except BundleError as exc:
        _fail(str(exc))
    typer.echo(f"{bundle}/manifest.sig: ed25519 key {sig['key_id']}")


def cameras_set_group(camera_id: str, group: str = typer.Option(..., "--group", help="Group name ('' to leave "
                                                                 "every group)"), db: Path = DB) -> None:
    """Put a camera in a group (rollouts address groups: taskcodec models assign MODEL --group NAME)."""
    storage = _storage(db)
    known = storage.get_camera(camera_id) is not None
    storage.close()
    if not known:
        _fail(f"no camera {camera_id!r} in {db}")
    _registry(db).set_group(camera_id, group or None)
    typer.echo(f"camera {camera_id!r} in group {group!r}" if group else f"camera {camera_id!r} in no group")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    cameras_app.command("set-group")(cameras_set_group)
