"""Where the server keeps cameras, operators and frames: a small interface and its SQLite implementation.

Durability: a camera deletes a frame from its own queue once it is acked, so an ack must only ever follow a commit
that survives a kill -9 *and* a power cut. SQLite in WAL mode with ``synchronous=FULL`` fsyncs the WAL on every commit
(NORMAL would survive kill -9 but may lose the last commits on power loss). The fsync is paid once per transaction, and
the ingest pipeline writes one transaction per micro-batch of messages, so its cost is shared by many frames.

Frame identity: (camera, epoch, seq) is a frame's key. ``store_batches`` classifies every frame of a batch inside the
write transaction: new (inserted), duplicate (same key, same payload: acked again) or conflict (same key, another
payload: refused, never acked, the stored frame kept). The same transaction re-reads the session's camera token, so a
camera removed or rotated by another process (CLI, another worker) stores nothing more from that instant.

Disk space and damage: a full disk (SQLITE_FULL) raises ``StorageFull`` after the transaction is rolled back (or was
already rolled back by SQLite: we look, we never issue a blind ROLLBACK). ``PRAGMA quick_check`` runs at open (a damaged
file refuses to open) and on demand (/healthz caches it). The WAL is bounded: ``journal_size_limit`` truncates it after
each checkpoint, ``wal_autocheckpoint`` keeps SQLite's PASSIVE checkpoints frequent, and ``checkpoint()`` (called
periodically by the server) runs a TRUNCATE checkpoint when it can.

Files: the database, its -wal and -shm are created 0600 (SQLite gives the journals the database file's mode) and an
existing database readable by others is tightened to 0600 with a log line.

Two parts: the frames table (one row per frame, ~175 B on disk) holds the recent frames; ``compact()`` (a
background thread of the server every 5 minutes, `taskcodec db compact`) moves the frames stored before the last hour
boundary (less 10 minutes) into packed blocks, one per (camera, epoch, capture hour), ~20-30 B per 6-byte frame.
Every frame is in exactly one part; the reader API below this class
(select_frames, count_frames, camera_frames, frames_by_keys, frames_of_model) reads both, and writers look a batch's
seq range up in the blocks inside their transaction, so a re-sent frame of a packed hour is still a duplicate.

Counters: frame_rollup (per camera, capture hour, class and model) and fleet_counts (all cameras, per capture minute
and hour) count every stored frame; they are updated in the transaction that inserts the rows (one aggregated UPSERT
per counter key of the micro-batch, from the rows actually inserted: rowid above the table's highest when the
transaction began), left alone by compaction (the frames are counted once, wherever they are), lowered by retention.
count_frames answers from them (no table scan, no block decoded) wherever a range's ends allow (see there).

Schema: ``PRAGMA user_version`` holds the schema version; ``migrate()`` (run at open, or `taskcodec db migrate`)
applies the missing steps, one transaction each, with a log line. A database newer than this code refuses to open.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

log = logging.getLogger("taskcodec.server.storage")

# (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, prediction, confidence)
FrameRow = tuple[str, int, int, int, int, str, bytes, int, float]

# frame_rollup's columns and key (hour first: one micro-batch's per-camera counter rows share the current hour's
# pages), for schema step 4 on a new database and for step 6's rebuild of an older layout
ROLLUP_COLUMNS = """(
        camera_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        prediction INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        frames INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        ts_min INTEGER,
        ts_max INTEGER,
        PRIMARY KEY (hour, camera_id, prediction, model_id)
    ) WITHOUT ROWID"""

# Schema steps; step i brings user_version from i to i + 1. Step 0 is the original schema (databases made before
# versioning have user_version 0 and its tables: IF NOT EXISTS makes the step a no-op for them), less the index that
# step 7 drops (so a new file has no freed page of it).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS cameras (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        created INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS frames (
        camera_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        ts_capture_ms INTEGER NOT NULL,
        ts_stored_ms INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        prediction INTEGER NOT NULL,
        confidence REAL NOT NULL,
        PRIMARY KEY (camera_id, epoch, seq)
    );
    """,  # (it also created frames_by_capture_time, dropped by step 7: a new database no longer makes it)
    # operator API keys (issue 11)
    """
    CREATE TABLE IF NOT EXISTS operators (
        name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        scope TEXT NOT NULL,
        created INTEGER NOT NULL
    );
    """,
    # the query API over all cameras (server/query.py): time ranges, and counts by class per interval from the
    # index alone
    """
    CREATE INDEX IF NOT EXISTS frames_by_time ON frames (ts_capture_ms, camera_id, prediction);
    """,
    # the model registry and over-the-air rollout (issue 13; server/registry.py): bundles in the registry folder
    # next to the database, camera groups, assignment history (rollback deactivates the newest), what each camera
    # reports about its rollout
    """
    CREATE TABLE IF NOT EXISTS models (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        folder TEXT NOT NULL,
        signed INTEGER NOT NULL,
        golden INTEGER NOT NULL,
        added INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS camera_groups (
        camera_id TEXT PRIMARY KEY,
        group_name TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS assignments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        model_id TEXT NOT NULL,
        canary REAL NOT NULL,
        created INTEGER NOT NULL,
        active INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX IF NOT EXISTS assignments_by_target ON assignments (kind, target, active);
    CREATE TABLE IF NOT EXISTS rollout_status (
        camera_id TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        running_model_id TEXT,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        updated INTEGER NOT NULL
    );
    """,
    # packed frames (issue 12 item 4): compaction moves frames stored more than COMPACT_SETTLE_S before the last
    # hour boundary out of `frames` into one block per (camera, epoch, capture hour) (columns, zlib; see
    # encode_block), counts them in an hourly rollup and in per-camera totals; `frames` keeps the recent part.
    # (frame_rollup as created here since schema step 6 exists; databases that reached version 5 before have it
    # keyed by camera first, without the ts bounds, counting packed frames only: step 6 rebuilds it.)
    """
    CREATE TABLE IF NOT EXISTS frame_blocks (
        camera_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        hour INTEGER NOT NULL,
        seq_lo INTEGER NOT NULL,
        seq_hi INTEGER NOT NULL,
        n INTEGER NOT NULL,
        ts_lo INTEGER NOT NULL,
        ts_hi INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        models TEXT NOT NULL,
        format INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (camera_id, epoch, hour)
    );
    CREATE INDEX IF NOT EXISTS frame_blocks_by_seq ON frame_blocks (camera_id, epoch, seq_hi);
    CREATE INDEX IF NOT EXISTS frame_blocks_by_hour ON frame_blocks (hour, camera_id, n);
    CREATE TABLE IF NOT EXISTS frame_rollup """ + ROLLUP_COLUMNS + """;
    CREATE INDEX IF NOT EXISTS frame_rollup_by_camera ON frame_rollup (camera_id, hour);
    CREATE TABLE IF NOT EXISTS packed_cameras (
        camera_id TEXT PRIMARY KEY,
        generation INTEGER NOT NULL,
        frames INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        last_stored_ms INTEGER NOT NULL,
        last_capture_ms INTEGER NOT NULL,
        model_id TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS compaction (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        last_run_ms INTEGER NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0
    );
    """,
    # insert-time counters (issue 12 item 4): frame_rollup now counts every stored frame (rows and blocks alike),
    # updated in the transaction that inserts the rows (no longer by compaction), and fleet_counts holds the same
    # counts for all cameras together per minute and per hour; ts_min / ts_max bound the capture times counted in
    # each counter row (deletions leave them wider than the frames left: still bounds), so a count whose range ends
    # or starts inside a minute or hour can still use the counter when no counted frame lies on the other side.
    # frame_rollup is keyed by hour first (an older one is rebuilt): the rows an insert updates (the current hour of
    # every camera) sit together in a few pages instead of one page per camera (each camera's history between them):
    # with 72 hours of counters the per-camera one cost 8.2 µs per frame keyed by camera first, 3.4 keyed by hour
    # first (bench/results/storage_counters/*write_toggle_57_72h.md); reads by camera: an index.
    # The rebuild and the backfill (counts of the existing rows and blocks) are _counters_step, run in this step's
    # transaction.
    """
    CREATE TABLE IF NOT EXISTS fleet_counts (
        unit_ms INTEGER NOT NULL,
        cell INTEGER NOT NULL,
        prediction INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        frames INTEGER NOT NULL,
        payload_bytes INTEGER NOT NULL,
        ts_min INTEGER,
        ts_max INTEGER,
        PRIMARY KEY (unit_ms, cell, prediction, model_id)
    ) WITHOUT ROWID;
    """,
    # one per-camera B-tree per frame (issue 12 item 5): each stored frame of a live camera dirtied a leaf of *two*
    # per-camera indexes — the primary key (camera_id, epoch, seq) and (camera_id, ts_capture_ms) — and with
    # hundreds of interleaved cameras every such leaf is its own page in each commit (written to the WAL, then
    # checkpointed). The capture-time index goes; a camera's recent rows are found through the primary key (one
    # camera's rows: at most the ~70 minutes compaction leaves unpacked, sorted by time after the seek) and
    # frames_by_time still orders all cameras. Steady-state write CPU with 20 minutes of rows per camera, 1000
    # cameras: bench/results/sqlite_layout.md.
    """
    DROP INDEX IF EXISTS frames_by_capture_time;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA = "\n".join(MIGRATIONS)  # the whole current schema, for readers of the code
COUNTERS_VERSION = 6  # the schema version from which frame_rollup and fleet_counts count every stored frame
# the primary key's index of `frames` (SQLite names a table's first UNIQUE/PRIMARY KEY index so): the one per-camera
# index of the recent rows, named where the planner must not pick the time-first frames_by_time for one camera
FRAMES_KEY_INDEX = "sqlite_autoindex_frames_1"

# The writer connection's page cache (KiB; SQLite's default is 2 MiB). Under many cameras every frame dirties a leaf
# of each per-camera index (one per camera); with the default cache those leaves are read back from the file (a pread
# each) on almost every insert once more than a few hundred cameras are live. 32 MiB keeps them for ~4000 cameras.
WRITER_CACHE_KIB = 32 * 1024

# WAL policy: SQLite checkpoints (PASSIVE) after a commit once the WAL holds this many pages (4 KiB each) ...
# Under many one-fps cameras every frame dirties its camera's leaf in each per-camera index; a checkpoint copies each
# dirty page once however often it changed since the last one, so checkpoints ~1.4 s apart at 1000 frames/s (4096
# pages) copy far fewer pages per frame than ones ~0.1 s apart (256 pages): in-process, 1000 cameras with 20 minutes
# of rows each, 23 frames per commit, the commit's CPU went from ~51 to ~35 µs per frame (the whole server:
# bench/results/serve_load_cpu_ab*.md).
WAL_AUTOCHECKPOINT_PAGES = 4096
# ... and truncates the WAL file to at most this many bytes after a checkpoint (above the checkpoint threshold, so
# that the file's blocks are overwritten, not freed and allocated again, between the periodic TRUNCATE checkpoints).
JOURNAL_SIZE_LIMIT = 32 << 20

NEW, DUPLICATE, CONFLICT = 0, 1, 2

# packed frames (see encode_block and SQLiteStorage.compact)
HOUR_MS = 3_600_000
BLOCK_FORMAT = 2  # 1: an unreleased layout of this session (one zlib stream, payloads inside)
COMPACT_SETTLE_S = 600.0   # frames stored before (now - this), rounded down to the hour, are packed
COMPACT_INTERVAL_S = 300.0  # the server's background compaction looks this often (shared by all its processes)
COMPACT_CHUNK = 20_000     # rows per compaction transaction (one camera at a time; ~0.3 s of the write lock)
MINUTE_MS = 60_000
FLEET_UNITS = (MINUTE_MS, HOUR_MS)  # the cells of fleet_counts


def _floor_sql(column: str, unit: int) -> str:
    """SQL for ``column // unit`` rounded down like Python's (SQLite's / truncates towards zero)."""
    return f"(({column} - (({column} % {unit}) + {unit}) % {unit}) / {unit})"


