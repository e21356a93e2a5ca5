"""The operator's query API over stored frames: filters (capture-time range, cameras, classes, model, confidence),
counts by class per interval, JSON or CSV out, and the per-camera fleet figures the dashboard and /metrics share.

    GET /v1/query/frames?camera=cam-1&class_name=Sneaker&since=2026-12-04T10:00:00Z&until=...&format=csv
    GET /v1/query/counts?interval=5m&since=...&by_camera=true&format=json

Every query parameter a GET endpoint of the server does not declare is refused with 422 naming it (``install`` adds
that check to the whole app), so ``until_ts=`` or a misspelt ``clas_name=`` never silently returns everything.

Times: ``since`` is inclusive, ``until`` exclusive, both on the camera's capture clock, given as milliseconds since
the epoch or ISO 8601 (``2026-12-04T10:00:00Z``; no zone means UTC). Every query is answered from an index
(the primary key (camera_id, epoch, seq) for named cameras, their recent rows then sorted by time; ``frames_by_time``
otherwise: see storage.MIGRATIONS) for the recent part,
from the packed blocks of the hours the query covers for the packed part; counts from the insert-time counters
(per minute and hour of all cameras, per hour of each camera) wherever the interval and the range's ends allow, the
rest from rows and blocks (storage's reader API: select_frames, count_frames); the tests check the query plans. Reads use their own read-only connections, so they
never wait for the ingest writer (WAL).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Iterator, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Match

from taskcodec.server.ood import UNKNOWN, UNKNOWN_NAME
from taskcodec.server.auth import require_operator
from taskcodec.server.storage import (FrameFilter, count_frames, hot_counts_sql, hot_frames_sql, packed_totals,
                                      select_frames)

MAX_ROWS = 100_000
MAX_BUCKETS = 100_000
FRAME_COLUMNS = ("camera_id", "epoch", "seq", "ts_capture_ms", "ts_capture", "ts_stored_ms", "model_id", "prediction",
                 "class_name", "confidence", "payload_bytes")

router = APIRouter(prefix="/v1/query", tags=["query"], dependencies=[Depends(require_operator("read"))])


# parameters --------------------------------------------------------------------------------------------------------
class Filters(BaseModel):
    """Filters shared by the frame listing and the counts (repeat a parameter for several values)."""
    model_config = ConfigDict(extra="forbid")

    camera: list[str] = Field(default_factory=list, description="camera id(s)")
    class_name: list[str] = Field(default_factory=list, description="predicted class name(s)")
    prediction: list[int] = Field(default_factory=list, description="predicted class index(es)")
    model_id: list[str] = Field(default_factory=list, description="model id(s) the frames were classified with")
    since: str | None = Field(None, description="capture time >= this (ms since epoch or ISO 8601)")
    until: str | None = Field(None, description="capture time < this (ms since epoch or ISO 8601)")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)
    format: Literal["json", "csv"] = "json"


class FrameQuery(Filters):
    limit: int = Field(1000, ge=1, le=MAX_ROWS)
    order: Literal["asc", "desc"] = "asc"
    cursor: str | None = Field(None, description="next_cursor of the previous page")


class CountQuery(Filters):
    interval: str = Field("1h", description="bucket width: seconds, or 30s, 5m, 1h, 1d")
    by_camera: bool = False


def parse_time(value: str | None, name: str) -> int | None:
    """Milliseconds since the epoch from an integer or an ISO 8601 string (UTC unless it names a zone)."""
    if value is None or value == "":
        return None
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _bad(name, f"{value!r} is neither milliseconds since the epoch nor an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_interval(value: str) -> int:
    """Bucket width in ms from '300' (seconds), '30s', '5m', '1h', '1d' or '250ms'."""
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", value)
    if not m or int(m.group(1)) <= 0:
        raise _bad("interval", f"{value!r} is not a positive duration like 300, 30s, 5m, 1h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bad(name: str, message: str, kind: str = "value_error") -> HTTPException:
    return HTTPException(422, [{"loc": ["query", name], "msg": message, "type": kind}])


# reading -----------------------------------------------------------------------------------------------------------
class Reader:
    """Per-thread read-only connections to the server's SQLite file, and the class names of its classifier."""

    def __init__(self, db_path: str | Path, classes: list[str] | tuple[str, ...] = ()):
        self.path = Path(db_path)
        self.classes = list(classes)
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def class_name(self, index: int) -> str | None:
        if index == UNKNOWN:  # out of the model's domain (server/ood.py)
            return UNKNOWN_NAME
        return self.classes[index] if 0 <= index < len(self.classes) else None

    def class_index(self, name: str) -> int:
        if name == UNKNOWN_NAME and UNKNOWN_NAME not in self.classes:
            return UNKNOWN
        try:
            return self.classes.index(name)
        except ValueError:
            raise _bad("class_name", f"unknown class {name!r}; classes: {', '.join(self.classes)}") from None


