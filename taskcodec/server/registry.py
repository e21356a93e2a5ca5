"""The model registry and over-the-air rollout (issue 13 items 1 and 2), server side.

Bundles live in a registry folder next to the database (``<db>.models/<model id>/``), recorded in the ``models``
table. A bundle is added once (`taskcodec models add BUNDLE`, or implicitly by `taskcodec serve --bundle B`), verified
on the way in (schema and per-file sha256 from its manifest via ``load_bundle``, the model id recomputed from the
encoder and tables, and its golden vectors re-run on this machine), and kept while a camera is assigned to it or runs
it, or stored frames reference it (`models remove` refuses otherwise).

The ingest service holds one decoder + classifier per model in use (``IngestService.models``: model tag -> served
model, a dict lookup per HELLO); a model added while the server runs is loaded from the registry the first time a
camera's HELLO names it.

Rollout: cameras belong to groups (``camera_groups``); an assignment names a model for one camera or a group, with a
canary share (the first ``round(share * n)`` members of the group, ranked by sha256(model id, camera id), so the
canary set is stable and does not depend on the order cameras were added). A camera's assignment is its newest active
camera assignment, else the newest active group assignment whose canary includes it, else the server's default model
(`serve --bundle`). `models rollback --group G` deactivates the group's newest assignment (the previous one applies
again). Cameras poll ``GET /v1/cameras/ID/assignment``, download ``GET /v1/models/ID/files/NAME`` (both with the
camera's own token: ``Authorization: Bearer TOKEN``, ``X-Camera-Id: ID`` on the file route), verify, switch, and
report ``POST /v1/cameras/ID/assignment/status`` ({model_id, state, reason, running_model_id}); `taskcodec models
status` and ``GET /v1/rollout`` show those reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Body, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from taskcodec.server.auth import authenticate_camera, require_operator, unauthorized
from taskcodec.server.storage import model_has_frames
from taskcodec.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, check_golden, compute_model_id, load_bundle

log = logging.getLogger("taskcodec.server.registry")
STATES = ("downloading", "verifying", "running", "refused")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (the message says why)."""


def registry_dir(db: str | Path) -> Path:
    db = Path(db)
    return db.with_name(db.name + ".models")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ModelRecord:
    id: str
    name: str
    folder: str
    signed: bool
    golden: bool
    added: int


@dataclass(frozen=True)
class Assignment:
    id: int
    kind: str          # "camera" | "group"
    target: str
    model_id: str
    canary: float
    created: int
    active: bool


@dataclass(frozen=True)
class RolloutStatus:
    camera_id: str
    model_id: str
    running_model_id: str | None
    state: str
    reason: str
    updated: int


def _canary_rank(model_id: str, camera_id: str) -> str:
    return hashlib.sha256(f"{model_id}:{camera_id}".encode()).hexdigest()