# The counters of the rows inserted by the current transaction (rowid above the table's highest rowid when it began:
# SQLite gives a new row max(rowid) + 1): one aggregated UPSERT per (camera, hour, class, model) and per (minute or
# hour, class, model), so an insert-or-ignore that kept the stored row counts nothing.
_COUNT_ROWS_SQL = [
    "INSERT INTO frame_rollup (camera_id, hour, prediction, model_id, frames, payload_bytes, ts_min, ts_max) "
    f"SELECT camera_id, {_floor_sql('ts_capture_ms', HOUR_MS)}, prediction, model_id, count(*), "
    "sum(length(payload)), min(ts_capture_ms), max(ts_capture_ms) FROM frames WHERE rowid > ? GROUP BY 1, 2, 3, 4 "
    "ON CONFLICT DO UPDATE SET frames = frames + excluded.frames, payload_bytes = payload_bytes + "
    "excluded.payload_bytes, ts_min = min(ts_min, excluded.ts_min), ts_max = max(ts_max, excluded.ts_max)",
    *["INSERT INTO fleet_counts (unit_ms, cell, prediction, model_id, frames, payload_bytes, ts_min, ts_max) "
      f"SELECT {unit}, {_floor_sql('ts_capture_ms', unit)}, prediction, model_id, count(*), sum(length(payload)), "
      "min(ts_capture_ms), max(ts_capture_ms) FROM frames WHERE rowid > ? GROUP BY 2, 3, 4 "
      "ON CONFLICT DO UPDATE SET frames = frames + excluded.frames, payload_bytes = payload_bytes + "
      "excluded.payload_bytes, ts_min = min(ts_min, excluded.ts_min), ts_max = max(ts_max, excluded.ts_max)"
      for unit in FLEET_UNITS]]
_ADD_FLEET_SQL = (
    "INSERT INTO fleet_counts (unit_ms, cell, prediction, model_id, frames, payload_bytes, ts_min, ts_max) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET frames = frames + excluded.frames, payload_bytes = "
    "payload_bytes + excluded.payload_bytes, ts_min = min(ts_min, excluded.ts_min), "
    "ts_max = max(ts_max, excluded.ts_max)")


def _rowid_mark(w: sqlite3.Connection) -> int:
    """The highest rowid of `frames` now (the rows inserted after this call have larger ones)."""
    return w.execute("SELECT coalesce(max(rowid), 0) FROM frames").fetchone()[0]


def _count_new_rows(w: sqlite3.Connection, mark: int) -> None:
    """Add the rows inserted since ``_rowid_mark`` returned ``mark`` to the counters (same transaction)."""
    for sql in _COUNT_ROWS_SQL:
        w.execute(sql, (mark,))


def _accumulate(acc: dict[tuple, list], key: tuple, n: int, nbytes: int, lo: int, hi: int) -> None:
    """Add n frames of nbytes payload, captured within [lo, hi], to the counter ``acc[key]`` ([n, bytes, lo, hi])."""
    a = acc.get(key)
    if a is None:
        acc[key] = [n, nbytes, lo, hi]
    else:
        a[0] += n
        a[1] += nbytes
        a[2] = min(a[2], lo)
        a[3] = max(a[3], hi)