@dataclass
class Where:
    sql: str
    args: list
    single_camera: bool


def frame_filter(f: Filters, reader: Reader) -> FrameFilter:
    predictions = set(f.prediction) | {reader.class_index(n) for n in f.class_name}
    return FrameFilter(cameras=tuple(sorted(set(f.camera))), predictions=tuple(sorted(predictions)),
                       models=tuple(sorted(set(f.model_id))), since=parse_time(f.since, "since"),
                       until=parse_time(f.until, "until"), min_confidence=f.min_confidence)


def build_where(f: Filters, reader: Reader) -> Where:
    sql, args = frame_filter(f, reader).hot_where()
    return Where(sql, args, len(set(f.camera)) == 1)


def _encode_cursor(row: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(row)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str, int, int]:
    try:
        ts, cam, epoch, seq = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return int(ts), str(cam), int(epoch), int(seq)
    except (ValueError, TypeError):
        raise _bad("cursor", "not a cursor returned by this API") from None


def frames_sql(q: FrameQuery, reader: Reader) -> tuple[str, list]:
    """The recent part's SQL of a frame query (the packed part is read by storage.select_frames)."""
    return hot_frames_sql(frame_filter(q, reader), order=q.order,
                          after=_decode_cursor(q.cursor) if q.cursor else None, limit=q.limit)


def query_frames(q: FrameQuery, reader: Reader) -> list[dict]:
    rows = select_frames(reader.conn(), frame_filter(q, reader), order=q.order,
                         after=_decode_cursor(q.cursor) if q.cursor else None, limit=q.limit)
    out = []
    for cam, epoch, seq, ts, stored, model, nbytes, pred, conf in rows:
        out.append({"camera_id": cam, "epoch": epoch, "seq": seq, "ts_capture_ms": ts, "ts_capture": iso(ts),
                    "ts_stored_ms": stored, "model_id": model, "prediction": pred,
                    "class_name": reader.class_name(pred), "confidence": conf, "payload_bytes": nbytes})
    return out


def counts_sql(q: CountQuery, reader: Reader, interval_ms: int) -> tuple[str, list]:
    """The recent part's SQL of a count query where the counters cannot answer it (storage.count_frames)."""
    return hot_counts_sql(frame_filter(q, reader), interval_ms, q.by_camera)


def query_counts(q: CountQuery, reader: Reader, with_bytes: bool = False) -> dict:
    interval_ms = parse_interval(q.interval)
    counts = count_frames(reader.conn(), frame_filter(q, reader), interval_ms, by_camera=q.by_camera,
                          with_bytes=with_bytes)
    buckets: dict[tuple[int, str | None], dict] = {}
    for (start, cam, pred), (n, nbytes) in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or "",
                                                                                  kv[0][2])):
        if n <= 0:
            continue
        b = buckets.get((start, cam))
        if b is None:
            if len(buckets) >= MAX_BUCKETS:
                raise _bad("interval", f"more than {MAX_BUCKETS} buckets: use a wider interval or a shorter range")
            b = buckets[(start, cam)] = {"start_ms": start, "start": iso(start), "end_ms": start + interval_ms,
                                         **({"camera_id": cam} if q.by_camera else {}), "total": 0, "counts": {}}
            if with_bytes:
                b["payload_bytes"] = 0
        b["counts"][reader.class_name(pred) or str(pred)] = n
        b["total"] += n
        if with_bytes:
            b["payload_bytes"] += nbytes
    return {"interval_ms": interval_ms, "classes": reader.classes, "buckets": list(buckets.values())}


