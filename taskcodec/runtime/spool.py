"""Durable store-and-forward spool: every encoded frame is on disk before it is sent, and leaves only when acked.

SQLite in WAL mode with ``synchronous=FULL`` makes each append durable when it returns (it survives kill -9 and
power loss). ``append_many`` stores a window of frames in one transaction (group commit: one fsync for the window;
`runtime capture` hands over one window per ``--batch-window``). What a crash can lose, exactly:

- ``sync="full"`` (the default): nothing that was spooled. A kill -9 or power loss loses only frames the capture loop
  still held in memory (at most one window: ``--batch-window`` seconds, 1.5x that if the source stalled, or
  ``--batch-frames``), which were never spooled, sent or acknowledged. Acked frames whose DELETE was deferred
  (``ack_later``: up to 256 frames / 2 s) come back and are re-sent; the server acknowledges them as duplicates.
- ``sync="normal"``: as above against kill -9 (the operating system keeps what was written); a power loss may also
  lose the frames spooled since the write-ahead log was last synced (its checkpoints), possibly frames already sent.

The server acknowledges a frame only after storing it, and a frame leaves the spool only when acknowledged, so no
acknowledged frame is ever lost. Frames are keyed by (epoch, seq):

- **epoch** is a random 63-bit id drawn (``secrets``) once, when the spool is created, and stored in it. It never
  depends on the camera's clock: a camera whose spool is wiped draws a new one, so frames of its new life can never
  be taken by the server for duplicates of frames it sent before (wire format v2, docs/wire-format.md).
- **seq** counts 0, 1, 2, ... within the epoch and continues across restarts. Every seq ever handed out is either
  still in ``frames`` or below the durable floor ``meta.seq_floor`` (raised in the same transaction that deletes
  rows), so a restart never reuses one.

Every row is tagged with the identity it was captured under (camera id, model id). A spool that still holds unsent
frames of another camera id or model refuses to open (``SpoolError`` naming them): it never relabels frames.

Bounds: ``max_frames`` rows and ``max_bytes`` on disk (database + write-ahead log + shared memory file). The byte
bound is enforced by SQLite itself (``PRAGMA max_page_count``) plus a checkpoint policy that bounds the WAL
(``wal_autocheckpoint``, ``journal_size_limit``, a PASSIVE checkpoint after acks once the WAL passes its budget and
a TRUNCATE checkpoint when the disk is full and at close). When either bound is reached, or the filesystem itself is
full (SQLite "database or disk is full"), the *oldest* frames are deleted to make room and counted as dropped (in
the same transaction, so each frame is counted exactly once): a camera that cannot reach its server for long keeps
its newest view of the world, and never exits because its disk filled.

Damage: at open the database gets ``PRAGMA quick_check``; a damaged spool is moved aside
(``spool.sqlite3.damaged-<UTC time>``, with its -wal/-shm), logged as an error and counted (``damaged_spools`` in the
new spool's counters), never silently emptied. Schema: ``PRAGMA user_version`` = 2; a version-1 spool (no
user_version, clock-based epochs) is migrated in place, its rows attributed to the identity that opens it (logged).
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "spool.sqlite3"
RESERVE_NAME = "spool.reserve"   # space kept aside so a spool on a full disk can still open and drop old frames
RESERVE_BYTES = 128 * 1024
SCHEMA_VERSION = 2
MAX_EPOCH = 2**63 - 1  # the wire format's limit
MIN_MAX_BYTES = 256 * 1024
_INSERT = "INSERT INTO frames VALUES (?, ?, ?, ?, ?)"
_SEQS_IN = "SELECT seq FROM frames WHERE epoch = ? AND seq >= ? AND seq < ?"


def _seq_ranges(seqs: set[int]) -> list[tuple[int, int]]:
    """Sorted seqs as inclusive (lo, hi) runs."""
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
COUNTERS = ("dropped_full", "dropped_rejected", "dropped_disk_full", "damaged_spools")


class SpoolError(RuntimeError):
    """The spool cannot be opened or written (bad path, locked, foreign frames, newer schema)."""


class _OpenFailed(Exception):
    """Opening failed for a reason that is not damage (e.g. the disk is full); retried after freeing the reserve."""


@dataclass(frozen=True)
class SpooledFrame:
    epoch: int
    seq: int
    ts_ms: int
    payload: bytes
    model_id: str = ""   # the model it was captured under (over-the-air rollout: it is sent and decoded under it)


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == 13 or "database or disk is full" in str(exc)  # SQLITE_FULL


class _Tx:
    """``with _Tx(db):`` one IMMEDIATE transaction: committed on success, rolled back on error."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
            self.db.execute("ROLLBACK")


