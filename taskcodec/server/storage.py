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

Schema: ``PRAGMA user_version`` holds the schema version; ``migrate()`` (run at open, or `taskcodec db migrate`)
applies the missing steps, one transaction each, with a log line. A database newer than this code refuses to open.
"""

from __future__ import annotations

import logging
import os
import contextlib
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

log = logging.getLogger("taskcodec.server.storage")

# (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, prediction, confidence)
FrameRow = tuple[str, int, int, int, int, str, bytes, int, float]

# Schema steps; step i brings user_version from i to i + 1. Step 0 is the original schema (databases made before
# versioning have user_version 0 and its tables: IF NOT EXISTS makes the step a no-op for them).
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
    CREATE INDEX IF NOT EXISTS frames_by_capture_time ON frames (camera_id, ts_capture_ms);
    """,
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
]
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA = "\n".join(MIGRATIONS)  # the whole current schema, for readers of the code

# WAL policy: SQLite checkpoints (PASSIVE) after a commit once the WAL holds this many pages (4 KiB each) ...
WAL_AUTOCHECKPOINT_PAGES = 256
# ... and truncates the WAL file to at most this many bytes after a checkpoint.
JOURNAL_SIZE_LIMIT = 4 << 20

NEW, DUPLICATE, CONFLICT = 0, 1, 2


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

    ``migrate``: apply missing schema steps at open (else an old schema refuses to open; see `taskcodec db migrate`).
    ``check``: run ``PRAGMA quick_check`` at open and refuse a damaged file.
    """

    def __init__(self, path: str | Path, *, migrate: bool = True, check: bool = False,
                 journal_size_limit: int = JOURNAL_SIZE_LIMIT, wal_autocheckpoint: int = WAL_AUTOCHECKPOINT_PAGES):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise StorageError(f"database folder does not exist: {self.path.parent}")
        self.journal_size_limit = journal_size_limit
        self.wal_autocheckpoint = wal_autocheckpoint
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        try:
            _create_private(self.path)
            _tighten(self.path)
            self._writer = self._connect()
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
            inserted = w.executemany(self._INSERT.replace("INSERT", "INSERT OR IGNORE", 1), rows).rowcount
        return inserted

    def store_batches(self, batches: Sequence[BatchRows]) -> list[list[int] | None]:
        """Store several batches in one durable transaction. Per batch: None if its camera's token is no longer
        the session's (removed or rotated: nothing stored), else one status per row: NEW, DUPLICATE (same key and
        payload already stored) or CONFLICT (same key, another payload: not stored). Raises StorageFull (nothing
        stored) when the disk is full."""
        out: list[list[int] | None] = []
        with self._transaction() as w:
            tokens: dict[str, str | None] = {}
            accepted = []
            for b in batches:
                if b.token_hash is not None:
                    if b.camera_id not in tokens:
                        row = w.execute("SELECT token_hash FROM cameras WHERE id = ?", (b.camera_id,)).fetchone()
                        tokens[b.camera_id] = row[0] if row else None
                    if tokens[b.camera_id] != b.token_hash:
                        out.append(None)
                        continue
                out.append([])
                accepted.append((len(out) - 1, b))
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
        return out

    def _store_rows(self, w: sqlite3.Connection, rows: Sequence[FrameRow]) -> list[int]:
        if not rows:
            return []
        cam, epoch = rows[0][0], rows[0][1]
        seqs = [r[2] for r in rows]
        stored = dict(w.execute("SELECT seq, payload FROM frames WHERE camera_id = ? AND epoch = ? AND seq BETWEEN ? "
                                "AND ?", (cam, epoch, min(seqs), max(seqs))).fetchall())
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
        """Frames of one camera in (epoch, seq) order, after ``since_seq`` / captured after ``since_ts``."""
        where, args = ["camera_id = ?"], [camera_id]
        if epoch is not None:
            where.append("epoch = ?")
            args.append(epoch)
        if since_seq is not None:
            where.append("seq > ?")
            args.append(since_seq)
        if since_ts is not None:
            where.append("ts_capture_ms > ?")
            args.append(since_ts)
        sql = ("SELECT camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, length(payload), prediction, "
               f"confidence FROM frames WHERE {' AND '.join(where)} ORDER BY epoch, seq LIMIT ?")
        return [StoredFrame(*r) for r in self._reader().execute(sql, (*args, limit)).fetchall()]

    def frame_counts(self) -> dict[str, int]:
        rows = self._reader().execute("SELECT camera_id, count(*) FROM frames GROUP BY camera_id").fetchall()
        return dict(rows)

    def delete_before(self, ts_capture_ms: int, chunk: int = 20000) -> int:
        """Retention by age: delete frames captured before ``ts_capture_ms`` in chunks of ``chunk`` rows (one short
        transaction each, found through the frames_by_time index, so ingest is never blocked for long). Returns how
        many were deleted. The file does not shrink; SQLite reuses the freed pages for new frames."""
        total = 0
        while True:
            with self._transaction() as w:
                n = w.execute(
                    "DELETE FROM frames WHERE rowid IN (SELECT rowid FROM frames INDEXED BY frames_by_time "
                    "WHERE ts_capture_ms < ? LIMIT ?)", (int(ts_capture_ms), int(chunk))).rowcount
            total += n
            if n < chunk:
                return total

    def ping(self) -> bool:
        try:
            return self._reader().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False

    def close(self) -> None:
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


def open_storage(path: str | Path) -> SQLiteStorage:
    return SQLiteStorage(path)