# endpoints ---------------------------------------------------------------------------------------------------------
def _reader(request: Request) -> Reader:
    return request.app.state.query_reader


def _csv(rows: Iterator[list], header: list[str], filename: str) -> StreamingResponse:
    def lines():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            if buf.tell() > 64 << 10:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/frames", summary="Stored frames matching filters (JSON or CSV)")
def frames_endpoint(q: Annotated[FrameQuery, Query()], reader: Reader = Depends(_reader)) -> Response:
    rows = query_frames(q, reader)
    last = rows[-1] if len(rows) == q.limit else None
    next_cursor = _encode_cursor((last["ts_capture_ms"], last["camera_id"], last["epoch"], last["seq"])) \
        if last else None
    if q.format == "csv":
        response = _csv(([r[c] for c in FRAME_COLUMNS] for r in rows), list(FRAME_COLUMNS), "frames.csv")
        if next_cursor:
            response.headers["X-Next-Cursor"] = next_cursor
        return response
    return JSONResponse({"count": len(rows), "next_cursor": next_cursor, "frames": rows})


@router.get("/counts", summary="Frame counts by predicted class per capture-time interval (JSON or CSV)")
def counts_endpoint(q: Annotated[CountQuery, Query()], reader: Reader = Depends(_reader)) -> Response:
    result = query_counts(q, reader)
    if q.format == "csv":
        def rows():
            for b in result["buckets"]:
                for name, n in b["counts"].items():
                    yield [b["start_ms"], b["start"], b.get("camera_id", ""), name, n]
        return _csv(rows(), ["start_ms", "start", "camera_id", "class_name", "count"], "counts.csv")
    return JSONResponse(result)


# fleet figures (dashboard and per-camera metrics) --------------------------------------------------------------------
@dataclass
class CameraFigures:
    camera_id: str
    frames: int = 0
    payload_bytes: int = 0
    last_stored_ms: int | None = None
    last_capture_ms: int | None = None
    model_id: str | None = None
    _model_rowid: int = -1
    registered: bool = False
    created_ms: int | None = None
    recent_bytes: int = 0
    recent_frames: int = 0


# NOT INDEXED: read the rowid range of the table itself; left alone, SQLite prefers walking the whole camera index
# to avoid sorting the GROUP BY, which made an incremental refresh cost as much as the first one.
NEW_ROWS_SQL = ("SELECT camera_id, count(*), sum(length(payload)), max(ts_stored_ms), max(ts_capture_ms), max(rowid) "
                "FROM frames NOT INDEXED WHERE rowid > ? GROUP BY camera_id")
RECENT_SQL = ("SELECT camera_id, count(*), sum(length(payload)) FROM frames NOT INDEXED WHERE rowid >= ? AND "
              "ts_stored_ms >= ? GROUP BY camera_id")

# two subqueries: SQLite answers min() or max() of the rowid from the b-tree's ends, but not both in one query
BOUNDS_SQL = "SELECT coalesce((SELECT min(rowid) FROM frames), 0), coalesce((SELECT max(rowid) FROM frames), 0)"
ROW_AT_SQL = "SELECT rowid, ts_stored_ms FROM frames WHERE rowid >= ? ORDER BY rowid LIMIT 1"