class Spool:
    def __init__(self, path: str | Path, max_frames: int = 100_000, *, max_bytes: int | None = None,
                 camera_id: str = "", model_id: str = "", sync: str = "full", other_models: bool = False):
        """``path`` is a folder (the database file is created inside) or a ``.sqlite3`` file. ``sync="normal"``
        skips the per-frame fsync: still safe against a killed process, but the last frames may be lost on power
        loss (for benchmarks of many simulated cameras on one disk)."""
        if sync not in ("full", "normal"):
            raise SpoolError(f"spool sync must be full or normal, got {sync!r}")
        if max_frames < 1:
            raise SpoolError(f"spool max frames must be at least 1, got {max_frames}")
        if max_bytes is not None and max_bytes < MIN_MAX_BYTES:
            raise SpoolError(f"spool max bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
        path = Path(path).expanduser()
        if path.suffix not in (".sqlite3", ".db", ".sqlite"):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SpoolError(f"cannot create spool folder {path}: {exc}") from exc
            path = path / DB_NAME
        self.path = path
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.camera_id, self.model_id = camera_id, model_id
        # over-the-air rollout (runtime/rollout.py): unsent frames of this camera under other models are kept and sent
        # under their own model (Uplink sends one model per connection) instead of refusing to open
        self.other_models = other_models
        self._lock = threading.Lock()
        self.moved_aside: Path | None = None
        self.unstored = 0          # frames that could not be stored at all (disk full even after dropping)
        self._last_full_log = 0.0
        self.reserve = path.with_name(RESERVE_NAME)
        for attempt in range(2):
            try:
                self._open(path, sync)
                break
            except (_OpenFailed, sqlite3.OperationalError) as exc:
                if attempt or not self._release_reserve():
                    raise SpoolError(f"cannot open spool {path}: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        self._keep_reserve()
        self.made_room = 0
        self._acked_since_ckpt = 0
        # acks whose DELETE is deferred (ack_later): epoch -> seqs; flushed in one transaction per ACK_BATCH frames
        # or ACK_DELAY seconds, before anything that reads or deletes rows by position, and at close
        self._later: dict[int, set[int]] = {}
        self._later_n = 0
        self._later_since = 0.0

    # -- opening ---------------------------------------------------------------------------------------------------
    def _open(self, path: Path, sync: str) -> None:
        wal_damage = None
        marker = path.with_name(path.name + ".open")  # exists while a runtime has the spool open
        wal = Path(str(path) + "-wal")
        if path.exists() and path.stat().st_size > 0 and self.moved_aside is None:
            wal_damage = self._check_wal(wal)  # before SQLite recovers (and trims) it
            if marker.exists() and not wal.exists():
                # an unclean stop leaves its WAL behind (checkpoints never delete it): someone deleted it
                wal_damage = "write-ahead log missing after an unclean stop"
                log.error("SPOOL DAMAGED: %s: its write-ahead log was deleted after an unclean stop; frames written "
                          "since the last checkpoint are lost", path)
            reason = self._damage(path)
            if reason is not None:
                self.moved_aside = self._move_aside(path, reason)
                wal_damage = None
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        try:
            marker.touch()
            self._configure(sync)
            with self._tx():
                self._schema()
                self._identity = self._ident_id()
                self._ident_models = dict(self._db.execute("SELECT id, model_id FROM identities").fetchall())
                if self.moved_aside is not None or wal_damage is not None:
                    self._bump("damaged_spools", 1)
                self.epoch = int(self._meta("epoch"))
                self._count = self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
                row = self._db.execute("SELECT MAX(seq) FROM frames WHERE epoch = ?", (self.epoch,)).fetchone()
                self.next_seq = max(int(self._meta("seq_floor")), 0 if row[0] is None else row[0] + 1)
                self._foreign_check()
        except BaseException:
            self._db.close()
            raise
        # closed by close(), or when the Spool is garbage-collected or the interpreter exits; only a killed process
        # leaves the marker behind (with its WAL)
        self._finalizer = weakref.finalize(self, Spool._final_close, self._db, marker)

    @staticmethod
    def _final_close(db: sqlite3.Connection, marker: Path) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
        except sqlite3.Error:
            return  # not a clean close: keep the marker
        try:
            marker.unlink()
        except OSError:
            pass

    def _release_reserve(self) -> bool:
        """Give the reserve file's space back to the filesystem (the disk is full); True if there was one."""
        try:
            size = self.reserve.stat().st_size
            self.reserve.unlink()
        except OSError:
            return False
        log.error("disk full under spool %s: released its %d-byte reserve to keep working", self.path, size)
        return size > 0

    def _keep_reserve(self) -> None:
        """(Re)create the reserve file when there is room (quietly skipped on a full disk)."""
        if self.reserve.exists():
            return
        try:
            st = os.statvfs(self.reserve.parent)
            if st.f_bavail * st.f_frsize < 4 * RESERVE_BYTES:
                return  # not while the disk is (nearly) full: that space is what the spool works with now
        except OSError:
            return
        try:
            with open(self.reserve, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            try:
                self.reserve.unlink()
            except OSError:
                pass

    @staticmethod
    def _damage(path: Path) -> str | None:
        """None if the file passes PRAGMA quick_check, else what is wrong (locked/busy is not damage: raises)."""
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        try:
            rows = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            return None if rows == ["ok"] else "; ".join(map(str, rows[:5]))
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code in (11, 26) or "malformed" in str(exc) or "not a database" in str(exc):
                return str(exc)  # SQLITE_CORRUPT, SQLITE_NOTADB: damage
            # locked, busy, I/O error, disk full, permissions: the file may be fine; do not touch it
            raise _OpenFailed(str(exc)) from exc
        finally:
            db.close()

    @staticmethod
    def _check_wal(wal: Path) -> str | None:
        """SQLite replays a WAL up to its first frame with a bad checksum and silently ignores the rest, so a garbled
        WAL would lose committed frames without a trace. Verify the chain ourselves: a bad header, or a bad frame
        followed by more than a torn last transaction's worth of frames, is damage: the WAL is copied aside
        (``-wal.damaged-<time>``), logged as an error and counted; SQLite then keeps the valid prefix."""
        try:
            data = wal.read_bytes()
        except OSError:
            return None
        if len(data) < 32:
            return None
        magic, _, page, _, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
        if magic not in (0x377F0682, 0x377F0683):
            problem = "bad WAL header magic"
        else:
            fmt = "<" if magic == 0x377F0682 else ">"

            def checksum(buf: bytes, s0: int, s1: int) -> tuple[int, int]:
                for x0, x1 in struct.iter_unpack(fmt + "2I", buf):
                    s0 = (s0 + x0 + s1) & 0xFFFFFFFF
                    s1 = (s1 + x1 + s0) & 0xFFFFFFFF
                return s0, s1

            s = checksum(data[:24], 0, 0)
            if s != (c1, c2) or not 512 <= page <= 65536:
                problem = "bad WAL header checksum"
            else:
                problem = None
                size, pos = 24 + page, 32
                while pos + size <= len(data):
                    head = data[pos:pos + 24]
                    fs1, fs2, f1, f2 = struct.unpack(">4I", head[8:24])
                    if (fs1, fs2) != (salt1, salt2):
                        break  # frames left over from before a checkpoint reset: not part of this WAL
                    s = checksum(head[:8] + data[pos + 24:pos + size], *s)
                    if s != (f1, f2):
                        later = sum(1 for q in range(pos + size, len(data) - size + 1, size)
                                    if data[q + 8:q + 16] == struct.pack(">2I", salt1, salt2))
                        if later >= 8:
                            problem = f"WAL frame {(pos - 32) // size} fails its checksum, {later} frames after it"
                        break
                    pos += size
        if problem is None:
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        copy = wal.with_name(f"{wal.name}.damaged-{stamp}")
        copy.write_bytes(data)
        log.error("SPOOL DAMAGED: %s: %s; SQLite will keep only the part before the damage, so frames written after "
                  "it are lost. A copy is at %s.", wal, problem, copy)
        return problem

    @staticmethod
    def _move_aside(path: Path, reason: str) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        log.error("SPOOL DAMAGED: %s fails its integrity check (%s); moved it aside to %s and started an empty "
                  "spool. Its unsent frames were NOT sent; recover them with sqlite3 .recover if needed.",
                  path, reason, target)
        return target

    def _configure(self, sync: str) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync.upper()}")
        self._sync = sync.upper()
        self._page = int(db.execute("PRAGMA page_size").fetchone()[0])
        self._apply_budget()

    def _apply_budget(self) -> None:
        """The checkpoint policy and the database's page limit, from ``max_bytes`` and the filesystem's free space:
        the spool may use what it has plus what is free (less a reserve); the WAL is checkpointed every 1/8 of that
        (at most 1000 pages) and truncated back to 2x that, and the database may grow to the rest. Re-applied when
        the disk fills, so a disk shared with other files shrinks the budget instead of wedging the spool."""
        db, page = self._db, self._page
        try:
            st = os.statvfs(self.path.parent)
            avail = self.disk_bytes() + st.f_bavail * st.f_frsize - 64 * 1024
        except OSError:
            avail = 1 << 62
        cap = min(self.max_bytes or (1 << 62), max(avail, 0))
        ckpt_pages = max(8, min(1000, cap // 8 // page))
        self.wal_budget = 2 * ckpt_pages * (page + 24)
        data_pages = max(16, (cap - self.wal_budget - 32 * 1024) // page)
        db.execute(f"PRAGMA max_page_count={data_pages}")  # never below the current size (SQLite keeps that)
        db.execute(f"PRAGMA wal_autocheckpoint={ckpt_pages}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_budget}")
        self.budget_bytes = cap

    def _schema(self) -> None:
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise SpoolError(f"spool {self.path} has schema version {version}, newer than this runtime's "
                             f"{SCHEMA_VERSION}; use a newer runtime or another --spool")
        if version == 0 and "frames" in tables:
            self._migrate_v1()
        elif version == 0:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)")
            db.execute("CREATE TABLE identities (id INTEGER PRIMARY KEY, camera_id TEXT NOT NULL, "
                       "model_id TEXT NOT NULL, UNIQUE (camera_id, model_id))")
            db.execute("CREATE TABLE frames (epoch INTEGER NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, "
                       "ident INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (epoch, seq)) WITHOUT ROWID")
            db.execute("INSERT INTO meta VALUES ('epoch', ?), ('seq_floor', 0)", (secrets.randbits(63),))
            db.executemany("INSERT INTO meta VALUES (?, 0)", [(k,) for k in COUNTERS])
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate_v1(self) -> None:
        """Version 1: meta(epoch = clock seconds, dropped), frames without identity. Old rows keep their epochs
        (<= 2^32, so they cannot collide with new random ones under the same camera) and get the opener's identity."""
        db = self._db
        old_dropped = int(self._meta("dropped") or 0) if self._has_meta("dropped") else 0
        db.execute("CREATE TABLE identities (id INTEGER PRIMARY KEY, camera_id TEXT NOT NULL, "
                   "model_id TEXT NOT NULL, UNIQUE (camera_id, model_id))")
        db.execute("INSERT INTO identities (camera_id, model_id) VALUES (?, ?)", (self.camera_id, self.model_id))
        db.execute("ALTER TABLE frames ADD COLUMN ident INTEGER NOT NULL DEFAULT 1")
        n = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
        db.execute("DELETE FROM meta")
        db.execute("INSERT INTO meta VALUES ('epoch', ?), ('seq_floor', 0)", (secrets.randbits(63),))
        db.executemany("INSERT INTO meta VALUES (?, 0)", [(k,) for k in COUNTERS])
        db.execute("UPDATE meta SET value = ? WHERE key = 'dropped_full'", (old_dropped,))
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        log.warning("migrated spool %s from schema 1 to %d: %d unsent frame(s) attributed to camera %r, model %r",
                    self.path, SCHEMA_VERSION, n, self.camera_id, self.model_id)

    def _ident_id(self) -> int:
        db = self._db
        db.execute("INSERT OR IGNORE INTO identities (camera_id, model_id) VALUES (?, ?)",
                   (self.camera_id, self.model_id))
        return int(db.execute("SELECT id FROM identities WHERE camera_id = ? AND model_id = ?",
                              (self.camera_id, self.model_id)).fetchone()[0])

    def _foreign_check(self) -> None:
        rows = self._db.execute(
            "SELECT i.camera_id, i.model_id, COUNT(*) FROM frames f JOIN identities i ON i.id = f.ident "
            "WHERE f.ident != ? GROUP BY f.ident", (self._identity,)).fetchall()
        rows = [r for r in rows if not (self.other_models and r[0] == self.camera_id)]
        if rows:
            what = "; ".join(f"{n} of camera {c!r} model {m[:16] or '?'}" for c, m, n in rows)
            raise SpoolError(
                f"spool {self.path} holds unsent frames captured under another identity ({what}); this run is camera "
                f"{self.camera_id!r} model {self.model_id[:16] or '?'}. Frames are never relabelled: run once more "
                f"with that camera id and bundle to send them, or move the spool folder aside (or pass another "
                f"--spool) to start a new one.")

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    def _has_meta(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is not None

    def _meta(self, key: str):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else row[0]

    def _bump(self, key: str, n: int) -> None:
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (n, key))

    def _raise_floor(self, epoch: int, upto: int) -> None:
        if epoch == self.epoch:
            self._db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'seq_floor'", (upto,))

    # -- state -----------------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Durable drop counters (across restarts): dropped_full (max frames / max bytes / disk full while
        appending), dropped_rejected (the server refused them), dropped_disk_full (could not be stored at all,
        this process only), damaged_spools (spools found damaged and moved aside)."""
        with self._lock:
            out = {k: int(self._meta(k)) for k in COUNTERS}
        out["dropped_disk_full"] += self.unstored
        return out

    @property
    def dropped(self) -> int:
        """Frames ever dropped by this spool (full, rejected, unstorable), across restarts."""
        c = self.counters()
        return c["dropped_full"] + c["dropped_rejected"] + c["dropped_disk_full"]

    @property
    def full_drops(self) -> int:
        """Frames this instance dropped to make room (plus frames it could not store at all)."""
        return self.made_room + self.unstored

    def depth(self) -> int:
        """Frames waiting for an ack."""
        return self._count

    def disk_bytes(self) -> int:
        """Bytes the spool occupies on disk now (database, WAL, shared-memory index)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        return total

    # -- writing ---------------------------------------------------------------------------------------------------
    def append(self, ts_ms: int, payload: bytes) -> tuple[int, int] | None:
        """Store one frame durably; returns its (epoch, seq), or None if it could not be stored at all (the disk is
        full even after dropping old frames; counted as dropped_disk_full). Makes room by dropping the oldest
        frames when a bound or the disk is full; never raises for a full disk."""
        dropped = 0
        with self._lock:
            seq = self.next_seq
            excess = self._count + 1 - self.max_frames
            if excess > 0 and self._later:
                self._flush_later()  # the oldest rows may be acked ones: delete those, do not count them as dropped
                excess = self._count + 1 - self.max_frames
            for attempt in range(7):
                if attempt == 6 and not self._release_reserve():
                    continue
                try:
                    if excess > 0:
                        with self._tx():
                            n = self._drop_oldest(excess)
                            self._db.execute(_INSERT, (self.epoch, seq, int(ts_ms), self._identity, payload))
                    else:
                        # the common case: one autocommit INSERT is its own transaction, committed (and with
                        # synchronous=FULL fsync'd) before execute() returns, exactly as durable as BEGIN..COMMIT
                        # around it, in one statement instead of three
                        n = 0
                        self._db.execute(_INSERT, (self.epoch, seq, int(ts_ms), self._identity, payload))
                    self._count += 1 - n
                    dropped += n
                    break
                except sqlite3.Error as exc:
                    if not _is_full(exc):
                        raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
                    # full: re-read the disk's free space, drop the oldest frames (1 % of the backlog, at least 16,
                    # doubling on each retry: deleted rows free a page only once its whole leaf is empty) in their
                    # own transaction, then retry
                    if attempt == 0:
                        self._apply_budget()
                    else:  # still full: stop the database file from growing at all and keep the WAL tiny
                        self._shrink_to_fit()
                    dropped += self._make_room(max(16, self._count // 100) << attempt)
                    excess = self._count + 1 - self.max_frames
            else:
                self.unstored += 1
                self.made_room += dropped
                self._log_full(dropped, unstored=True)
                return None
            self.next_seq = seq + 1
            self.made_room += dropped
        if dropped:
            self._log_full(dropped)
        return self.epoch, seq

    def append_many(self, items: "list[tuple[int, bytes]]") -> "list[tuple[int, int] | None]":
        """Store several frames (``(ts_ms, payload)`` in capture order) in ONE transaction: one commit, and with
        ``sync="full"`` one fsync for all of them (group commit: the capture loop hands over a window of frames at a
        time). Durable when it returns, exactly like ``append`` for each; returns their (epoch, seq) in order. When
        the spool or the disk is full it falls back to ``append`` frame by frame (each making room its own way)."""
        if len(items) <= 1:
            return [self.append(ts, p) for ts, p in items]
        with self._lock:
            if self._count + len(items) > self.max_frames and self._later:
                self._flush_later()  # the oldest rows may be acked ones: delete those, do not count them as dropped
            if self._count + len(items) <= self.max_frames:
                first, epoch, ident = self.next_seq, self.epoch, self._identity
                rows = [(epoch, first + k, int(ts), ident, p) for k, (ts, p) in enumerate(items)]
                try:
                    with self._tx():
                        self._db.executemany(_INSERT, rows)
                except sqlite3.Error as exc:
                    if not _is_full(exc):
                        raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
                    # disk full: nothing of this transaction was stored; frame by frame below (drops oldest frames)
                else:
                    self._count += len(rows)
                    self.next_seq = first + len(rows)
                    return [(epoch, first + k) for k in range(len(rows))]
        return [self.append(ts, p) for ts, p in items]

    def _shrink_to_fit(self) -> None:
        db = self._db
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        db.execute(f"PRAGMA max_page_count={pages}")
        db.execute("PRAGMA wal_autocheckpoint=8")
        self._checkpoint("TRUNCATE")

    def _drop_oldest(self, k: int) -> int:
        rows = self._db.execute("SELECT epoch, seq FROM frames ORDER BY epoch, seq LIMIT ?", (k,)).fetchall()
        if not rows:
            return 0
        n = self._db.execute("DELETE FROM frames WHERE (epoch, seq) IN (SELECT epoch, seq FROM frames "
                             "ORDER BY epoch, seq LIMIT ?)", (k,)).rowcount
        for epoch in {e for e, _ in rows}:
            self._raise_floor(epoch, max(s for e, s in rows if e == epoch) + 1)
        self._bump("dropped_full", n)
        return n

    def _make_room(self, k: int) -> int:
        """Called on SQLITE_FULL (outside a transaction): delete the k oldest frames; if even that cannot be written,
        truncate the WAL (gives its space back to the filesystem) and try once more."""
        try:
            self._flush_later()
        except SpoolError:
            pass  # the disk is full: the drop below gets the same treatment
        for _ in range(2):
            try:
                with self._tx():
                    n = self._drop_oldest(k)
                self._count -= n
                self._checkpoint("TRUNCATE" if self._wal_bytes() > self.wal_budget else "PASSIVE")
                return n
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
                self._checkpoint("TRUNCATE")
        return 0

    def _checkpoint(self, mode: str) -> None:
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:
            log.debug("checkpoint %s failed: %s", mode, exc)

    def _log_full(self, n: int, unstored: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_full_log < 10:
            return
        self._last_full_log = now
        limit = f"max {self.max_frames} frames" + (f", max {self.max_bytes} bytes" if self.max_bytes else "")
        log.warning("spool full (%s; %d bytes on disk): dropped the %d oldest unsent frame(s)%s", limit,
                    self.disk_bytes(), n, "; the disk is full: a new frame could not be stored" if unstored else "")

    def pending(self, limit: int, after: tuple[int, int] | None = None) -> list[SpooledFrame]:
        """Up to ``limit`` unacked frames in (epoch, seq) order, strictly after ``after`` if given."""
        with self._lock:
            if after is None:
                self._flush_later()  # a restart of the sending (a new connection): start from the durable truth
                rows = self._db.execute("SELECT epoch, seq, ts_ms, payload, ident FROM frames ORDER BY epoch, seq "
                                        "LIMIT ?", (limit,)).fetchall()
            else:
                query = ("SELECT epoch, seq, ts_ms, payload, ident FROM frames WHERE (epoch, seq) > (?, ?) "
                         "ORDER BY epoch, seq LIMIT ?")
                rows = self._db.execute(query, (after[0], after[1], limit)).fetchall()
                later = self._later
                if later and any(r[1] in later.get(r[0], ()) for r in rows):
                    # frames acked but not yet deleted (a sender normally asks only past what it sent): delete them
                    # now, so that the LIMIT counts only frames still to send
                    self._flush_later()
                    rows = self._db.execute(query, (after[0], after[1], limit)).fetchall()
            models = self._ident_models
        return [SpooledFrame(e, s, t, bytes(p), models.get(i, "")) for e, s, t, p, i in rows]

    # -- over-the-air rollout (runtime/rollout.py) -----------------------------------------------------------------
    def set_model(self, model_id: str) -> None:
        """Frames appended from now on are tagged with ``model_id`` (a switch at a frame boundary); frames already
        spooled keep theirs and are sent and decoded under it."""
        with self._lock:
            with self._tx():
                self.model_id = model_id
                self._identity = self._ident_id()
                self._ident_models = dict(self._db.execute("SELECT id, model_id FROM identities").fetchall())

    def oldest_model_id(self) -> str:
        """The model of the oldest unsent frame (the next connection's HELLO names it), else the current one."""
        with self._lock:
            self._flush_later()
            row = self._db.execute("SELECT ident FROM frames ORDER BY epoch, seq LIMIT 1").fetchone()
            return self._ident_models.get(row[0], self.model_id) if row else self.model_id

    def ack(self, epoch: int, first_seq: int, count: int) -> int:
        """The server stored these frames: delete them. Returns how many were still here."""
        return self._delete(epoch, first_seq, count, counter=None)

    ACK_BATCH = 256     # deferred acked frames that trigger their DELETE
    ACK_DELAY = 2.0     # seconds after the first deferred ack that trigger it

    def ack_later(self, epoch: int, first_seq: int, count: int) -> int:
        """Like :meth:`ack` (the frames leave ``depth()`` and ``pending()`` at once), but their DELETE is batched with
        later acks into one transaction (every ``ACK_BATCH`` frames or ``ACK_DELAY`` seconds, and at close). A crash
        before that only brings these frames back after a restart: they are re-sent and the server acknowledges them
        as duplicates. For the uplink, which acks a few frames many times a second. Returns how many were here."""
        with self._lock:
            later = self._later.setdefault(epoch, set())
            rows = self._db.execute(_SEQS_IN, (epoch, first_seq, first_seq + count)).fetchall()
            n = 0
            for (seq,) in rows:
                if seq not in later:
                    later.add(seq)
                    n += 1
            if not later:
                del self._later[epoch]
            if n:
                if not self._later_n:
                    self._later_since = time.monotonic()
                self._later_n += n
                self._count -= n
            if self._later_n >= self.ACK_BATCH or (
                    self._later_n and time.monotonic() - self._later_since >= self.ACK_DELAY):
                self._flush_later()
        return n

    def flush_acks(self) -> None:
        """Delete the frames acked with :meth:`ack_later` now."""
        with self._lock:
            self._flush_later()

    def _flush_later(self) -> None:
        """(Under the lock, outside a transaction.) One transaction for all deferred acks."""
        if not self._later:
            return
        later, self._later, n = self._later, {}, self._later_n
        self._later_n = 0
        self._count += n  # _delete_locked subtracts what it deletes
        relaxed = self._sync == "FULL"
        if relaxed:  # as for ack(): losing these deletes only re-sends frames the server has
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._delete_locked(later, 0, 0, None)
        finally:
            if relaxed:
                self._db.execute("PRAGMA synchronous=FULL")

    def drop(self, epoch: int, first_seq: int, count: int, reason: str = "") -> int:
        """The server will never accept these frames: delete them and count them as dropped (rejected)."""
        n = self._delete(epoch, first_seq, count, counter="dropped_rejected")
        if n:
            log.warning("server rejected %d frame(s) (epoch %d, seq %d..%d)%s: dropped", n, epoch, first_seq,
                        first_seq + count - 1, f": {reason}" if reason else "")
        return n

    def _delete(self, epoch: int, first_seq: int, count: int, counter: str | None) -> int:
        """Delete acked (counter None) or dropped frames. An ack's delete commits without its own fsync
        (synchronous=NORMAL for that one transaction): losing it to a power cut only makes the frames come back and
        be re-sent, which the server acknowledges as duplicates; the next append's fsync makes it durable anyway.
        That fsync per ack was most of the uplink thread's CPU. Drops keep the full fsync (they are counted)."""
        relaxed = counter is None and self._sync == "FULL"
        with self._lock:
            self._flush_later()
            if relaxed:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                n = self._delete_locked(epoch, first_seq, count, counter)
            finally:
                if relaxed:
                    self._db.execute("PRAGMA synchronous=FULL")
        return n

    def _delete_locked(self, epoch: "int | dict[int, set[int]]", first_seq: int, count: int,
                       counter: str | None) -> int:
        """Delete one range of ``epoch``, or (``epoch`` a dict epoch -> seqs) those seqs, in one transaction."""
        if isinstance(epoch, dict):
            ranges = [(e, lo, hi + 1 - lo) for e, seqs in epoch.items() for lo, hi in _seq_ranges(seqs)]
        else:
            ranges = [(epoch, first_seq, count)]
        for attempt in range(2):
            try:
                with self._tx():
                    n = 0
                    floors: dict[int, int] = {}
                    for e, first, cnt in ranges:
                        k = self._db.execute("DELETE FROM frames WHERE epoch = ? AND seq >= ? AND seq < ?",
                                             (e, first, first + cnt)).rowcount
                        if k:
                            floors[e] = max(floors.get(e, 0), first + cnt)
                        n += k
                    for e, upto in floors.items():
                        self._raise_floor(e, upto)
                    if counter and n:
                        self._bump(counter, n)
                break
            except sqlite3.Error as exc:
                if not _is_full(exc) or attempt:
                    raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
                self._checkpoint("TRUNCATE")
        self._count -= n
        self._acked_since_ckpt += n
        if self._acked_since_ckpt >= 256:  # explicit PASSIVE checkpoint: deletions reach the database file
            self._acked_since_ckpt = 0
            self._checkpoint("PASSIVE")
        if self._wal_bytes() > self.wal_budget:  # a long transaction grew the WAL past its budget
            self._checkpoint("TRUNCATE")
        return n

    def _wal_bytes(self) -> int:
        try:
            return os.stat(str(self.path) + "-wal").st_size
        except OSError:
            return 0

    def close(self) -> None:
        with self._lock:
            if self._finalizer.alive:
                try:
                    self._flush_later()
                except SpoolError as exc:  # not fatal: those frames are re-sent and acked as duplicates
                    log.warning("could not delete acked frames at close: %s", exc)
            self._finalizer()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