class Registry:
    """The registry of one server database. Short-lived connections of its own (WAL: readers never block the ingest
    writer; its rare writes wait on SQLite's busy timeout)."""

    def __init__(self, db: str | Path):
        self.db = Path(db).absolute()
        self.dir = registry_dir(self.db)

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self._conn()
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def _write(self, *statements: tuple[str, tuple]) -> int:
        conn = self._conn()
        try:
            with conn:
                n = 0
                for sql, args in statements:
                    n += conn.execute(sql, args).rowcount
                return n
        finally:
            conn.close()

    # models ------------------------------------------------------------------------------------------------------
    def add(self, src: str | Path, *, require_golden: bool = True) -> tuple[ModelRecord, bool]:
        """Verify a bundle folder and copy it into the registry; (record, True if it was new)."""
        try:
            bundle = load_bundle(src)  # schema, typed manifest, every file's sha256
            computed = compute_model_id(bundle.file("encoder"), bundle.file("tables"))
        except BundleError as exc:
            raise RegistryError(f"bundle {src} refused: {exc}") from None
        if computed != bundle.model_id:
            raise RegistryError(f"bundle {src} refused: its manifest says model id {bundle.model_id}, its encoder "
                                f"and tables hash to {computed}")
        golden = bundle.has("golden")
        existing = self.get(bundle.model_id)
        dest = self.dir / bundle.model_id
        signed = (bundle.path / SIGNATURE).is_file()
        if (golden or require_golden) and (existing is None or not dest.is_dir()):  # once, on the way in
            problem = check_golden(bundle)
            if problem is not None:
                raise RegistryError(f"bundle {src} refused: golden vectors: {problem}")
        if existing is not None and dest.is_dir():
            if signed and not (dest / SIGNATURE).is_file():  # a signature added later travels too
                shutil.copyfile(bundle.path / SIGNATURE, dest / SIGNATURE)
                self._write(("UPDATE models SET signed = 1 WHERE id = ?", (bundle.model_id,)))
                existing = self.get(bundle.model_id)
            return existing, False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not dest.is_dir():
            tmp = self.dir / f".{bundle.model_id}.{uuid.uuid4().hex}.tmp"
            tmp.mkdir()
            try:
                for name in [MANIFEST, *bundle.manifest["files"].values()] + ([SIGNATURE] if signed else []):
                    shutil.copyfile(bundle.path / name, tmp / name)
                load_bundle(tmp)  # the copy is what cameras will download: check it as well
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not dest.is_dir():  # another process (a second worker) won the race: fine
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        self._write(("INSERT OR IGNORE INTO models (id, name, folder, signed, golden, added) VALUES (?, ?, ?, ?, ?, ?)",
                     (bundle.model_id, bundle.manifest.get("name", ""), str(dest), int(signed), int(golden),
                      _now_ms())))
        log.info("event=model_added " + f"model={bundle.model_id} name={bundle.manifest.get('name', '')!r} "
                 f"signed={signed} golden={golden}")
        return self.get(bundle.model_id), True

    def get(self, model_id: str) -> ModelRecord | None:
        rows = self._query("SELECT id, name, folder, signed, golden, added FROM models WHERE id = ?", (model_id,))
        return ModelRecord(rows[0][0], rows[0][1], rows[0][2], bool(rows[0][3]), bool(rows[0][4]), rows[0][5]) \
            if rows else None

    def list(self) -> list[ModelRecord]:
        return [ModelRecord(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5]) for r in
                self._query("SELECT id, name, folder, signed, golden, added FROM models ORDER BY added, id")]

    def load(self, model_id: str) -> Bundle | None:
        """The registered bundle (verified again: sha256 of every file), None if not registered."""
        record = self.get(model_id)
        if record is None:
            return None
        return load_bundle(record.folder)

    def users(self, model_id: str, default_model_id: str | None = None) -> list[str]:
        """Why a model must be kept: cameras assigned to it or running it, stored frames that reference it."""
        why = []
        assigned = [c for c, (m, _) in self.resolve_all(default_model_id).items() if m == model_id]
        if assigned:
            why.append(f"assigned to camera(s) {', '.join(sorted(assigned))}")
        direct = self._query("SELECT DISTINCT kind || ' ' || target FROM assignments WHERE active = 1 AND model_id = ?",
                             (model_id,))
        if direct:
            why.append(f"active assignment(s): {', '.join(r[0] for r in direct)}")
        running = self._query("SELECT camera_id FROM rollout_status WHERE running_model_id = ?", (model_id,))
        if running:
            why.append(f"running on camera(s) {', '.join(r[0] for r in running)}")
        conn = self._conn()
        try:
            referenced = model_has_frames(conn, model_id)  # recent rows and packed blocks (storage's reader API)
        finally:
            conn.close()
        if referenced:
            why.append("stored frames reference it")
        return why

    def remove(self, model_id: str, default_model_id: str | None = None) -> None:
        if self.get(model_id) is None:
            raise RegistryError(f"no model {model_id} in the registry")
        why = self.users(model_id, default_model_id)
        if why:
            raise RegistryError(f"model {model_id} is still needed: {'; '.join(why)}")
        self._write(("DELETE FROM models WHERE id = ?", (model_id,)))
        shutil.rmtree(self.dir / model_id, ignore_errors=True)

    def file(self, model_id: str, name: str) -> Path | None:
        """A file cameras may download: the manifest, its signature or a file the manifest names."""
        record = self.get(model_id)
        if record is None:
            return None
        folder = Path(record.folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        allowed = {MANIFEST, SIGNATURE, *manifest.get("files", {}).values()}
        path = folder / name
        return path if name in allowed and path.is_file() else None

    # groups ------------------------------------------------------------------------------------------------------
    def set_group(self, camera_id: str, group: str | None) -> None:
        if group:
            self._write(("INSERT INTO camera_groups (camera_id, group_name) VALUES (?, ?) ON CONFLICT (camera_id) "
                         "DO UPDATE SET group_name = excluded.group_name", (camera_id, group)))
        else:
            self._write(("DELETE FROM camera_groups WHERE camera_id = ?", (camera_id,)))

    def groups(self) -> dict[str, str]:
        return dict(self._query("SELECT camera_id, group_name FROM camera_groups"))

    # assignments -------------------------------------------------------------------------------------------------
    def assign(self, model_id: str, *, camera: str | None = None, group: str | None = None,
               canary: float = 1.0) -> Assignment:
        if (camera is None) == (group is None):
            raise RegistryError("assign to exactly one of --camera or --group")
        if not 0.0 < canary <= 1.0:
            raise RegistryError(f"canary share must be in (0, 1], got {canary}")
        if camera is not None and canary != 1.0:
            raise RegistryError("--canary applies to a group")
        if self.get(model_id) is None:
            raise RegistryError(f"no model {model_id} in the registry: add it first (taskcodec models add BUNDLE)")
        kind, target = ("camera", camera) if camera is not None else ("group", group)
        if kind == "camera" and not self._query("SELECT 1 FROM cameras WHERE id = ?", (camera,)):
            raise RegistryError(f"no camera {camera!r}")
        if kind == "group" and not self._query("SELECT 1 FROM camera_groups WHERE group_name = ?", (group,)):
            raise RegistryError(f"no camera is in group {group!r} (taskcodec cameras set-group ID --group NAME)")
        self._write(("INSERT INTO assignments (kind, target, model_id, canary, created) VALUES (?, ?, ?, ?, ?)",
                     (kind, target, model_id, float(canary), _now_ms())))
        return self.assignments(kind, target)[0]

    def assignments(self, kind: str | None = None, target: str | None = None,
                    active_only: bool = True) -> list[Assignment]:
        where, args = [], []
        if active_only:
            where.append("active = 1")
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if target is not None:
            where.append("target = ?")
            args.append(target)
        sql = ("SELECT id, kind, target, model_id, canary, created, active FROM assignments"
               + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC")
        return [Assignment(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in self._query(sql, tuple(args))]

    def rollback(self, *, camera: str | None = None, group: str | None = None) -> Assignment:
        """Deactivate the newest active assignment of the camera or group; returns it."""
        kind, target = ("camera", camera) if camera is not None else ("group", group)
        if target is None:
            raise RegistryError("rollback needs --camera or --group")
        active = self.assignments(kind, target)
        if not active:
            raise RegistryError(f"{kind} {target!r} has no active assignment to roll back")
        self._write(("UPDATE assignments SET active = 0 WHERE id = ?", (active[0].id,)))
        return active[0]

    def resolve_all(self, default_model_id: str | None) -> dict[str, tuple[str | None, str]]:
        """camera id -> (assigned model id, why) for every registered camera."""
        cameras = [r[0] for r in self._query("SELECT id FROM cameras ORDER BY id")]
        groups = self.groups()
        members: dict[str, list[str]] = {}
        registered = set(cameras)
        for cam, g in groups.items():
            if cam in registered:
                members.setdefault(g, []).append(cam)
        active = self.assignments()
        out = {}
        for cam in cameras:
            out[cam] = (default_model_id, "default")
            for a in active:  # newest first
                if a.kind == "camera" and a.target == cam:
                    out[cam] = (a.model_id, "camera")
                    break
            else:
                g = groups.get(cam)
                for a in active:
                    if a.kind != "group" or a.target != g:
                        continue
                    ranked = sorted(members.get(g, []), key=lambda c: _canary_rank(a.model_id, c))
                    share = max(1, round(a.canary * len(ranked)))
                    if cam in ranked[:share]:
                        out[cam] = (a.model_id, f"group {g}" + (f" canary {a.canary:g}" if a.canary < 1 else ""))
                        break
        return out

    def resolve(self, camera_id: str, default_model_id: str | None) -> tuple[str | None, str]:
        """One camera's assignment (what a camera's poll costs: its own rows and its group's, not the fleet's)."""
        rows = self._query("SELECT model_id FROM assignments WHERE active = 1 AND kind = 'camera' AND target = ? "
                           "ORDER BY id DESC LIMIT 1", (camera_id,))
        if rows:
            return rows[0][0], "camera"
        group = self._query("SELECT group_name FROM camera_groups WHERE camera_id = ?", (camera_id,))
        if not group:
            return default_model_id, "default"
        g = group[0][0]
        members = [r[0] for r in self._query("SELECT g.camera_id FROM camera_groups g JOIN cameras c ON c.id = "
                                             "g.camera_id WHERE g.group_name = ?", (g,))]
        for a in self.assignments("group", g):  # newest first
            ranked = sorted(members, key=lambda c: _canary_rank(a.model_id, c))
            if camera_id in ranked[:max(1, round(a.canary * len(ranked)))]:
                return a.model_id, f"group {g}" + (f" canary {a.canary:g}" if a.canary < 1 else "")
        return default_model_id, "default"

    # what cameras report -----------------------------------------------------------------------------------------
    def report(self, camera_id: str, model_id: str, state: str, reason: str, running_model_id: str | None) -> None:
        if state not in STATES:
            raise RegistryError(f"state must be one of {', '.join(STATES)}")
        self._write(("INSERT INTO rollout_status (camera_id, model_id, running_model_id, state, reason, updated) "
                     "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (camera_id) DO UPDATE SET model_id = excluded.model_id, "
                     "running_model_id = excluded.running_model_id, state = excluded.state, "
                     "reason = excluded.reason, updated = excluded.updated",
                     (camera_id, model_id, running_model_id, state, reason[:2000], _now_ms())))

    def statuses(self) -> list[RolloutStatus]:
        return [RolloutStatus(*r) for r in self._query(
            "SELECT camera_id, model_id, running_model_id, state, reason, updated FROM rollout_status ORDER BY "
            "camera_id")]

    def overview(self, default_model_id: str | None) -> list[dict[str, Any]]:
        """Per camera: group, assigned model and why, what it runs and its last report (dashboard, `models status`)."""
        groups = self.groups()
        reports = {s.camera_id: s for s in self.statuses()}
        out = []
        for cam, (model, why) in self.resolve_all(default_model_id).items():
            r = reports.get(cam)
            out.append({"camera_id": cam, "group": groups.get(cam), "assigned_model_id": model, "assigned_by": why,
                        "running_model_id": r.running_model_id if r else None,
                        "reported_model_id": r.model_id if r else None, "state": r.state if r else None,
                        "reason": r.reason if r else None, "updated_ms": r.updated if r else None})
        return out


# -- the HTTP side ---------------------------------------------------------------------------------------------------

class StatusReport(BaseModel):
    """What a camera reports about a rollout (POST /v1/cameras/ID/assignment/status)."""
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    state: str = Field(pattern="^(" + "|".join(STATES) + ")$")
    reason: str = Field("", max_length=2000)
    running_model_id: Optional[str] = Field(None, pattern=r"^[0-9a-f]{16}$")


def _camera(request: Request, camera_id: str | None):
    """The camera authenticated by ``Authorization: Bearer TOKEN`` (its own token), or HTTP 401."""
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    camera = None
    if camera_id and kind.lower() == "bearer" and token.strip():
        camera = authenticate_camera(request.app.state.storage, camera_id, token.strip().encode())
    if camera is None:
        address = request.client.host if request.client else "?"
        raise unauthorized(request, "camera", f"rollout:{address}", f"camera {camera_id!r}",
                           "camera token required (Authorization: Bearer TOKEN)", "taskcodec-camera")
    return camera


def install(app) -> Registry:
    """The hook create_app calls: register the served bundle, load registered models on demand into the ingest
    service, and the rollout routes."""
    service = app.state.service
    storage = service.storage
    registry = Registry(storage.path)
    try:
        registry.add(service.bundle.path, require_golden=False)  # `serve --bundle B`: B is in the registry
    except (RegistryError, OSError) as exc:
        log.warning("could not record the served bundle %s in the registry %s: %s", service.bundle.path,
                    registry.dir, exc)
    service.model_loader = registry.load
    app.state.registry = registry
    default_id = service.model_id

    @app.get("/v1/cameras/{camera_id}/assignment")
    def assignment(camera_id: str, request: Request) -> dict:
        _camera(request, camera_id)
        model_id, why = registry.resolve(camera_id, default_id)
        record = registry.get(model_id) if model_id else None
        files = {}
        if record is not None:
            try:
                files = json.loads((Path(record.folder) / MANIFEST).read_text())["sha256"]
            except (OSError, ValueError, KeyError):
                files = {}
        return {"camera_id": camera_id, "model_id": model_id, "assigned_by": why,
                "name": record.name if record else None, "signed": record.signed if record else False,
                "files": files}

    @app.post("/v1/cameras/{camera_id}/assignment/status")
    def assignment_status(camera_id: str, request: Request, report: StatusReport = Body(...)) -> dict:
        _camera(request, camera_id)
        registry.report(camera_id, report.model_id, report.state, report.reason, report.running_model_id)
        line = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}" for k, v in
                        (("camera", camera_id), ("model", report.model_id), ("state", report.state),
                         ("running", report.running_model_id), ("reason", report.reason)))
        (log.warning if report.state == "refused" else log.info)("event=rollout " + line)
        return {"ok": True}

    @app.get("/v1/models/{model_id}/files/{name}")
    def model_file(model_id: str, name: str, request: Request) -> FileResponse:
        _camera(request, request.headers.get("x-camera-id"))
        path = registry.file(model_id, name)
        if path is None:
            raise HTTPException(404, f"model {model_id} has no file {name!r}")
        return FileResponse(path, media_type="application/octet-stream")

    @app.get("/v1/models", dependencies=[Depends(require_operator("read"))])
    def models() -> list[dict]:
        loaded = {m.model_id for m in service.models.values()}
        return [dict(asdict(r), default=r.id == default_id, loaded=r.id in loaded) for r in registry.list()]

    @app.get("/v1/rollout", dependencies=[Depends(require_operator("read"))])
    def rollout() -> dict:
        return {"default_model_id": default_id, "cameras": registry.overview(default_id),
                "assignments": [asdict(a) for a in registry.assignments(active_only=False)]}

    from fastapi.responses import HTMLResponse

    from taskcodec.server import dashboard
    from taskcodec.server.query import iso

    def _iso(ms):
        return iso(ms) if ms else None

    @app.get(f"{dashboard.PREFIX}/rollout", response_class=HTMLResponse, include_in_schema=False)
    def rollout_page(request: Request, op=Depends(dashboard.operator)) -> HTMLResponse:
        rows = [dict(r, updated=_iso(r["updated_ms"])) for r in registry.overview(default_id)]
        models = [dict(asdict(m), added=_iso(m.added)) for m in registry.list()]
        assignments = [dict(asdict(a), created=_iso(a.created)) for a in registry.assignments(active_only=False)]
        return dashboard._page(request, "rollout.html", rows=rows, models=models, assignments=assignments,
                               default_model_id=default_id, operator=op, now=iso(int(time.time() * 1000)))

    return registry
