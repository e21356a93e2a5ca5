"""The operator's dashboard: server-rendered HTML (jinja2) with charts drawn by uPlot, shipped in the package
(static/uplot, MIT) so it works on sites without internet access.

    /dashboard/                 the fleet: online/offline, last seen, model, uplink bytes/s, frames per camera
    /dashboard/cameras/ID       one camera: recent predictions with confidence, class counts and bandwidth over time
    /dashboard/login            a form for an operator API key (scope read or admin), kept in an HttpOnly cookie

Authentication is the server's operator authentication (auth.require_operator("read")): the cookie's key is checked
exactly like an ``Authorization: Bearer`` header, which also works here. All figures are read from the database
(query.FleetStats), so every `--workers` process shows the same numbers. "Online" means a frame was stored within
the last 120 s; "uplink" is payload bytes stored per second over the last 60 s (what the server knows: spool depth
and drops live on the cameras).
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from taskcodec.server.auth import require_operator
from taskcodec.server.query import CountQuery, FleetStats, Reader, iso, query_counts
from taskcodec.server.storage import FrameFilter, select_frames

HERE = Path(__file__).parent
COOKIE = "taskcodec_operator"
PREFIX = "/dashboard"
RECENT = 50
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix=PREFIX, include_in_schema=False)
_check_read = require_operator("read")


def _with_cookie_key(request: Request) -> Request:
    """The request as require_operator sees it: the cookie's key as a Bearer header, unless one was sent."""
    key = request.cookies.get(COOKIE)
    if not key or request.headers.get("authorization"):
        return request
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
    headers.append((b"authorization", b"Bearer " + key.encode("latin-1", "replace")))
    return Request({**request.scope, "headers": headers}, request.receive)


def operator(request: Request):
    """Dependency of every dashboard page: the operator (read scope), or a redirect to the login form."""
    try:
        return _check_read(_with_cookie_key(request))
    except HTTPException as exc:
        if exc.status_code != 401:
            raise
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first",
                            headers={"Location": f"{PREFIX}/login?next={urllib.parse.quote(target, safe='')}"}) from None


def _page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, {"prefix": PREFIX, **context}, status_code=status)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith(PREFIX + "/") and "//" not in target and "\\" not in target \
        else PREFIX + "/"


def _ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) // 1000)
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


# pages ---------------------------------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = Query(None)) -> HTMLResponse:
    return _page(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    key, target = (form.get("key") or [""])[0].strip(), _safe_next((form.get("next") or [None])[0])
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
    probe = Request({**request.scope, "headers": [*headers, (b"authorization", f"Bearer {key}".encode("latin-1",
                                                                                                   "replace"))]})
    try:
        _check_read(probe)
    except HTTPException as exc:
        message = "unknown or revoked key" if exc.status_code == 401 else str(exc.detail)
        return _page(request, "login.html", status=exc.status_code, next=target, error=message)
    response = RedirectResponse(target, 303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https", max_age=12 * 3600)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse(f"{PREFIX}/login", 303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, op=Depends(operator)) -> HTMLResponse:
    stats: FleetStats = request.app.state.fleet_stats
    now_ms = int(time.time() * 1000)
    cams = stats.refresh(now_ms)
    rows = [{"id": c.camera_id, "online": stats.online(c, now_ms), "last_seen_ms": c.last_stored_ms,
             "last_seen": iso(c.last_stored_ms) if c.last_stored_ms else "never",
             "ago": _ago(c.last_stored_ms, now_ms), "model_id": c.model_id or "–", "frames": c.frames,
             "payload_bytes": c.payload_bytes, "uplink": stats.uplink_bytes_per_s(c), "registered": c.registered}
            for c in cams.values()]
    totals = {"cameras": len(rows), "online": sum(r["online"] for r in rows), "frames": sum(r["frames"] for r in rows),
              "uplink": sum(r["uplink"] for r in rows)}
    return _page(request, "fleet.html", rows=rows, totals=totals, operator=op, now=iso(now_ms),
                 window_s=stats.window_s, online_s=stats.online_s)


def _nice_interval(span_ms: int, buckets: int = 60) -> int:
    for step in (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400):
        if span_ms / (step * 1000) <= buckets:
            return step * 1000
    return 86_400_000 * max(1, span_ms // (86_400_000 * buckets))


@router.get("/cameras/{camera_id}", response_class=HTMLResponse)
def camera(request: Request, camera_id: str = PathParam(..., max_length=255),
           hours: float = Query(1.0, gt=0, le=24 * 31), op=Depends(operator)) -> HTMLResponse:
    stats: FleetStats = request.app.state.fleet_stats
    reader: Reader = request.app.state.query_reader
    now_ms = int(time.time() * 1000)
    cams = stats.refresh(now_ms)
    c = cams.get(camera_id)
    if c is None:
        raise HTTPException(404, f"unknown camera {camera_id!r}")
    conn = reader.conn()
    recent = [{"epoch": e, "seq": s, "ts": iso(ts), "ts_ms": ts, "class_name": reader.class_name(p) or str(p),
               "confidence": conf, "model_id": m, "bytes": n}
              for _, e, s, ts, _, m, n, p, conf in select_frames(conn, FrameFilter(cameras=(camera_id,)),
                                                                  order="desc", limit=RECENT)]
    chart = None
    if c.last_capture_ms is not None:
        until = c.last_capture_ms + 1  # the window ends at the camera's newest frame (its clock, not ours)
        since = until - int(hours * 3_600_000)
        interval = _nice_interval(until - since)
        since = (since // interval) * interval
        counts = query_counts(CountQuery(camera=[camera_id], since=str(since), until=str(until),
                                         interval=f"{interval}ms"), reader, with_bytes=True)
        starts = list(range(since, until, interval))
        index = {s: i for i, s in enumerate(starts)}
        classes = sorted({name for b in counts["buckets"] for name in b["counts"]},
                         key=lambda n: reader.classes.index(n) if n in reader.classes else len(reader.classes))
        series = {name: [0] * len(starts) for name in classes}
        for b in counts["buckets"]:
            for name, n in b["counts"].items():
                series[name][index[b["start_ms"]]] = n
        nbytes = [0] * len(starts)
        for b in counts["buckets"]:
            nbytes[index[b["start_ms"]]] += b["payload_bytes"]
        chart = {"t": [s / 1000 for s in starts], "interval_s": interval / 1000, "classes": classes,
                 "counts": [series[n] for n in classes], "bytes_per_s": [b / (interval / 1000) for b in nbytes],
                 "since": iso(since), "until": iso(until)}
        totals = {name: sum(v) for name, v in series.items()}
    else:
        totals = {}
    figures = {"online": stats.online(c, now_ms), "frames": c.frames, "payload_bytes": c.payload_bytes,
               "model_id": c.model_id or "–", "last_seen": iso(c.last_stored_ms) if c.last_stored_ms else "never",
               "ago": _ago(c.last_stored_ms, now_ms), "uplink": stats.uplink_bytes_per_s(c)}
    return _page(request, "camera.html", camera_id=camera_id, figures=figures, recent=recent, chart=chart,
                 totals=totals, hours=hours, operator=op)


def install(app: FastAPI) -> None:
    """The hook create_app calls (after query.install, whose reader and fleet figures the pages use)."""
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(HERE / "static")), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)