def _aggregate(rows: Iterable[tuple]) -> tuple[dict, dict]:
    """(camera, ts_capture_ms, prediction, model_id, payload_bytes) tuples summed per counter key:
    ({(camera, hour, class, model): [n, bytes, ts_min, ts_max]}, {(unit, cell, class, model): [...]})."""
    per_camera: dict[tuple, list] = {}
    fleet: dict[tuple, list] = {}
    for cam, ts, pred, model, nbytes in rows:
        _accumulate(per_camera, (cam, ts // HOUR_MS, pred, model), 1, nbytes, ts, ts)
        for unit in FLEET_UNITS:
            _accumulate(fleet, (unit, ts // unit, pred, model), 1, nbytes, ts, ts)
    return per_camera, fleet


def _take_counts(w: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Take deleted frames ((camera, ts_capture_ms, prediction, model_id, payload_bytes) tuples) out of the counters;
    a counter row left with no frames is deleted (its ts bounds stay as they were otherwise: still bounds)."""
    per_camera, fleet = _aggregate(rows)
    for table, key, acc in (("frame_rollup", "camera_id = ? AND hour = ?", per_camera),
                            ("fleet_counts", "unit_ms = ? AND cell = ?", fleet)):
        where = f"{key} AND prediction = ? AND model_id = ?"
        w.executemany(f"UPDATE {table} SET frames = frames - ?, payload_bytes = payload_bytes - ? WHERE {where}",
                      [(v[0], v[1], *k) for k, v in acc.items()])
        w.executemany(f"DELETE FROM {table} WHERE {where} AND frames <= 0", list(acc))


def _count_tuples(rows: Iterable[ReadRow]) -> Iterator[tuple]:
    """Counter tuples of rows in FrameRow order (payload bytes or their length)."""
    for r in rows:
        yield r[0], r[3], r[7], r[5], r[6] if isinstance(r[6], int) else len(r[6])


def _backfill_counters(w: sqlite3.Connection) -> None:
    """Schema step 5 -> 6: count the frames stored before the counters existed. frame_rollup held the packed hours
    (bounds: their blocks' capture times, else the hour's own); the rows are added by the insert-time SQL; the
    fleet counts of the blocks come from decoding each block once (numpy per block, one pass, not all in memory)."""
    w.execute(f"UPDATE frame_rollup SET ts_min = coalesce((SELECT min(ts_lo) FROM frame_blocks b WHERE "
              f"b.camera_id = frame_rollup.camera_id AND b.hour = frame_rollup.hour), hour * {HOUR_MS}), "
              f"ts_max = coalesce((SELECT max(ts_hi) FROM frame_blocks b WHERE b.camera_id = frame_rollup.camera_id "
              f"AND b.hour = frame_rollup.hour), hour * {HOUR_MS} + {HOUR_MS - 1})")
    _count_new_rows(w, 0)
    fleet: dict[tuple, list] = {}
    blocks, t0 = 0, time.monotonic()
    for cam, epoch, models, fmt, data in w.execute("SELECT camera_id, epoch, models, format, data FROM frame_blocks"):
        b = decode_block(cam, epoch, models, fmt, data)
        if not len(b.seq):
            continue
        minute = b.ts // MINUTE_MS
        order = np.lexsort((b.model_idx, b.pred, minute))
        keys = np.stack([minute[order], b.pred[order], b.model_idx[order]])
        starts = np.flatnonzero(np.concatenate(([True], (keys[:, 1:] != keys[:, :-1]).any(axis=0))))
        ts = b.ts[order]
        groups = zip(keys[:, starts].T.tolist(), np.diff(np.append(starts, len(order))).tolist(),
                     np.add.reduceat(b.lengths[order], starts).tolist(), np.minimum.reduceat(ts, starts).tolist(),
                     np.maximum.reduceat(ts, starts).tolist())
        for (m, pred, midx), n, nbytes, lo, hi in groups:
            for key in ((MINUTE_MS, m, pred, b.models[midx]), (HOUR_MS, m // 60, pred, b.models[midx])):
                _accumulate(fleet, key, n, nbytes, lo, hi)
        blocks += 1
        if blocks % 100_000 == 0:
            log.warning("counting packed blocks into the fleet counters: %d done (%.0f s)", blocks,
                        time.monotonic() - t0)
    w.executemany(_ADD_FLEET_SQL, [(*k, *v) for k, v in fleet.items()])
    if blocks:
        log.warning("counted the frames of %d packed blocks into the fleet counters in %.1f s", blocks,
                    time.monotonic() - t0)


_ROLLUP_REBUILD = """
    CREATE TABLE frame_rollup_by_hour_first """ + ROLLUP_COLUMNS + """;
    INSERT INTO frame_rollup_by_hour_first (camera_id, hour, prediction, model_id, frames, payload_bytes)
        SELECT camera_id, hour, prediction, model_id, frames, payload_bytes FROM frame_rollup;
    DROP TABLE frame_rollup;
    ALTER TABLE frame_rollup_by_hour_first RENAME TO frame_rollup;
    CREATE INDEX IF NOT EXISTS frame_rollup_by_camera ON frame_rollup (camera_id, hour);
"""


def _counters_step(w: sqlite3.Connection) -> None:
    """Schema step 5 -> 6, after its SQL: a frame_rollup of the older layout (keyed by camera first, no ts bounds)
    rebuilt keyed by hour first (a new database has the new one from step 4: nothing dropped, no free pages), then
    the counters backfilled."""
    sql = w.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'frame_rollup'").fetchone()[0]
    if "ts_min" not in sql:
        for statement in _ROLLUP_REBUILD.split(";"):
            if statement.strip():
                w.execute(statement)
    _backfill_counters(w)


# Python steps run after a schema step's SQL, in its transaction (the step's index -> function of the writer)
MIGRATION_STEPS = {5: _counters_step}


class StorageError(RuntimeError):
    """The database cannot be opened or used."""


class StorageFull(StorageError):
    """The disk (or the database's size limit) is full: nothing was stored; retry later."""


class StorageDamaged(StorageError):
    """The database file fails its integrity check or SQLite found it malformed."""


class SchemaError(StorageError):
    """The database's schema version does not match this code's."""


@dataclass(frozen=True)
class Camera:
    id: str
    token_hash: str
    created: int


@dataclass(frozen=True)
class Operator:
    name: str
    scope: str
    created: int


@dataclass(frozen=True)
class StoredFrame:
    camera_id: str
    epoch: int
    seq: int
    ts_capture_ms: int
    ts_stored_ms: int
    model_id: str
    payload_bytes: int
    prediction: int
    confidence: float


@dataclass(frozen=True)
class BatchRows:
    """Rows of one batch of one camera session. ``token_hash``: the camera's token hash when the session was
    authenticated (None: do not check; tools and benches)."""
    camera_id: str
    token_hash: str | None
    rows: Sequence[FrameRow]


class Storage(Protocol):
    """What the server needs from a store; SQLite is the one implementation, the protocol keeps it swappable."""

    def add_camera(self, camera_id: str, token_hash: str) -> None: ...
    def remove_camera(self, camera_id: str) -> bool: ...
    def set_token_hash(self, camera_id: str, token_hash: str) -> bool: ...
    def get_camera(self, camera_id: str) -> Camera | None: ...
    def list_cameras(self) -> list[Camera]: ...
    def store_frames(self, rows: Sequence[FrameRow]) -> int: ...
    def store_batches(self, batches: Sequence[BatchRows]) -> list[list[int] | None]: ...
    def add_operator(self, name: str, key_hash: str, scope: str) -> None: ...
    def remove_operator(self, name: str) -> bool: ...
    def operator_by_key_hash(self, key_hash: str) -> Operator | None: ...
    def list_operators(self) -> list[Operator]: ...
    def frames(self, camera_id: str, *, since_seq: int | None = None, since_ts: int | None = None,
               epoch: int | None = None, limit: int = 100) -> list[StoredFrame]: ...
    def frame_counts(self) -> dict[str, int]: ...
    def ping(self) -> bool: ...
    def close(self) -> None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                               or "database or disk is full" in str(exc))


def _is_damaged(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.DatabaseError) and (
        getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
        or "malformed" in text or "not a database" in text)


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (its -wal/-shm then get the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _tighten(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                os.chmod(p, mode & 0o700)
                log.warning("%s was readable by others (mode %o); changed to %o", p, mode, mode & 0o700)
            except PermissionError:
                log.warning("%s is readable by others (mode %o) and cannot be changed", p, mode)


class SQLiteStorage:
    """One writer connection (serialised by a lock) and one reader connection per thread; WAL lets them overlap.

    Frames live in two parts: the frames table (one row per frame; the recent part, where writers insert) and packed
    blocks (one per camera, epoch and capture hour), filled by ``compact()``. The first periodic ``checkpoint()`` of
    a server starts a background thread that compacts every ``compact_interval_s`` (``auto_compact=False`` turns it
    off; the server sets all three from its config's ``storage`` section).

    ``migrate``: apply missing schema steps at open (else an old schema refuses to open; see `taskcodec db migrate`).
    ``check``: run ``PRAGMA quick_check`` at open and refuse a damaged file.
    """

    def __init__(self, path: str | Path, *, migrate: bool = True, check: bool = False,
                 journal_size_limit: int = JOURNAL_SIZE_LIMIT, wal_autocheckpoint: int = WAL_AUTOCHECKPOINT_PAGES,
                 auto_compact: bool = True, compact_interval_s: float = COMPACT_INTERVAL_S,
                 compact_settle_s: float = COMPACT_SETTLE_S):
        self.path = Path(path)
        self.auto_compact, self.compact_interval_s, self.compact_settle_s = (auto_compact, compact_interval_s,
                                                                              compact_settle_s)
        if not self.path.parent.is_dir():
            raise StorageError(f"database folder does not exist: {self.path.parent}")
        self.journal_size_limit = journal_size_limit
        self.wal_autocheckpoint = wal_autocheckpoint
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._compactor: threading.Thread | None = None
        self._compactor_stop = threading.Event()
        self._packed_hi: dict[tuple[str, int], int] = {}  # (camera, epoch) -> highest packed seq (write lock held)
        self._packed_generation: int | None = None
        try:
            _create_private(self.path)
            _tighten(self.path)
            self._writer = self._connect()
            # The writer's statement journal (the SAVEPOINT of store_batches' fast path keeps the pages it changes
            # there until RELEASE) in memory, not in a temporary file: it only serves a rollback inside the open
            # transaction (durability is the WAL's), and on disk it cost two write() calls per changed page.
            self._writer.execute("PRAGMA temp_store=MEMORY")
            self._writer.execute(f"PRAGMA cache_size=-{int(WRITER_CACHE_KIB)}")
            if check:
                problems = self.quick_check()
                if problems:
                    raise StorageDamaged(
                        f"database {self.path} is damaged (PRAGMA quick_check: {'; '.join(problems[:5])}); refusing "
                        f"to start. Restore a backup, or salvage it with `sqlite3 {self.path} .recover`")
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaError(f"database {self.path} has schema version {version}, newer than this taskcodec "
                                  f"({SCHEMA_VERSION}); upgrade taskcodec")
            if version < SCHEMA_VERSION:
                if not migrate:
                    raise SchemaError(f"database {self.path} has schema version {version}, this taskcodec needs "
                                      f"{SCHEMA_VERSION}: run `taskcodec db migrate --db {self.path}`")
                self.migrate()
            _tighten(self.path)
        except sqlite3.Error as exc:
            self._close_writer()
            if _is_damaged(exc):
                raise StorageDamaged(f"database {self.path} is damaged ({exc}); refusing to start. Restore a "
                                     f"backup, or salvage it with `sqlite3 {self.path} .recover`") from exc
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc
        except StorageError:
            self._close_writer()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one message is exactly one transaction.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA journal_size_limit={int(self.journal_size_limit)}")
        conn.execute(f"PRAGMA wal_autocheckpoint={int(self.wal_autocheckpoint)}")
        return conn

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # schema ------------------------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return self._writer.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> list[int]:
        """Apply the missing schema steps (each in its own transaction); returns the versions reached."""
        done = []
        with self._write_lock:
            version = self.schema_version()
            while version < SCHEMA_VERSION:
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self._writer.execute(statement)
                    if version in MIGRATION_STEPS:
                        MIGRATION_STEPS[version](self._writer)
                    self._writer.execute(f"PRAGMA user_version={version + 1}")
                    self._writer.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                version += 1
                done.append(version)
            if done:
                log.warning("database %s: schema migrated to version %d (steps %s)", self.path, version, done)
        return done

    # health ------------------------------------------------------------------------------------------------------
    def quick_check(self) -> list[str]:
        """``PRAGMA quick_check`` on a connection of its own; [] when the file is sound, else SQLite's findings."""
        conn = sqlite3.connect(self.path, timeout=30.0)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            return [str(exc)]
        finally:
            conn.close()
        return [] if rows == ["ok"] else rows

    def checkpoint(self, mode: str = "TRUNCATE") -> tuple[int, int, int]:
        """Checkpoint the WAL (PASSIVE never waits; TRUNCATE also empties the WAL file when no reader is in it).
        Returns SQLite's (busy, WAL pages, pages checkpointed)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(mode)
        if self.auto_compact and self._compactor is None:
            # the server's upkeep calls checkpoint() periodically: that is what starts its background compaction
            self.start_compaction(self.compact_interval_s, self.compact_settle_s)
        with self._write_lock:
            try:
                return tuple(self._writer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    def probe_write(self) -> None:
        """A small durable write (a page in and out), to see whether the disk has room again; StorageFull if not."""
        with self._transaction() as w:
            w.execute("CREATE TABLE IF NOT EXISTS _space_probe (x BLOB)")
            w.execute("INSERT INTO _space_probe VALUES (zeroblob(8192))")
            w.execute("DELETE FROM _space_probe")

    @contextlib.contextmanager
    def _transaction(self):
        """One durable write transaction on the writer connection (BEGIN IMMEDIATE … COMMIT) under the write lock;
        rolled back on any error, SQLite's errors translated (StorageFull, StorageDamaged, StorageError)."""
        with self._write_lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                yield self._writer
                self._writer.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._translate(exc) from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL among them); a ROLLBACK then fails
        # with "cannot rollback - no transaction is active", which must never hide the real error.
        if self._writer is not None and self._writer.in_transaction:
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback failed: %s", exc)

    def _translate(self, exc: sqlite3.Error) -> StorageError:
        if _is_full(exc):
            return StorageFull(f"database or disk is full ({self.path})")
        if _is_damaged(exc):
            return StorageDamaged(f"database {self.path} is damaged: {exc}")
        return StorageError(f"database error: {exc}")

    # cameras -----------------------------------------------------------------------------------------------------
    def _write(self, sql: str, args: tuple) -> int:
        with self._write_lock:
            try:
                return self._writer.execute(sql, args).rowcount
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    def add_camera(self, camera_id: str, token_hash: str) -> None:
        try:
            self._write("INSERT INTO cameras (id, token_hash, created) VALUES (?, ?, ?)",
                        (camera_id, token_hash, now_ms()))
        except sqlite3.IntegrityError as exc:
            raise StorageError(f"camera {camera_id!r} already exists") from exc

    def remove_camera(self, camera_id: str) -> bool:
        return self._write("DELETE FROM cameras WHERE id = ?", (camera_id,)) > 0

    def set_token_hash(self, camera_id: str, token_hash: str) -> bool:
        return self._write("UPDATE cameras SET token_hash = ? WHERE id = ?", (token_hash, camera_id)) > 0

    def get_camera(self, camera_id: str) -> Camera | None:
        row = self._reader().execute("SELECT id, token_hash, created FROM cameras WHERE id = ?",
                                     (camera_id,)).fetchone()
        return Camera(*row) if row else None

    def list_cameras(self) -> list[Camera]:
        rows = self._reader().execute("SELECT id, token_hash, created FROM cameras ORDER BY id").fetchall()
        return [Camera(*r) for r in rows]

    # operators ---------------------------------------------------------------------------------------------------
    def add_operator(self, name: str, key_hash: str, scope: str) -> None:
        try:
            self._write("INSERT INTO operators (name, key_hash, scope, created) VALUES (?, ?, ?, ?)",
                        (name, key_hash, scope, now_ms()))
        except sqlite3.IntegrityError as exc:
            raise StorageError(f"operator {name!r} already exists") from exc

    def remove_operator(self, name: str) -> bool:
        return self._write("DELETE FROM operators WHERE name = ?", (name,)) > 0

    def operator_by_key_hash(self, key_hash: str) -> Operator | None:
        row = self._reader().execute("SELECT name, scope, created FROM operators WHERE key_hash = ?",
                                     (key_hash,)).fetchone()
        return Operator(*row) if row else None

    def list_operators(self) -> list[Operator]:
        return [Operator(*r) for r in
                self._reader().execute("SELECT name, scope, created FROM operators ORDER BY name").fetchall()]

    # frames ------------------------------------------------------------------------------------------------------
    _INSERT = ("INSERT INTO frames (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, "
               "prediction, confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def store_frames(self, rows: Sequence[FrameRow]) -> int:
        """Insert rows in one durable transaction, keeping any stored row of the same key; returns how many were new.
        (Tools and benches; the server uses store_batches, which also tells duplicates from conflicts.)"""
        if not rows:
            return 0
        with self._transaction() as w:
            mark = _rowid_mark(w)
            spans: dict[tuple[str, int], list[int]] = {}
            for r in rows:
                spans.setdefault((r[0], r[1]), []).append(r[2])
            packed = {(cam, epoch): set(_packed_payloads(w, cam, epoch, seqs)) for (cam, epoch), seqs in spans.items()
                      if _has_overlap(w, cam, epoch, min(seqs), max(seqs))}
            if packed:
                rows = [r for r in rows if r[2] not in packed.get((r[0], r[1]), ())]
            inserted = w.executemany(self._INSERT.replace("INSERT", "INSERT OR IGNORE", 1), rows).rowcount \
                if rows else 0
            if inserted:
                _count_new_rows(w, mark)
        return inserted

    def store_batches(self, batches: Sequence[BatchRows]) -> list[list[int] | None]:
        """Store several batches in one durable transaction. Per batch: None if its camera's token is no longer
        the session's (removed or rotated: nothing stored), else one status per row: NEW, DUPLICATE (same key and
        payload already stored) or CONFLICT (same key, another payload: not stored). Raises StorageFull (nothing
        stored) when the disk is full."""
        out: list[list[int] | None] = []
        with self._transaction() as w:
            accepted, slow = [], []
            mark = _rowid_mark(w)
            self._check_packed_generation(w)
            # every session's camera token, read in this transaction (one statement for the whole micro-batch)
            ids = list({b.camera_id for b in batches if b.token_hash is not None})
            tokens = dict(w.execute("SELECT id, token_hash FROM cameras WHERE id IN (SELECT value FROM json_each(?))",
                                    (json.dumps(ids),)).fetchall()) if ids else {}
            for b in batches:
                if b.token_hash is not None:
                    if tokens.get(b.camera_id) != b.token_hash:
                        out.append(None)
                        continue
                out.append([])
                # A block holding any of the batch's seqs (a re-sent frame whose hour is packed already) sends it
                # to the row-by-row path; new frames (seqs above every block of their camera and epoch) do not.
                (slow if b.rows and self._maybe_packed(w, b.rows) else accepted).append((len(out) - 1, b))
            for i, b in slow:
                out[i] = self._store_rows(w, b.rows)
            # Fast path (the usual case: every frame is new): one INSERT OR IGNORE for the whole micro-batch. If
            # any row was already there, undo it and classify row by row.
            rows = [r for _, b in accepted for r in b.rows]
            w.execute("SAVEPOINT fast")
            inserted = w.executemany(self._INSERT.replace("INSERT", "INSERT OR IGNORE", 1), rows).rowcount \
                if rows else 0
            if inserted == len(rows):
                w.execute("RELEASE fast")
                for i, b in accepted:
                    out[i] = [NEW] * len(b.rows)
            else:
                w.execute("ROLLBACK TO fast")
                w.execute("RELEASE fast")
                for i, b in accepted:
                    out[i] = self._store_rows(w, b.rows)
            if any(s and NEW in s for s in out):
                _count_new_rows(w, mark)  # the counters, in the same durable transaction
        return out

    def _check_packed_generation(self, w: sqlite3.Connection) -> None:
        """Inside a write transaction: forget the cached block seq bounds if any compaction (of any process) wrote
        blocks since they were read (compaction bumps the generation in the transaction that writes them)."""
        row = w.execute("SELECT generation FROM compaction WHERE id = 0").fetchone()
        generation = row[0] if row else 0
        if generation != self._packed_generation or len(self._packed_hi) > 200_000:
            self._packed_hi.clear()
            self._packed_generation = generation

    def _maybe_packed(self, w: sqlite3.Connection, rows: Sequence[FrameRow]) -> bool:
        """Whether a block of the rows' camera and epoch holds one of their seqs. The highest packed seq of each
        (camera, epoch) is cached (valid for the generation read by _check_packed_generation in this transaction),
        so a batch of new frames costs no query; only a batch reaching below it is looked up exactly."""
        cam, epoch = rows[0][0], rows[0][1]
        lo = min(r[2] for r in rows)
        hi_packed = self._packed_hi.get((cam, epoch))
        if hi_packed is None:
            hi_packed = self._packed_hi[(cam, epoch)] = w.execute(
                "SELECT coalesce(max(seq_hi), -9223372036854775808) FROM frame_blocks INDEXED BY frame_blocks_by_seq "
                "WHERE camera_id = ? AND epoch = ?", (cam, epoch)).fetchone()[0]
        return lo <= hi_packed and _has_overlap(w, cam, epoch, lo, max(r[2] for r in rows))

    def _store_rows(self, w: sqlite3.Connection, rows: Sequence[FrameRow]) -> list[int]:
        if not rows:
            return []
        cam, epoch = rows[0][0], rows[0][1]
        seqs = [r[2] for r in rows]
        stored = dict(w.execute("SELECT seq, payload FROM frames WHERE camera_id = ? AND epoch = ? AND seq BETWEEN ? "
                                "AND ?", (cam, epoch, min(seqs), max(seqs))).fetchall())
        stored.update(_packed_payloads(w, cam, epoch, seqs))
        status, new = [], []
        for r in rows:
            if r[0] != cam or r[1] != epoch:
                raise ValueError("rows of one batch share camera and epoch")
            old = stored.get(r[2])
            if old is None:
                status.append(NEW)
                new.append(r)
                stored[r[2]] = r[6]
            else:
                status.append(DUPLICATE if bytes(old) == bytes(r[6]) else CONFLICT)
        if new:
            w.executemany(self._INSERT, new)
        return status

    def frames(self, camera_id: str, *, since_seq: int | None = None, since_ts: int | None = None,
               epoch: int | None = None, limit: int = 100) -> list[StoredFrame]:
        """Frames of one camera in (epoch, seq) order, after ``since_seq`` / captured after ``since_ts`` (recent rows
        and packed blocks alike)."""
        return [StoredFrame(*r) for r in camera_frames(self._reader(), camera_id, since_seq=since_seq,
                                                       since_ts=since_ts, epoch=epoch, limit=limit)]

    def frame_counts(self) -> dict[str, int]:
        with snapshot(self._reader()) as conn:
            return self._frame_counts(conn)

    @staticmethod
    def _frame_counts(conn: sqlite3.Connection) -> dict[str, int]:
        out = dict(conn.execute("SELECT camera_id, count(*) FROM frames GROUP BY camera_id").fetchall())
        for cam, n in conn.execute("SELECT camera_id, sum(n) FROM frame_blocks INDEXED BY frame_blocks_by_hour "
                                   "GROUP BY camera_id"):  # the narrow index, not the rows (they hold the blocks)
            out[cam] = out.get(cam, 0) + n
        return out

    def delete_before(self, ts_capture_ms: int, chunk: int = 20000) -> int:
        """Retention by age: delete frames captured before ``ts_capture_ms``: recent rows in chunks of ``chunk`` rows
        (one short transaction each, found through the frames_by_time index, so ingest is never blocked for long),
        packed blocks whole (hours before the cutoff's hour, with their rollup rows) and the blocks of the cutoff's
        hour rewritten without their older frames. Returns how many frames were deleted. The file does not shrink;
        SQLite reuses the freed pages for new frames."""
        cutoff = int(ts_capture_ms)
        total = 0
        while True:
            with self._transaction() as w:
                gone = w.execute(
                    "DELETE FROM frames WHERE rowid IN (SELECT rowid FROM frames INDEXED BY frames_by_time "
                    "WHERE ts_capture_ms < ? LIMIT ?) RETURNING camera_id, ts_capture_ms, prediction, model_id, "
                    "length(payload)", (cutoff, int(chunk))).fetchall()
                _take_counts(w, gone)
            n = len(gone)
            total += n
            if n < chunk:
                break
        hour = cutoff // HOUR_MS
        blocks = max(1, chunk // 1000)
        while True:  # whole blocks of earlier hours, a few per transaction
            with self._transaction() as w:
                keys = w.execute("SELECT camera_id, epoch, hour, n FROM frame_blocks INDEXED BY frame_blocks_by_hour "
                                 "WHERE hour < ? LIMIT ?", (hour, blocks)).fetchall()
                w.executemany("DELETE FROM frame_blocks WHERE camera_id = ? AND epoch = ? AND hour = ?",
                              [k[:3] for k in keys])
            total += sum(k[3] for k in keys)
            if len(keys) < blocks:
                break
        while True:  # their rollup rows (their rows are gone already, each taken out of the counters)
            with self._transaction() as w:
                n = w.execute("DELETE FROM frame_rollup WHERE (hour, camera_id, prediction, model_id) IN (SELECT "
                              "hour, camera_id, prediction, model_id FROM frame_rollup WHERE hour < ? LIMIT ?)",
                              (hour, int(chunk))).rowcount
                if n < chunk:
                    for unit in FLEET_UNITS:  # and the fleet counts of those hours
                        w.execute("DELETE FROM fleet_counts WHERE unit_ms = ? AND cell < ?",
                                  (unit, hour * (HOUR_MS // unit)))
            if n < chunk:
                break
        with self._transaction() as w:  # the cutoff hour's blocks: split
            for cam, epoch, models, fmt, data in w.execute(
                    "SELECT camera_id, epoch, models, format, data FROM frame_blocks INDEXED BY frame_blocks_by_hour "
                    "WHERE hour = ? AND ts_lo < ?", (hour, cutoff)).fetchall():
                b = decode_block(cam, epoch, models, fmt, data)
                old = b.ts < cutoff
                gone = b.rows(np.flatnonzero(old).tolist())
                _take_counts(w, _count_tuples(gone))
                kept = b.rows(np.flatnonzero(~old).tolist())
                w.execute("DELETE FROM frame_blocks WHERE camera_id = ? AND epoch = ? AND hour = ?", (cam, epoch, hour))
                if kept:
                    self._write_block(w, cam, epoch, hour, kept)
                total += len(gone)
        return total

    # compaction --------------------------------------------------------------------------------------------------
    @staticmethod
    def _write_block(w: sqlite3.Connection, cam: str, epoch: int, hour: int, rows: Sequence[ReadRow]) -> None:
        data, models = encode_block(rows)
        seqs = [r[2] for r in rows]
        ts = [r[3] for r in rows]
        w.execute("INSERT OR REPLACE INTO frame_blocks (camera_id, epoch, hour, seq_lo, seq_hi, n, ts_lo, ts_hi, "
                  "payload_bytes, models, format, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (cam, epoch, hour, min(seqs), max(seqs), len(rows), min(ts), max(ts), sum(len(r[6]) for r in rows),
                   json.dumps(models), BLOCK_FORMAT, data))

    @staticmethod
    def _last_rowid_stored_before(conn: sqlite3.Connection, ms: int) -> int:
        """The largest rowid of `frames` whose row was stored before ``ms`` (bisection on rowid: rows are appended in
        stored-time order), never the table's newest row (a rowid must not be handed out twice)."""
        lo, hi = conn.execute("SELECT coalesce((SELECT min(rowid) FROM frames), 0), "
                              "coalesce((SELECT max(rowid) FROM frames), 0)").fetchone()
        if hi == 0:
            return 0
        top = hi
        hi += 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute("SELECT rowid, ts_stored_ms FROM frames WHERE rowid >= ? ORDER BY rowid LIMIT 1",
                               (mid,)).fetchone()
            if row is None or row[1] >= ms:
                hi = mid
            else:
                lo = row[0] + 1
        return min(lo - 1, top - 1)

    def compact(self, *, settle_s: float = COMPACT_SETTLE_S, align_hour: bool = True, now: int | None = None,
                chunk: int = COMPACT_CHUNK, stop: threading.Event | None = None) -> dict:
        """Move frames stored before ``now - settle_s`` (rounded down to the hour when ``align_hour``) from the
        frames table into packed blocks, camera by camera, each step one transaction (block(s) written, rollup and
        per-camera totals updated, rows deleted), so readers always see every frame exactly once and ingest waits at
        most one step. A frame arriving later for a packed hour lands in `frames` and joins its block at the next
        compaction. Safe to run from several processes at once. Returns what it did."""
        t0 = time.monotonic()
        now = now_ms() if now is None else int(now)
        cutoff = now - int(settle_s * 1000)
        if align_hour:
            cutoff = cutoff // HOUR_MS * HOUR_MS
        conn = self._reader()
        watermark = self._last_rowid_stored_before(conn, cutoff)
        frames = blocks = cameras = 0
        cam = ""
        while watermark > 0 and not (stop is not None and stop.is_set()):
            row = conn.execute("SELECT camera_id FROM frames WHERE camera_id > ? ORDER BY camera_id LIMIT 1",
                               (cam,)).fetchone()
            if row is None:
                break
            cam = row[0]
            moved_any = False
            while True:
                with self._transaction() as w:
                    moved, nb = self._compact_camera(w, cam, watermark, chunk)
                frames += moved
                blocks += nb
                moved_any = moved_any or moved > 0
                if moved < chunk or (stop is not None and stop.is_set()):
                    break
            cameras += moved_any
        with self._transaction() as w:
            w.execute("INSERT INTO compaction (id, last_run_ms) VALUES (0, ?) ON CONFLICT DO UPDATE SET "
                      "last_run_ms = excluded.last_run_ms", (now,))
        result = {"frames": frames, "blocks_written": blocks, "cameras": cameras, "cutoff_ms": cutoff,
                  "seconds": round(time.monotonic() - t0, 3)}
        if frames:
            log.info("compaction: %d frames of %d cameras packed into %d blocks (stored before %d) in %.1f s",
                     frames, cameras, blocks, cutoff, result["seconds"])
        return result

    def _compact_camera(self, w: sqlite3.Connection, cam: str, watermark: int, chunk: int) -> tuple[int, int]:
        rows = w.execute("SELECT rowid, camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, "
                         f"prediction, confidence FROM frames INDEXED BY {FRAMES_KEY_INDEX} WHERE camera_id = ? "
                         "AND rowid <= ? ORDER BY ts_capture_ms LIMIT ?", (cam, watermark, chunk)).fetchall()
        if not rows:
            return 0, 0
        groups: dict[tuple[int, int], list] = {}
        for r in rows:
            groups.setdefault((r[2], r[4] // HOUR_MS), []).append(r[1:])
        moved: list[ReadRow] = []
        for (epoch, hour), new in groups.items():
            old = w.execute("SELECT models, format, data FROM frame_blocks WHERE camera_id = ? AND epoch = ? AND "
                            "hour = ?", (cam, epoch, hour)).fetchone()
            if old is not None:
                have = decode_block(cam, epoch, *old).rows()
                seen = {r[2] for r in have}
                dropped = [r for r in new if r[2] in seen]  # never the case (writers check blocks): kept once
                if dropped:
                    _take_counts(w, _count_tuples(dropped))
                    new = [r for r in new if r[2] not in seen]
                self._write_block(w, cam, epoch, hour, have + new)
            else:
                self._write_block(w, cam, epoch, hour, new)
            moved.extend(new)
        # the counters (frame_rollup, fleet_counts) counted these frames when they were inserted
        # writers cache the highest packed seq per (camera, epoch) for one generation: this transaction ends it
        w.execute("INSERT INTO compaction (id, last_run_ms, generation) VALUES (0, 0, 1) ON CONFLICT DO UPDATE SET "
                  "generation = generation + 1")
        newest = max(rows, key=lambda r: (r[5], r[0]))
        w.execute("INSERT INTO packed_cameras (camera_id, generation, frames, payload_bytes, last_stored_ms, "
                  "last_capture_ms, model_id) VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                  "generation = generation + 1, frames = frames + excluded.frames, "
                  "payload_bytes = payload_bytes + excluded.payload_bytes, "
                  "model_id = CASE WHEN excluded.last_stored_ms >= last_stored_ms THEN excluded.model_id "
                  "ELSE model_id END, last_stored_ms = max(last_stored_ms, excluded.last_stored_ms), "
                  "last_capture_ms = max(last_capture_ms, excluded.last_capture_ms)",
                  (cam, len(moved), sum(len(r[6]) for r in moved), newest[5], max(r[4] for r in rows), newest[6]))
        w.executemany("DELETE FROM frames WHERE rowid = ?", [(r[0],) for r in rows])
        return len(rows), len(groups)

    def last_compaction_ms(self) -> int | None:
        row = self._reader().execute("SELECT last_run_ms FROM compaction WHERE id = 0").fetchone()
        return row[0] if row else None

    def start_compaction(self, interval_s: float = COMPACT_INTERVAL_S, settle_s: float = COMPACT_SETTLE_S) -> None:
        """Run compaction in a background thread of this process every ``interval_s`` (skipped while another
        process of the same database compacted within the interval). Idempotent; close() stops it."""
        if self._compactor is not None and self._compactor.is_alive():
            return
        stop = self._compactor_stop = threading.Event()

        def loop() -> None:
            # a short wait first: a server that stops right after its first checkpoint (the one at shutdown) does
            # not start a compaction then
            stop.wait(min(interval_s, 5.0))
            while not stop.is_set():
                try:
                    last = self.last_compaction_ms()
                    if last is None or now_ms() - last >= interval_s * 1000 * 0.9:
                        self.compact(settle_s=settle_s, stop=stop)
                except StorageError as exc:
                    log.warning("compaction: %s", exc)
                except Exception:  # noqa: BLE001 (never let the thread die silently)
                    if stop.is_set():
                        return
                    log.exception("compaction failed")
                stop.wait(interval_s)

        self._compactor = threading.Thread(target=loop, name="storage-compaction", daemon=True)
        self._compactor.start()

    def ping(self) -> bool:
        try:
            return self._reader().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor_stop.set()
            self._compactor.join(timeout=60)
        with self._write_lock:
            self._close_writer()
        with self._readers_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
        self._local = threading.local()


# packed frames -------------------------------------------------------------------------------------------------------
# Compaction moves frames out of `frames` (one row per frame: ~180 B on disk) into one block per (camera, epoch,
# capture hour): the block's columns (seq, capture and stored times delta-coded, class, confidence, model index,
# payload length; each byte-transposed so that zlib finds the zero high bytes) and the concatenated payloads, in one
# zlib stream. A frame is in exactly one of the two parts: compaction inserts a block and deletes its rows in one
# transaction, and writers look a batch's (camera, epoch, seq range) up in frame_blocks_by_seq before inserting.

# (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload or its length, prediction, confidence)
ReadRow = tuple


def _shuffle(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(len(a), a.itemsize).T.tobytes()


def _unshuffle(buf: bytes, offset: int, n: int, dtype) -> tuple[np.ndarray, int]:
    dt = np.dtype(dtype)
    size = n * dt.itemsize
    a = np.frombuffer(buf, np.uint8, size, offset).reshape(dt.itemsize, n).T.copy().view(dt).ravel()
    return a, offset + size


_INTS = (np.int8, np.int16, np.int32, np.int64)
_HEAD = struct.Struct("<BI3q7B")  # flags, n, first seq / capture / stored time, the 7 column widths


def _narrow(a: np.ndarray) -> tuple[int, np.ndarray]:
    """The narrowest signed integer type holding ``a`` (its code in _INTS) and ``a`` in it."""
    lo, hi = (int(a.min()), int(a.max())) if len(a) else (0, 0)
    for code, dt in enumerate(_INTS):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return code, a.astype(dt)
    return 3, a.astype(np.int64)


def encode_block(rows: Sequence[FrameRow]) -> tuple[bytes, list[str]]:
    """One block from the rows of one camera and epoch (any order; stored in seq order). Returns (data, models).

    Layout: a header (flags, frame count, the first seq / capture time / stored time, each column's width), the
    columns zlib-compressed (seq, capture and stored time as deltas, class, confidence, model index, payload length;
    each in the narrowest integer type that holds it and byte-transposed, so zlib sees long runs), then the payloads
    as they are (range-coded bytes do not compress; reading a block's times and classes never touches them).
    Lossless: decode_block gives the rows back exactly (confidences as float32 where that is exact, else float64)."""
    rows = sorted(rows, key=lambda r: r[2])
    n = len(rows)
    seq = np.fromiter((r[2] for r in rows), np.int64, n)
    ts = np.fromiter((r[3] for r in rows), np.int64, n)
    stored = np.fromiter((r[4] for r in rows), np.int64, n)
    models = sorted({r[5] for r in rows})
    index = {m: i for i, m in enumerate(models)}
    model_idx = np.fromiter((index[r[5]] for r in rows), np.int64, n)
    pred = np.fromiter((r[7] for r in rows), np.int64, n)
    conf = np.fromiter((r[8] for r in rows), np.float64, n)
    with np.errstate(over="ignore", invalid="ignore"):
        conf32 = conf.astype(np.float32)
    exact32 = bool(np.array_equal(conf32.astype(np.float64), conf, equal_nan=True))
    lengths = np.fromiter((len(r[6]) for r in rows), np.int64, n)
    widths, parts = [], []
    for column in (np.diff(seq, prepend=seq[:1]), np.diff(ts, prepend=ts[:1]), np.diff(stored, prepend=stored[:1]),
                   pred, model_idx, lengths):
        code, narrow = _narrow(column)
        widths.append(code)
        parts.append(_shuffle(narrow))
    parts.insert(3, _shuffle(conf32 if exact32 else conf))
    widths.insert(3, 2 if exact32 else 3)
    columns = zlib.compress(b"".join(parts), 6)
    head = _HEAD.pack(1 if exact32 else 0, n, int(seq[0]), int(ts[0]), int(stored[0]), *widths)
    return head + len(columns).to_bytes(4, "little") + columns + b"".join(bytes(r[6]) for r in rows), models


@dataclass
class Block:
    """A decoded block: numpy columns in seq order, the payloads by offset."""
    camera_id: str
    epoch: int
    seq: np.ndarray
    ts: np.ndarray
    stored: np.ndarray
    pred: np.ndarray
    conf: np.ndarray
    model_idx: np.ndarray
    models: list[str]
    lengths: np.ndarray
    offsets: np.ndarray
    body: bytes

    def payload(self, i: int) -> bytes:
        return self.body[self.offsets[i]:self.offsets[i] + self.lengths[i]]

    def rows(self, index: Iterable[int] | None = None, payload: bool = True) -> list[ReadRow]:
        """Rows in FrameRow order (payload bytes, or its length when ``payload`` is False)."""
        idx = range(len(self.seq)) if index is None else index
        seq, ts, stored, pred = self.seq.tolist(), self.ts.tolist(), self.stored.tolist(), self.pred.tolist()
        conf, midx, lengths = self.conf.tolist(), self.model_idx.tolist(), self.lengths.tolist()
        cam, epoch, models = self.camera_id, self.epoch, self.models
        return [(cam, epoch, seq[i], ts[i], stored[i], models[midx[i]], self.payload(i) if payload else lengths[i],
                 pred[i], conf[i]) for i in idx]


def decode_block(camera_id: str, epoch: int, models_json: str | list[str], fmt: int, data: bytes) -> Block:
    if fmt != BLOCK_FORMAT:
        raise StorageError(f"frame block of camera {camera_id!r} has format {fmt}; this taskcodec reads "
                           f"{BLOCK_FORMAT}: upgrade taskcodec")
    data = bytes(data)
    flags, n, seq0, ts0, stored0, *widths = _HEAD.unpack_from(data)
    at = _HEAD.size
    size = int.from_bytes(data[at:at + 4], "little")
    body = zlib.decompress(data[at + 4:at + 4 + size])
    payload_at = at + 4 + size
    models = json.loads(models_json) if isinstance(models_json, str) else models_json
    cols, off = [], 0
    for k, code in enumerate(widths):
        dt = (np.float32 if code == 2 else np.float64) if k == 3 else _INTS[code]
        a, off = _unshuffle(body, off, n, dt)
        cols.append(a)
    dseq, dts, dstored, conf, pred, midx, lengths = cols
    seq = np.cumsum(dseq, dtype=np.int64) + seq0
    ts = np.cumsum(dts, dtype=np.int64) + ts0
    stored = np.cumsum(dstored, dtype=np.int64) + stored0
    lengths = lengths.astype(np.int64)
    offsets = payload_at + np.concatenate(([0], np.cumsum(lengths[:-1]))) if n else np.zeros(0, np.int64)
    return Block(camera_id, int(epoch), seq, ts, stored, pred.astype(np.int64), conf.astype(np.float64),
                 midx.astype(np.int64), models, lengths, offsets.astype(np.int64), data)



@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection):
    """One read snapshot for a reader that reads both parts (a compaction committing between its reads of the frames
    table and of the blocks would otherwise show the moved frames twice or not at all). Nested use joins the
    transaction already open."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _in_snapshot(fn):
    """Run a reader of both parts (its first argument: the connection) inside one read snapshot."""
    @functools.wraps(fn)
    def reader(conn: sqlite3.Connection, *args, **kwargs):
        with snapshot(conn):
            return fn(conn, *args, **kwargs)
    return reader


def _no_blocks_table(exc: sqlite3.OperationalError) -> bool:
    return "no such table: frame_blocks" in str(exc)  # a database not migrated yet (readers that do not migrate)


def _overlapping_blocks(conn: sqlite3.Connection, camera_id: str, epoch: int, lo: int, hi: int) -> list[Block]:
    """Decoded blocks of (camera, epoch) whose seq range meets [lo, hi] (frame_blocks_by_seq)."""
    try:
            rows = conn.execute("SELECT models, format, data FROM frame_blocks INDEXED BY frame_blocks_by_seq "
                            "WHERE camera_id = ? AND epoch = ? AND seq_hi >= ? AND seq_lo <= ?",
                            (camera_id, epoch, lo, hi)).fetchall()
    except sqlite3.OperationalError as exc:
        if _no_blocks_table(exc):
            return []
        raise
    return [decode_block(camera_id, epoch, m, f, d) for m, f, d in rows]


def _has_overlap(conn: sqlite3.Connection, camera_id: str, epoch: int, lo: int, hi: int) -> bool:
    return conn.execute("SELECT 1 FROM frame_blocks INDEXED BY frame_blocks_by_seq WHERE camera_id = ? AND epoch = ? "
                        "AND seq_hi >= ? AND seq_lo <= ? LIMIT 1", (camera_id, epoch, lo, hi)).fetchone() is not None


def _packed_payloads(conn: sqlite3.Connection, camera_id: str, epoch: int, seqs: Sequence[int]) -> dict[int, bytes]:
    """seq -> payload of the packed frames among ``seqs`` of one camera and epoch."""
    out: dict[int, bytes] = {}
    if not seqs:
        return out
    wanted = set(seqs)
    for b in _overlapping_blocks(conn, camera_id, epoch, min(seqs), max(seqs)):
        for i in np.flatnonzero(np.isin(b.seq, np.fromiter(wanted, np.int64, len(wanted)))).tolist():
            out[int(b.seq[i])] = b.payload(i)
    return out


@dataclass(frozen=True)
class FrameFilter:
    """What the readers select (every field optional): capture time in [since, until), cameras, classes, models,
    a lowest confidence. The same filter applies to the recent rows (SQL, ``hot_where``) and to the packed blocks."""
    cameras: tuple[str, ...] = ()
    predictions: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    since: int | None = None
    until: int | None = None
    min_confidence: float | None = None

    def hot_where(self) -> tuple[str, list]:
        where, args = [], []
        for column, values in (("camera_id", self.cameras), ("prediction", self.predictions),
                               ("model_id", self.models)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if self.since is not None:
            where.append("ts_capture_ms >= ?")
            args.append(self.since)
        if self.until is not None:
            where.append("ts_capture_ms < ?")
            args.append(self.until)
        if self.min_confidence is not None:
            where.append("confidence >= ?")
            args.append(self.min_confidence)
        return " AND ".join(where) or "1", args

    def hours(self) -> tuple[int | None, int | None]:
        """The capture hours a matching frame may lie in (inclusive bounds, None: open)."""
        return (None if self.since is None else self.since // HOUR_MS,
                None if self.until is None else (self.until - 1) // HOUR_MS)

    def block_where(self, hours: tuple[int | None, int | None] | None = None) -> tuple[str, list]:
        lo, hi = hours or self.hours()
        where, args = [], []
        if self.cameras:
            where.append(f"camera_id IN ({', '.join('?' * len(self.cameras))})")
            args.extend(self.cameras)
        if lo is not None:
            where.append("hour >= ?")
            args.append(lo)
        if hi is not None:
            where.append("hour <= ?")
            args.append(hi)
        return " AND ".join(where) or "1", args

    def mask(self, b: Block) -> np.ndarray | None:
        """Which of a block's frames match (None: none can, from the block's models alone)."""
        m = np.ones(len(b.seq), bool)
        if self.models:
            wanted = [i for i, name in enumerate(b.models) if name in self.models]
            if not wanted:
                return None
            m &= np.isin(b.model_idx, wanted)
        if self.predictions:
            m &= np.isin(b.pred, list(self.predictions))
        if self.since is not None:
            m &= b.ts >= self.since
        if self.until is not None:
            m &= b.ts < self.until
        if self.min_confidence is not None:
            m &= b.conf >= self.min_confidence
        return m


_HOT_COLUMNS = "camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, {payload}, prediction, confidence"


def hot_frames_sql(f: FrameFilter, *, order: str = "asc", after: tuple | None = None, limit: int = 1000,
                   payload: bool = False) -> tuple[str, list]:
    """The recent part (the frames table) in (ts_capture_ms, camera_id, epoch, seq) order, after the key ``after``.
    Named cameras: their rows through the primary key (camera_id first), sorted by time (only the recent rows that
    compaction has not packed); otherwise frames_by_time gives the order."""
    sql, args = f.hot_where()
    if after is not None:
        sql += f" AND (ts_capture_ms, camera_id, epoch, seq) {'>' if order == 'asc' else '<'} (?, ?, ?, ?)"
        args.extend(after)
    direction = "ASC" if order == "asc" else "DESC"
    by = ", ".join(f"{c} {direction}" for c in ("ts_capture_ms", "camera_id", "epoch", "seq"))
    cols = _HOT_COLUMNS.format(payload="payload" if payload else "length(payload)")
    return f"SELECT {cols} FROM frames WHERE {sql} ORDER BY {by} LIMIT ?", [*args, limit]


def _time_key(r: ReadRow) -> tuple:
    return (r[3], r[0], r[1], r[2])


def decode_keys(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A block's (seq, capture time) columns alone: only the head of its zlib stream is inflated (they come first)."""
    data = bytes(data)
    flags, n, seq0, ts0, stored0, *widths = _HEAD.unpack_from(data)
    at = _HEAD.size
    size = int.from_bytes(data[at:at + 4], "little")
    need = n * (np.dtype(_INTS[widths[0]]).itemsize + np.dtype(_INTS[widths[1]]).itemsize)
    body = zlib.decompressobj().decompress(data[at + 4:at + 4 + size], need)
    dseq, off = _unshuffle(body, 0, n, _INTS[widths[0]])
    dts, _ = _unshuffle(body, off, n, _INTS[widths[1]])
    return np.cumsum(dseq, dtype=np.int64) + seq0, np.cumsum(dts, dtype=np.int64) + ts0


def _after_mask(seq: np.ndarray, ts: np.ndarray, cam: str, epoch: int, after: tuple, desc: bool) -> np.ndarray:
    """Which frames of one camera and epoch come strictly after the cursor key ``after`` in the listing order."""
    a_ts, a_key = after[0], tuple(after[1:])
    same = (cam, epoch) == a_key[:2]
    if not desc:
        tie = (cam, epoch) > a_key[:2]
        return (ts > a_ts) | ((ts == a_ts) & (tie | (same & (seq > a_key[2]))))
    tie = (cam, epoch) < a_key[:2]
    return (ts < a_ts) | ((ts == a_ts) & (tie | (same & (seq < a_key[2]))))


@_in_snapshot
def select_frames(conn: sqlite3.Connection, f: FrameFilter, *, order: str = "asc", after: tuple | None = None,
                  limit: int = 1000, payload: bool = False) -> list[ReadRow]:
    """Frames matching ``f`` from both parts (recent rows and packed blocks), in (capture time, camera, epoch, seq)
    order (``order`` asc or desc), strictly after the key ``after`` (a cursor), at most ``limit``. Blocks are read in
    capture-hour order and the scan stops once ``limit`` frames are known to come first. Without class, model or
    confidence filters only the blocks' keys are decoded to choose the frames, then only the blocks that hold them."""
    sql, args = hot_frames_sql(f, order=order, after=after, limit=limit, payload=payload)
    out = [tuple(r) for r in conn.execute(sql, args)]
    desc = order == "desc"
    lo, hi = f.hours()
    if after is not None:
        h = after[0] // HOUR_MS
        lo, hi = (lo, h if hi is None else min(hi, h)) if desc else (h if lo is None else max(lo, h), hi)
    where, bargs = f.block_where((lo, hi))
    keys_only = not (f.predictions or f.models or f.min_confidence is not None)
    # candidates: (ts, camera, epoch, seq, hour) of packed frames, or whole rows when blocks are decoded in full
    packed: list[tuple] = []
    # the capture time of the limit-th frame so far: a page the recent rows fill already (the newest frames, or a
    # range starting in the rows) reads only the blocks that reach that time (usually none)
    rows_cutoff = cutoff = out[limit - 1][3] if len(out) >= limit else None
    for bound, value in (("ts_hi >= ?", f.since), ("ts_lo < ?", f.until),
                         ("ts_hi >= ?" if desc else "ts_lo <= ?", cutoff)):
        if value is not None:  # blocks wholly outside the range, or past the rows' cutoff: not read
            where += f" AND {bound}"
            bargs.append(value)
    for cam, epoch, hour, models, fmt, data in conn.execute(
            f"SELECT camera_id, epoch, hour, models, format, data FROM frame_blocks WHERE {where} "
            f"ORDER BY hour {'DESC' if desc else 'ASC'}", bargs):
        if cutoff is not None and (hour * HOUR_MS > cutoff if not desc else (hour + 1) * HOUR_MS - 1 < cutoff):
            break
        if fmt != BLOCK_FORMAT:
            decode_block(cam, epoch, models, fmt, data)  # raises the format error
        if keys_only:
            b, (seq, ts) = None, decode_keys(data)
            m = np.ones(len(seq), bool)
            if f.since is not None:
                m &= ts >= f.since
            if f.until is not None:
                m &= ts < f.until
        else:
            b = decode_block(cam, epoch, models, fmt, data)
            seq, ts = b.seq, b.ts
            m = f.mask(b)
            if m is None:
                continue
        if after is not None:
            m &= _after_mask(seq, ts, cam, epoch, after, desc)
        idx = np.flatnonzero(m)
        if cutoff is not None:  # only frames that can still be among the first ``limit``
            idx = idx[ts[idx] >= cutoff] if desc else idx[ts[idx] <= cutoff]
        if not len(idx):
            continue
        if len(idx) > limit:  # one camera and epoch: the key order is (time, seq); keep this block's first limit
            by_key = np.lexsort((seq[idx], ts[idx]))
            idx = idx[by_key[::-1][:limit] if desc else by_key[:limit]]
        if keys_only:
            packed.extend(zip(ts[idx].tolist(), [cam] * len(idx), [epoch] * len(idx), seq[idx].tolist(),
                              [hour] * len(idx)))
        else:
            packed.extend(b.rows(idx.tolist(), payload))
        if len(packed) >= limit:
            packed.sort(key=(lambda r: r[:4]) if keys_only else _time_key, reverse=desc)
            del packed[limit:]
            cutoff = packed[-1][0] if keys_only else packed[-1][3]
            if rows_cutoff is not None:
                cutoff = max(cutoff, rows_cutoff) if desc else min(cutoff, rows_cutoff)
    if keys_only and packed:  # the rows of the chosen frames, one decode per block that holds some
        chosen: dict[tuple[str, int, int], list[int]] = {}
        for _, cam, epoch, seq, hour in packed:
            chosen.setdefault((cam, epoch, hour), []).append(seq)
        packed = []
        for (cam, epoch, hour), seqs in chosen.items():
            models, fmt, data = conn.execute("SELECT models, format, data FROM frame_blocks WHERE camera_id = ? AND "
                                             "epoch = ? AND hour = ?", (cam, epoch, hour)).fetchone()
            b = decode_block(cam, epoch, models, fmt, data)
            packed.extend(b.rows(np.searchsorted(b.seq, np.array(seqs, np.int64)).tolist(), payload))
    out.extend(packed)
    out.sort(key=_time_key, reverse=desc)
    return out[:limit]


@_in_snapshot
def camera_frames(conn: sqlite3.Connection, camera_id: str, *, since_seq: int | None = None,
                  since_ts: int | None = None, epoch: int | None = None, limit: int = 100) -> list[ReadRow]:
    """One camera's frames in (epoch, seq) order from both parts, after ``since_seq`` / captured after ``since_ts``
    (payload lengths, not payloads)."""
    where, args = ["camera_id = ?"], [camera_id]
    bwhere, bargs = ["camera_id = ?"], [camera_id]
    if epoch is not None:
        where.append("epoch = ?")
        bwhere.append("epoch = ?")
        args.append(epoch)
        bargs.append(epoch)
    if since_seq is not None:
        where.append("seq > ?")
        bwhere.append("seq_hi > ?")
        args.append(since_seq)
        bargs.append(since_seq)
    if since_ts is not None:
        where.append("ts_capture_ms > ?")
        bwhere.append("ts_hi > ?")
        args.append(since_ts)
        bargs.append(since_ts)
    out = [tuple(r) for r in conn.execute(
        f"SELECT {_HOT_COLUMNS.format(payload='length(payload)')} FROM frames WHERE {' AND '.join(where)} "
        "ORDER BY epoch, seq LIMIT ?", (*args, limit))]
    packed: list[ReadRow] = []
    kth = None
    for cam, ep, seq_lo, models, fmt, data in conn.execute(
            f"SELECT camera_id, epoch, seq_lo, models, format, data FROM frame_blocks WHERE {' AND '.join(bwhere)} "
            "ORDER BY epoch, seq_lo", bargs):
        if kth is not None and (ep, seq_lo) > kth:
            break
        b = decode_block(cam, ep, models, fmt, data)
        m = np.ones(len(b.seq), bool)
        if since_seq is not None:
            m &= b.seq > since_seq
        if since_ts is not None:
            m &= b.ts > since_ts
        packed.extend(b.rows(np.flatnonzero(m)[:limit].tolist(), payload=False))  # in seq order already
        if len(packed) >= limit:
            packed.sort(key=lambda r: (r[1], r[2]))
            del packed[limit:]
            kth = (packed[-1][1], packed[-1][2])
    out.extend(packed)
    out.sort(key=lambda r: (r[1], r[2]))
    return out[:limit]


def hot_counts_sql(f: FrameFilter, interval_ms: int, by_camera: bool, with_bytes: bool = False) -> tuple[str, list]:
    """Counts by (bucket, camera or NULL, class) of the recent part: from frames_by_time alone unless ``with_bytes``
    (payload sizes are in the table); named cameras' rows are found through the primary key and read from the
    table."""
    where, args = f.hot_where()
    cam = "camera_id" if by_camera else "NULL"
    extra = ", sum(length(payload))" if with_bytes else ""
    return (f"SELECT (ts_capture_ms / ?) * ? AS bucket, {cam} AS cam, prediction, count(*){extra} FROM frames "
            f"WHERE {where} GROUP BY bucket, cam, prediction ORDER BY bucket, cam, prediction",
            [interval_ms, interval_ms, *args])


@_in_snapshot
def count_frames(conn: sqlite3.Connection, f: FrameFilter, interval_ms: int, *, by_camera: bool = False,
                 with_bytes: bool = False) -> dict[tuple[int, str | None, int], list[int]]:
    """Frame counts (and payload bytes when ``with_bytes``) per (bucket start, camera or None, class) over both
    parts, from the insert-time counters where the range allows, else from the rows and blocks themselves.

    Counters (no confidence filter): all cameras together (no camera filter, not ``by_camera``) per hour and per
    minute (fleet_counts), per camera per hour (frame_rollup), usable when the bucket is a whole number of their
    cells. The range is cut into whole cells of the coarsest counter, then of the next, down to pieces of the
    finest cell at the range's two ends; such a piece is answered from its cell's counters when each counter row's
    capture-time bounds lie wholly inside the piece or wholly outside it (a range ending after the newest frame, or
    starting before the oldest), else from the rows and blocks of the piece alone (``_count_exact``)."""
    out: dict[tuple[int, str | None, int], list[int]] = {}

    def add(bucket: int, cam: str | None, pred: int, n: int, nbytes: int) -> None:
        acc = out.setdefault((bucket, cam if by_camera else None, pred), [0, 0])
        acc[0] += n
        acc[1] += nbytes if with_bytes else 0

    levels = _counter_levels(conn, f, interval_ms, by_camera)
    if not levels:
        _count_exact(conn, f, interval_ms, by_camera, with_bytes, add)
        return out
    whole, edges = _split_range(f.since, f.until, [unit for unit, _ in levels])
    table = dict(levels)
    for unit, lo, hi in whole:
        sql, args, cell_column = _counter_sql(table[unit], unit, f, by_camera)
        sql += (f" AND {cell_column} >= ?" if lo is not None else "") + \
            (f" AND {cell_column} <= ?" if hi is not None else "")
        args += [x for x in (lo, hi) if x is not None]
        for cell, cam, pred, n, nbytes, _, _ in conn.execute(sql, args):
            add(cell * unit // interval_ms * interval_ms, cam, pred, n, nbytes)
    for unit, cell, a, b in edges:
        sql, args, cell_column = _counter_sql(table[unit], unit, f, by_camera)
        rows = conn.execute(f"{sql} AND {cell_column} = ?", [*args, cell]).fetchall()
        if all(t0 is not None and t1 is not None and (a <= t0 and t1 < b or t1 < a or t0 >= b)
               for *_, t0, t1 in rows):
            for _, cam, pred, n, nbytes, t0, t1 in rows:
                if a <= t0 and t1 < b:
                    add(cell * unit // interval_ms * interval_ms, cam, pred, n, nbytes)
        else:  # counted frames on both sides of the piece's end: count the piece itself
            _count_exact(conn, FrameFilter(f.cameras, f.predictions, f.models, a, b, f.min_confidence), interval_ms,
                         by_camera, with_bytes, add)
    return out


def _counter_levels(conn: sqlite3.Connection, f: FrameFilter, interval_ms: int,
                    by_camera: bool) -> list[tuple[int, str]]:
    """The counters a count may read, coarsest first: (cell width in ms, "fleet" or "camera")."""
    if f.min_confidence is not None or conn.execute("PRAGMA user_version").fetchone()[0] < COUNTERS_VERSION:
        return []
    if by_camera or f.cameras:
        return [(HOUR_MS, "camera")] if interval_ms % HOUR_MS == 0 else []
    return [(unit, "fleet") for unit in sorted(FLEET_UNITS, reverse=True) if interval_ms % unit == 0]


def _counter_sql(kind: str, unit: int, f: FrameFilter, by_camera: bool) -> tuple[str, list, str]:
    """SELECT cell, camera or NULL, class, frames, payload bytes, ts_min, ts_max FROM the counter, filtered by
    camera, class and model (the caller adds the bounds on the cell column, the third item returned)."""
    if kind == "camera":
        sql = (f"SELECT hour, {'camera_id' if by_camera else 'NULL'}, prediction, frames, payload_bytes, "
               "ts_min, ts_max FROM frame_rollup WHERE 1")
        args: list = []
        filters = (("camera_id", f.cameras), ("prediction", f.predictions), ("model_id", f.models))
    else:
        sql = ("SELECT cell, NULL, prediction, frames, payload_bytes, ts_min, ts_max FROM fleet_counts "
               "WHERE unit_ms = ?")
        args = [unit]
        filters = (("prediction", f.predictions), ("model_id", f.models))
    for column, values in filters:
        if values:
            sql += f" AND {column} IN ({', '.join('?' * len(values))})"
            args.extend(values)
    return sql, args, "hour" if kind == "camera" else "cell"


def _split_range(since: int | None, until: int | None, units: list[int]
                 ) -> tuple[list[tuple[int, int | None, int | None]], list[tuple[int, int, int, int]]]:
    """Cut [since, until) (None: open) into runs of whole cells, coarsest unit first: [(unit, first cell, last cell)]
    (None: open), and the pieces left at the ends, each inside one cell of the finest unit: [(unit, cell, a, b)]."""
    whole: list[tuple[int, int | None, int | None]] = []
    pieces: list[tuple[int | None, int | None]] = [(since, until)]
    for unit in units:
        rest = []
        for a, b in pieces:
            lo = None if a is None else -(-a // unit)
            hi = None if b is None else b // unit - 1
            if lo is None or hi is None or lo <= hi:
                whole.append((unit, lo, hi))
                if a is not None and a < lo * unit:
                    rest.append((a, lo * unit))
                if b is not None and (hi + 1) * unit < b:
                    rest.append(((hi + 1) * unit, b))
            elif a < b:
                rest.append((a, b))
        pieces = rest
    unit = units[-1]
    edges = []
    for a, b in pieces:  # no whole cell inside: at most two cells
        while a < b:
            cell = a // unit
            end = min(b, (cell + 1) * unit)
            edges.append((unit, cell, a, end))
            a = end
    return whole, edges


def _count_exact(conn: sqlite3.Connection, f: FrameFilter, interval_ms: int, by_camera: bool, with_bytes: bool,
                 add) -> None:
    """Count the frames matching ``f`` from the rows (hot_counts_sql) and the blocks of the range's hours (decoded),
    passing each (bucket, camera or None, class, frames, bytes) to ``add``."""
    sql, args = hot_counts_sql(f, interval_ms, by_camera, with_bytes)
    for row in conn.execute(sql, args):
        add(row[0], row[1], row[2], row[3], row[4] or 0 if with_bytes else 0)
    where, bargs = f.block_where()
    if f.since is not None:  # blocks wholly outside the range need no decoding
        where += " AND ts_hi >= ?"
        bargs.append(f.since)
    if f.until is not None:
        where += " AND ts_lo < ?"
        bargs.append(f.until)
    try:
        blocks = conn.execute(f"SELECT camera_id, epoch, hour, models, format, data FROM frame_blocks "
                              f"INDEXED BY frame_blocks_by_hour WHERE {where}", bargs).fetchall()
    except sqlite3.OperationalError as exc:
        if _no_blocks_table(exc):
            return
        raise
    for cam, epoch, hour, models, fmt, data in blocks:
        b = decode_block(cam, epoch, models, fmt, data)
        m = f.mask(b)
        if m is None or not m.any():
            continue
        buckets = b.ts[m] // interval_ms
        preds = b.pred[m]
        lengths = b.lengths[m]
        base = int(buckets.min())
        span = int(preds.max()) - int(preds.min()) + 1
        keys = (buckets - base) * span + (preds - preds.min())  # one integer per (bucket, class)
        uniq, inverse = np.unique(keys, return_inverse=True)
        ns = np.bincount(inverse, minlength=len(uniq))
        nb = np.bincount(inverse, weights=lengths, minlength=len(uniq)) if with_bytes else ns * 0
        low = int(preds.min())
        for key, n, nbytes in zip(uniq.tolist(), ns.tolist(), nb.tolist()):
            add((base + key // span) * interval_ms, cam, low + key % span, n, int(nbytes))


@_in_snapshot
def frames_by_keys(conn: sqlite3.Connection, keys: Sequence[tuple[str, int, int]], model_id: str | None = None
                   ) -> list[ReadRow]:
    """The stored frames (with payloads) of the given (camera, epoch, seq) keys, from either part, in key order of
    ``keys`` (missing keys, or frames of another model than ``model_id``, are left out)."""
    out = []
    for cam, epoch, seq in keys:
        row = conn.execute(f"SELECT {_HOT_COLUMNS.format(payload='payload')} FROM frames WHERE camera_id = ? AND "
                           "epoch = ? AND seq = ?", (cam, int(epoch), int(seq))).fetchone()
        if row is None:
            for b in _overlapping_blocks(conn, cam, int(epoch), int(seq), int(seq)):
                i = np.flatnonzero(b.seq == int(seq))
                if len(i):
                    row = b.rows([int(i[0])])[0]
                    break
        if row is not None and (model_id is None or row[5] == model_id):
            out.append(tuple(row))
    return out


def frames_of_model(conn: sqlite3.Connection, model_id: str) -> Iterator[ReadRow]:
    """Every stored frame (with payload) classified by ``model_id``, from both parts (recent rows first)."""
    with snapshot(conn):
        yield from _frames_of_model(conn, model_id)


def _frames_of_model(conn: sqlite3.Connection, model_id: str) -> Iterator[ReadRow]:
    for row in conn.execute(f"SELECT {_HOT_COLUMNS.format(payload='payload')} FROM frames WHERE model_id = ?",
                            (model_id,)):
        yield tuple(row)
    f = FrameFilter(models=(model_id,))
    try:
        # the camera-hours that hold the model's frames, from the narrow rollup; then those blocks by key
        blocks = conn.execute("SELECT b.camera_id, b.epoch, b.models, b.format, b.data FROM (SELECT DISTINCT "
                              "camera_id, hour FROM frame_rollup WHERE model_id = ?) r JOIN frame_blocks b ON "
                              "b.camera_id = r.camera_id AND b.hour = r.hour WHERE instr(b.models, ?) > 0",
                              (model_id, json.dumps(model_id))).fetchall()
    except sqlite3.OperationalError as exc:
        if _no_blocks_table(exc):
            return
        raise
    for cam, epoch, models, fmt, data in blocks:
        b = decode_block(cam, epoch, models, fmt, data)
        m = f.mask(b)
        if m is not None and m.any():
            yield from b.rows(np.flatnonzero(m).tolist())


def model_has_frames(conn: sqlite3.Connection, model_id: str) -> bool:
    """Whether any stored frame (either part) was classified by ``model_id``."""
    if conn.execute("SELECT 1 FROM frames WHERE model_id = ? LIMIT 1", (model_id,)).fetchone():
        return True
    try:
        return conn.execute("SELECT 1 FROM frame_rollup WHERE model_id = ? LIMIT 1", (model_id,)).fetchone() is not None
    except sqlite3.OperationalError:  # a database older than the packed part
        return False


def packed_totals(conn: sqlite3.Connection) -> dict[str, tuple]:
    """Per camera, what compaction has moved so far: (generation, frames, payload_bytes, last_stored_ms,
    last_capture_ms, model_id of the newest moved frame). Counts only grow (retention does not lower them)."""
    return {r[0]: tuple(r[1:]) for r in conn.execute(
        "SELECT camera_id, generation, frames, payload_bytes, last_stored_ms, last_capture_ms, model_id "
        "FROM packed_cameras")}


def open_storage(path: str | Path) -> SQLiteStorage:
    return SQLiteStorage(path)