class FleetStats:
    """Per-camera totals computed from the database, so every server process (``--workers N``) reports the same
    numbers. Recent rows are counted incrementally: each refresh reads only the rows added since the last one (by
    rowid; the frames table is append-only), so a scrape costs O(new frames), the first one O(all recent frames).
    Packed frames come from the per-camera totals compaction keeps (packed_cameras); when a camera's generation there
    changes (compaction moved some of its rows), its recent part is counted again from its remaining rows."""

    def __init__(self, reader: Reader, window_s: float = 60.0, online_s: float = 120.0):
        self.reader = reader
        self.window_s = window_s  # uplink rate = payload bytes stored in the last window_s seconds / window_s
        self.online_s = online_s  # a camera is online when it stored a frame this recently
        self._lock = threading.Lock()
        self._rowid = 0
        self._cams: dict[str, CameraFigures] = {}  # recent part (frames table) only
        self._generation: dict[str, int] = {}

    def _first_rowid_stored_after(self, conn: sqlite3.Connection, ms: int) -> int:
        """Smallest rowid whose ts_stored_ms >= ms, by bisection on rowid (rows are appended in stored-time order;
        a few ms of disorder between concurrent writers only blurs the window's edge)."""
        lo, hi = conn.execute(BOUNDS_SQL).fetchone()
        if hi == 0:
            return 1
        hi += 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute(ROW_AT_SQL, (mid,)).fetchone()
            if row is None or row[1] >= ms:
                hi = mid
            else:
                lo = row[0] + 1
        return lo

    def refresh(self, now_ms: int | None = None) -> dict[str, CameraFigures]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        conn = self.reader.conn()
        with self._lock:
            conn.execute("BEGIN")  # one snapshot for all the reads below
            try:
                for cam, created in conn.execute("SELECT id, created FROM cameras"):
                    c = self._cams.setdefault(cam, CameraFigures(cam))
                    c.registered, c.created_ms = True, created
                rows = conn.execute(NEW_ROWS_SQL, (self._rowid,)).fetchall()
                for cam, n, nbytes, stored, captured, rowid in rows:
                    c = self._cams.setdefault(cam, CameraFigures(cam))
                    c.frames += n
                    c.payload_bytes += nbytes or 0
                    c.last_stored_ms = max(c.last_stored_ms or 0, stored)
                    c.last_capture_ms = max(c.last_capture_ms or 0, captured)
                    if rowid > c._model_rowid:
                        c.model_id = conn.execute("SELECT model_id FROM frames WHERE rowid = ?", (rowid,)).fetchone()[0]
                        c._model_rowid = rowid
                    self._rowid = max(self._rowid, rowid)
                packed = packed_totals(conn)
                for cam, (generation, *_rest) in packed.items():
                    if self._generation.get(cam) != generation:  # compaction moved rows: count what is left
                        c = self._cams.setdefault(cam, CameraFigures(cam))
                        c.frames, c.payload_bytes = conn.execute(
                            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM frames WHERE camera_id = ? "
                            "AND rowid <= ?", (cam, self._rowid)).fetchone()
                        self._generation[cam] = generation
                first = self._first_rowid_stored_after(conn, now_ms - int(self.window_s * 1000))
                recent = dict((cam, (n, b)) for cam, n, b in conn.execute(
                    RECENT_SQL, (first, now_ms - int(self.window_s * 1000))))
            finally:
                conn.execute("COMMIT")
            out = {}
            for cam, c in sorted(self._cams.items()):
                c.recent_frames, c.recent_bytes = recent.get(cam, (0, 0))
                c.recent_bytes = c.recent_bytes or 0
                f = CameraFigures(**vars(c))
                p = packed.get(cam)
                if p is not None:
                    _, n, nbytes, stored, captured, model = p
                    f.frames += n
                    f.payload_bytes += nbytes
                    f.last_stored_ms = max(f.last_stored_ms or 0, stored)
                    f.last_capture_ms = max(f.last_capture_ms or 0, captured)
                    if f.model_id is None:
                        f.model_id = model
                out[cam] = f
            return out

    def warm_up(self) -> None:
        try:
            self.refresh()
        except sqlite3.Error:  # the server is going away, or the file is busy: the next refresh does the work
            pass

    def online(self, c: CameraFigures, now_ms: int | None = None) -> bool:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return c.last_stored_ms is not None and now_ms - c.last_stored_ms <= self.online_s * 1000

    def uplink_bytes_per_s(self, c: CameraFigures) -> float:
        return c.recent_bytes / self.window_s


