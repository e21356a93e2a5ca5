"""Durable store-and-forward spool: every encoded frame is on disk before it is sent, and leaves only when acked.

SQLite in WAL mode with ``synchronous=FULL`` makes each append durable when it returns (it survives kill -9 and
power loss); frames are keyed by (boot epoch, seq). The epoch is persisted and increases at each open, so sequence
numbers can restart from 0 on every boot without ever colliding with frames of an earlier boot still in the spool.
A new epoch is ``max(last epoch + 1, Unix seconds now)``: a camera whose spool was wiped (new SD card, reinstall)
does not restart at epoch 1 and have its new frames taken for duplicates of old ones by the server.
Frames are handed out oldest epoch first, then by seq.

Policy when full (``max_frames``): the *oldest* frames are deleted to make room and counted as dropped (with a
warning): a camera that cannot reach its server for long keeps its newest view of the world.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "spool.sqlite3"
MAX_EPOCH = 2**32  # the wire format's limit


class SpoolError(RuntimeError):
    """The spool cannot be opened or written (bad path, full disk, corrupt file)."""


@dataclass(frozen=True)
class SpooledFrame:
    epoch: int
    seq: int
    ts_ms: int
    payload: bytes


class Spool:
    def __init__(self, path: str | Path, max_frames: int = 100_000, start_epoch: bool = True, sync: str = "full"):
        """``path`` is a folder (the database file is created inside) or a ``.sqlite3`` file. ``sync="normal"``
        skips the per-frame fsync: still safe against a killed process, but the last frames may be lost on power
        loss (for benchmarks of many simulated cameras on one disk)."""
        if sync not in ("full", "normal"):
            raise SpoolError(f"spool sync must be full or normal, got {sync!r}")
        if max_frames < 1:
            raise SpoolError(f"spool max frames must be at least 1, got {max_frames}")
        path = Path(path).expanduser()
        if path.suffix not in (".sqlite3", ".db", ".sqlite"):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SpoolError(f"cannot create spool folder {path}: {exc}") from exc
            path = path / DB_NAME
        self.path = path
        self.max_frames = max_frames
        self._lock = threading.Lock()
        self.full_drops = 0  # frames this instance dropped because the spool was full
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS frames (epoch INTEGER NOT NULL, seq INTEGER NOT NULL, "
                             "ts_ms INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (epoch, seq)) WITHOUT ROWID")
            with self._tx():
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', 0), ('dropped', 0)")
                if start_epoch:
                    new_epoch = max(self._meta("epoch") + 1, min(int(time.time()), MAX_EPOCH))
                    if new_epoch > MAX_EPOCH:
                        raise SpoolError(f"spool {path} has used up its boot epochs (max {MAX_EPOCH})")
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (new_epoch,))
                self.epoch = self._meta("epoch")
                self._count = self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
                row = self._db.execute("SELECT MAX(seq) FROM frames WHERE epoch = ?", (self.epoch,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        self.next_seq = 0 if row[0] is None else row[0] + 1

    def _tx(self):
        db = self._db

        class _Tx:
            def __enter__(self_):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_, kind, exc, tb):
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def dropped(self) -> int:
        """Frames ever dropped by this spool (full spool or rejected by the server), across restarts."""
        with self._lock:
            return self._meta("dropped")

    def depth(self) -> int:
        """Frames waiting for an ack."""
        return self._count

    def append(self, ts_ms: int, payload: bytes) -> tuple[int, int]:
        """Store one frame durably; returns its (epoch, seq). Makes room by dropping the oldest frames if full."""
        with self._lock:
            seq = self.next_seq
            try:
                with self._tx():
                    excess = self._count + 1 - self.max_frames
                    if excess > 0:
                        n = self._db.execute(
                            "DELETE FROM frames WHERE (epoch, seq) IN (SELECT epoch, seq FROM frames "
                            "ORDER BY epoch, seq LIMIT ?)", (excess,)).rowcount
                        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (n,))
                    else:
                        n = 0
                    self._db.execute("INSERT INTO frames VALUES (?, ?, ?, ?)", (self.epoch, seq, int(ts_ms), payload))
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
            self._count += 1 - n
            self.full_drops += n
            self.next_seq = seq + 1
        if n:
            log.warning("spool full (%d frames): dropped the %d oldest unsent frame(s)", self.max_frames, n)
        return self.epoch, seq

    def pending(self, limit: int, after: tuple[int, int] | None = None) -> list[SpooledFrame]:
        """Up to ``limit`` unacked frames in (epoch, seq) order, strictly after ``after`` if given."""
        with self._lock:
            if after is None:
                rows = self._db.execute("SELECT epoch, seq, ts_ms, payload FROM frames ORDER BY epoch, seq LIMIT ?",
                                        (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT epoch, seq, ts_ms, payload FROM frames WHERE (epoch, seq) > (?, ?) "
                                        "ORDER BY epoch, seq LIMIT ?", (after[0], after[1], limit)).fetchall()
        return [SpooledFrame(e, s, t, bytes(p)) for e, s, t, p in rows]

    def ack(self, epoch: int, first_seq: int, count: int) -> int:
        """The server stored these frames: delete them. Returns how many were still here."""
        return self._delete(epoch, first_seq, count, dropped=False)

    def drop(self, epoch: int, first_seq: int, count: int) -> int:
        """The server will never accept these frames: delete them and count them as dropped."""
        n = self._delete(epoch, first_seq, count, dropped=True)
        if n:
            log.warning("server rejected %d frame(s) (epoch %d, seq %d..%d): dropped", n, epoch, first_seq,
                        first_seq + count - 1)
        return n

    def _delete(self, epoch: int, first_seq: int, count: int, dropped: bool) -> int:
        with self._lock:
            with self._tx():
                n = self._db.execute("DELETE FROM frames WHERE epoch = ? AND seq >= ? AND seq < ?",
                                     (epoch, first_seq, first_seq + count)).rowcount
                if dropped and n:
                    self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (n,))
            self._count -= n
        return n

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
