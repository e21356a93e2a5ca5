"""Where the server keeps cameras and frames: a small interface and its SQLite implementation.

Durability: a camera deletes a frame from its own queue once it is acked, so an ack must only ever follow a commit
that survives a kill -9 *and* a power cut. SQLite in WAL mode with ``synchronous=FULL`` fsyncs the WAL on every commit
(NORMAL would survive kill -9 but may lose the last commits on power loss). The fsync is paid once per transaction, and
the ingest pipeline writes one transaction per micro-batch of messages, so its cost is shared by many frames.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

# (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, prediction, confidence)
FrameRow = tuple[str, int, int, int, int, str, bytes, int, float]

SCHEMA = """
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
-- the query API over all cameras (server/query.py): time ranges, and counts by class per interval from the index alone
CREATE INDEX IF NOT EXISTS frames_by_time ON frames (ts_capture_ms, camera_id, prediction);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    created INTEGER NOT NULL
);
"""


class StorageError(RuntimeError):
    """The database cannot be opened or used."""


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


class Storage(Protocol):
    """What the server needs from a store; SQLite is the one implementation, the protocol keeps it swappable."""

    def add_camera(self, camera_id: str, token_hash: str) -> None: ...
    def remove_camera(self, camera_id: str) -> bool: ...
    def get_camera(self, camera_id: str) -> Camera | None: ...
    def list_cameras(self) -> list[Camera]: ...
    def store_frames(self, rows: Sequence[FrameRow]) -> int: ...
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


class SQLiteStorage:
    """One writer connection (serialised by a lock) and one reader connection per thread; WAL lets them overlap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise StorageError(f"database folder does not exist: {self.path.parent}")
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            self._writer = self._connect()
            self._writer.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one message is exactly one transaction.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    # cameras -----------------------------------------------------------------------------------------------------
    def add_camera(self, camera_id: str, token_hash: str) -> None:
        with self._write_lock:
            try:
                self._writer.execute("INSERT INTO cameras (id, token_hash, created) VALUES (?, ?, ?)",
                                     (camera_id, token_hash, now_ms()))
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"camera {camera_id!r} already exists") from exc

    def remove_camera(self, camera_id: str) -> bool:
        with self._write_lock:
            return self._writer.execute("DELETE FROM cameras WHERE id = ?", (camera_id,)).rowcount > 0

    def get_camera(self, camera_id: str) -> Camera | None:
        row = self._reader().execute("SELECT id, token_hash, created FROM cameras WHERE id = ?",
                                     (camera_id,)).fetchone()
        return Camera(*row) if row else None

    def list_cameras(self) -> list[Camera]:
        rows = self._reader().execute("SELECT id, token_hash, created FROM cameras ORDER BY id").fetchall()
        return [Camera(*r) for r in rows]

    # operators ---------------------------------------------------------------------------------------------------
    def add_operator(self, name: str, key_hash: str, scope: str) -> None:
        with self._write_lock:
            try:
                self._writer.execute("INSERT INTO operators (name, key_hash, scope, created) VALUES (?, ?, ?, ?)",
                                     (name, key_hash, scope, now_ms()))
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"operator {name!r} already exists") from exc

    def remove_operator(self, name: str) -> bool:
        with self._write_lock:
            return self._writer.execute("DELETE FROM operators WHERE name = ?", (name,)).rowcount > 0

    def operator_by_key_hash(self, key_hash: str) -> Operator | None:
        row = self._reader().execute("SELECT name, scope, created FROM operators WHERE key_hash = ?",
                                     (key_hash,)).fetchone()
        return Operator(*row) if row else None

    def list_operators(self) -> list[Operator]:
        return [Operator(*r) for r in
                self._reader().execute("SELECT name, scope, created FROM operators ORDER BY name").fetchall()]

    # frames ------------------------------------------------------------------------------------------------------
    def store_frames(self, rows: Sequence[FrameRow]) -> int:
        """Insert rows in one durable transaction; returns how many were new (the rest were duplicates)."""
        if not rows:
            return 0
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                cur = self._writer.executemany(
                    "INSERT OR IGNORE INTO frames (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, "
                    "payload, prediction, confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                inserted = cur.rowcount
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
        return inserted

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

    def all_keys(self) -> set[tuple[str, int, int]]:
        """Every stored (camera, epoch, seq); for tests and audits."""
        return set(self._reader().execute("SELECT camera_id, epoch, seq FROM frames").fetchall())

    def ping(self) -> bool:
        try:
            return self._reader().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._write_lock:
            self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_storage(path: str | Path) -> SQLiteStorage:
    return SQLiteStorage(path)