class FleetCollector:
    """Prometheus collector: per-camera series computed from the database at scrape time."""

    def __init__(self, stats: FleetStats):
        self.stats = stats

    def describe(self):
        return []  # no describe-time DB read (registration must not touch the database)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now_ms = int(time.time() * 1000)
        cams = self.stats.refresh(now_ms)
        p = "taskcodec_server_camera_"
        frames = CounterMetricFamily(p + "frames_stored", "Frames stored per camera (from the database)", labels=["camera"])
        nbytes = CounterMetricFamily(p + "payload_bytes", "Payload bytes stored per camera (from the database)",
                                     labels=["camera"])
        seen = GaugeMetricFamily(p + "last_seen_timestamp_seconds", "Server time the camera's last frame was stored",
                                 labels=["camera"])
        rate = GaugeMetricFamily(p + "uplink_payload_bytes_per_second",
                                 f"Payload bytes stored per second over the last {self.stats.window_s:g} s", labels=["camera"])
        online = GaugeMetricFamily(p + "online", f"1 if a frame was stored in the last {self.stats.online_s:g} s",
                                   labels=["camera"])
        model = GaugeMetricFamily(p + "model_info", "Model id of the camera's latest stored frame",
                                  labels=["camera", "model_id"])
        for cam, c in cams.items():
            frames.add_metric([cam], c.frames)
            nbytes.add_metric([cam], c.payload_bytes)
            rate.add_metric([cam], self.stats.uplink_bytes_per_s(c))
            online.add_metric([cam], 1.0 if self.stats.online(c, now_ms) else 0.0)
            if c.last_stored_ms is not None:
                seen.add_metric([cam], c.last_stored_ms / 1000.0)
            if c.model_id is not None:
                model.add_metric([cam, c.model_id], 1.0)
        yield from (frames, nbytes, seen, rate, online, model)


# strict query parameters for every GET endpoint --------------------------------------------------------------------
def declared_query_names(route) -> set[str] | None:
    """The query parameter names a FastAPI route declares (flattening Query models), None if it is not an API route."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    names: set[str] = set()

    def walk(dep) -> None:
        for field in dep.query_params:
            annotation = getattr(field.field_info, "annotation", None)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names.update(f.alias or n for n, f in annotation.model_fields.items())
            else:
                names.add(field.alias)
        for sub in dep.dependencies:
            walk(sub)

    walk(dependant)
    return names


class StrictQueryParameters:
    """ASGI middleware: refuse (422, naming it) any query parameter a GET API route does not declare. Pure ASGI, so
    POST ingest and the WebSocket pass straight through at no cost."""

    def __init__(self, app, router_app: FastAPI):
        self.app = app
        self.router_app = router_app
        self._declared: dict[int, set[str] | None] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope.get("query_string"):
            unknown = self._unknown(scope)
            if unknown:
                response = JSONResponse({"detail": [
                    {"loc": ["query", name], "msg": f"unknown query parameter {name!r}", "type": "extra_forbidden"}
                    for name in unknown]}, 422)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _unknown(self, scope) -> list[str]:
        from urllib.parse import parse_qsl

        for route in self.router_app.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                key = id(route)
                if key not in self._declared:
                    self._declared[key] = declared_query_names(route)
                allowed = self._declared[key]
                if allowed is None:
                    return []
                given = {k for k, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)}
                return sorted(given - allowed)
        return []


def install(app: FastAPI) -> None:
    """The hook create_app calls: the query routes, the strict-parameter check and the per-camera metrics."""
    service = app.state.service
    storage = service.storage
    classes = list(getattr(getattr(service, "classifier", None), "classes", None) or [])
    reader = app.state.query_reader = Reader(storage.path, classes)
    stats = app.state.fleet_stats = FleetStats(reader)
    # The first refresh reads every stored frame once (about 3 s per million on a small box): do it now, in the
    # background, rather than in the first /metrics scrape or dashboard view (they wait for it if it is still busy).
    threading.Thread(target=stats.warm_up, name="fleet-figures-warm-up", daemon=True).start()
    app.include_router(router)
    app.add_middleware(StrictQueryParameters, router_app=app)
    metrics = getattr(app.state, "metrics", None) or getattr(service, "metrics", None)
    if metrics is not None:
        metrics.registry.register(FleetCollector(stats))
