"""PostgreSQL store of the scale-out mode: cameras, frames partitioned by capture day, an hourly class-count rollup.

Why this shape: frames are append-only and queried by camera and time, so native RANGE partitions on the capture time
keep every index small and make retention a `DROP TABLE` of old partitions instead of a slow DELETE. The unique key
(camera, capture time, epoch, seq) includes the partition key and doubles as the per-camera time index, as PostgreSQL requires; a frame's capture time is part
of its wire record, so a re-sent frame carries the same key and `ON CONFLICT DO NOTHING` makes every insert
idempotent. Counts by class over time come from the rollup, never from a scan of the frames.

Packed part (issue 12 item 4): ``compact()`` (a worker runs it every few minutes; `taskcodec cluster compact`) moves
the frames of closed capture hours into one block per (camera, epoch, hour) in ``frame_blocks`` (the embedded
store's block format: server/storage.py encode_block; ~16 B per 6-byte frame instead of ~190), deleting the rows and
inserting the block in one transaction. Writers check what they inserted against the blocks in the same transaction
(see _drop_packed), so a re-sent frame whose hour is packed is still a duplicate (or a conflict), never a second
copy. The rollup is written at insert time and is not touched by compaction. Retention
drops the day partitions and the blocks of those days.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Iterable, Sequence

import numpy as np
import psycopg

from taskcodec.server.storage import BLOCK_FORMAT, HOUR_MS, COMPACT_SETTLE_S, decode_block, encode_block

log = logging.getLogger("taskcodec.pgstore")

# (camera_id, epoch, seq, ts_capture_ms, ts_stored_ms, model_id, payload, prediction, confidence)
FrameRow = tuple[str, int, int, int, int, str, bytes, int, float]

MIGRATIONS: list[str] = [
    # 1: cameras, partitioned frames, hourly class counts
    """
    CREATE TABLE cameras (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        created TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE frames (
        camera_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        ts_capture TIMESTAMPTZ NOT NULL,
        stored_ms_after SMALLINT NOT NULL DEFAULT 0,  -- INTEGER from step 3
        model_id TEXT NOT NULL,
        payload BYTEA NOT NULL,
        prediction SMALLINT NOT NULL,
        confidence SMALLINT NOT NULL,
        UNIQUE (camera_id, ts_capture, epoch, seq)  -- also the index of per-camera time-range queries
    ) PARTITION BY RANGE (ts_capture);
    CREATE TABLE class_counts (
        camera_id TEXT NOT NULL,
        hour TIMESTAMPTZ NOT NULL,
        prediction SMALLINT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (camera_id, hour, prediction)
    );
    """,
    # 2: packed blocks, one per (camera, epoch, capture hour); see compact()
    """
    CREATE TABLE frame_blocks (
        camera_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        hour TIMESTAMPTZ NOT NULL,
        seq_lo BIGINT NOT NULL,
        seq_hi BIGINT NOT NULL,
        n INT NOT NULL,
        ts_lo BIGINT NOT NULL,
        ts_hi BIGINT NOT NULL,
        models TEXT NOT NULL,
        format SMALLINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (camera_id, epoch, hour)
    );
    ALTER TABLE frame_blocks ALTER COLUMN data SET STORAGE EXTERNAL;  -- zlib already: no second compression try
    CREATE INDEX frame_blocks_by_seq ON frame_blocks (camera_id, epoch, seq_hi);
    CREATE INDEX frame_blocks_by_hour ON frame_blocks (hour);
    CREATE TABLE compaction_state (
        id INT PRIMARY KEY CHECK (id = 0),
        generation BIGINT NOT NULL  -- bumped by every compaction transaction that writes blocks
    );
    INSERT INTO compaction_state VALUES (0, 0);
    """,
    # 3: the stored time of a frame uploaded late (a camera offline for hours) kept exactly, up to 24.8 days after
    # capture (a SMALLINT capped it at 32.767 s)
    """
    ALTER TABLE frames ALTER COLUMN stored_ms_after TYPE INTEGER;
    """,
]

COMPACT_SPAN_H = 6  # capture hours of one camera per compaction transaction
COMPACTOR_LOCK = 0x74636F6D  # pg_advisory_lock key: one compaction at a time per database


class PgStoreError(RuntimeError):
    """The PostgreSQL store cannot be used (unreachable, schema too new)."""


def migrate(dsn: str) -> int:
    """Bring the schema to the newest version; returns it. Each step runs in its own transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > len(MIGRATIONS):
            raise PgStoreError(f"database schema version {current} is newer than this taskcodec "
                               f"({len(MIGRATIONS)}): upgrade taskcodec")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with conn.transaction():
                conn.execute(MIGRATIONS[version - 1])
                conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        return len(MIGRATIONS)


def _day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).date()


def partition_ddl(day: dt.date) -> str:
    nxt = day + dt.timedelta(days=1)
    return (f"CREATE TABLE IF NOT EXISTS frames_{day:%Y%m%d} PARTITION OF frames "
            f"FOR VALUES FROM ('{day.isoformat()}T00:00:00Z') TO ('{nxt.isoformat()}T00:00:00Z')")


class PgStore:
    """One connection, used from one worker task at a time."""

    def __init__(self, dsn: str):
        try:
            self.conn = psycopg.connect(dsn)
        except psycopg.OperationalError as exc:
            raise PgStoreError(f"cannot connect to PostgreSQL ({dsn}): {exc}") from exc
        self._partitions: set[dt.date] = set()
        self.conflicts = 0  # frames refused because their key is stored with another payload
        self._packed_hi: dict[tuple[str, int], int] = {}  # (camera, epoch) -> highest packed seq, for one generation
        self._generation: int | None = None

    def close(self) -> None:
        self.conn.close()

    def add_camera(self, camera_id: str, token_hash: str) -> None:
        with self.conn.transaction():
            self.conn.execute("INSERT INTO cameras (id, token_hash) VALUES (%s, %s)", (camera_id, token_hash))

    def token_hash(self, camera_id: str) -> str | None:
        with self.conn.transaction():
            row = self.conn.execute("SELECT token_hash FROM cameras WHERE id = %s", (camera_id,)).fetchone()
        return row[0] if row else None

    def _ensure_partitions(self, days: Iterable[dt.date]) -> None:
        for day in set(days) - self._partitions:
            self.conn.execute(partition_ddl(day))
            self._partitions.add(day)

    def store_frames(self, rows: Sequence[FrameRow]) -> int:
        """Insert-or-ignore in one transaction; returns how many frames were new. The rollup counts only those."""
        if not rows:
            return 0
        with self.conn.transaction():
            self._ensure_partitions(_day(r[3]) for r in rows)
            cols = list(zip(*rows))
            cur = self.conn.execute(
                """INSERT INTO frames (camera_id, epoch, seq, ts_capture, stored_ms_after, model_id, payload,
                                       prediction, confidence)
                   SELECT c, e, s, to_timestamp(t / 1000.0), LEAST(GREATEST(st - t, 0), 2147483647), m, p, pr, cf
                   FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[],
                               %s::bytea[], %s::smallint[], %s::smallint[]) AS u(c, e, s, t, st, m, p, pr, cf)
                   ON CONFLICT DO NOTHING
                   RETURNING camera_id, epoch, seq, date_trunc('hour', ts_capture), prediction""",
                (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]), list(cols[5]),
                 list(cols[6]), list(cols[7]), [int(round(c * 10000)) for c in cols[8]]))
            new = cur.fetchall()
            if len(new) < len(rows):
                self.conflicts += self._count_conflicts(rows)
            if new:
                new = self._drop_packed(new, rows)
            if new:
                counts: dict[tuple, int] = {}
                for cam, _, _, hour, pred in new:
                    counts[(cam, hour, pred)] = counts.get((cam, hour, pred), 0) + 1
                self.conn.cursor().executemany(
                    """INSERT INTO class_counts VALUES (%s, %s, %s, %s)
                       ON CONFLICT (camera_id, hour, prediction) DO UPDATE SET n = class_counts.n + EXCLUDED.n""",
                    [(*k, v) for k, v in counts.items()])
        return len(new)

    def _drop_packed(self, new: list[tuple], rows: Sequence[FrameRow]) -> list[tuple]:
        """After the insert, in its transaction: take back the inserted frames whose key a packed block holds (a
        re-delivery of a frame compacted since; a conflict when the payload differs) and return the others.

        Why after: a compaction that moves an earlier copy of a key concurrently makes this insert wait on the unique
        key until it commits, so a statement after the insert sees its block. Each worker caches the highest packed
        seq per (camera, epoch) for one compaction generation (bumped in every transaction that writes blocks): a
        batch of new frames (above the bounds) then costs one read of the generation, no block lookup."""
        generation = self.conn.execute("SELECT generation FROM compaction_state WHERE id = 0").fetchone()[0]
        if generation != self._generation or len(self._packed_hi) > 200_000:
            self._packed_hi.clear()
            self._generation = generation
        spans: dict[tuple[str, int], list[int]] = {}
        for cam, epoch, seq, _, _ in new:
            span = spans.setdefault((cam, epoch), [seq, seq])
            span[0], span[1] = min(span[0], seq), max(span[1], seq)
        missing = [k for k in spans if k not in self._packed_hi]
        if missing:
            found = dict(((c, e), hi) for c, e, hi in self.conn.execute(
                """SELECT b.camera_id, b.epoch, max(b.seq_hi) FROM frame_blocks b
                   JOIN unnest(%s::text[], %s::bigint[]) AS u(c, e) ON b.camera_id = u.c AND b.epoch = u.e
                   GROUP BY b.camera_id, b.epoch""", ([k[0] for k in missing], [k[1] for k in missing])))
            for k in missing:
                self._packed_hi[k] = found.get(k, -(1 << 63))
        suspects = [k for k, (lo, _) in spans.items() if lo <= self._packed_hi[k]]
        if not suspects:
            return new
        packed: dict[tuple[str, int, int], bytes] = {}
        for cam, epoch, models, fmt, data in self.conn.execute(
                """SELECT b.camera_id, b.epoch, b.models, b.format, b.data FROM frame_blocks b
                   JOIN unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) AS u(c, e, lo, hi)
                     ON b.camera_id = u.c AND b.epoch = u.e AND b.seq_hi >= u.lo AND b.seq_lo <= u.hi""",
                ([k[0] for k in suspects], [k[1] for k in suspects], [spans[k][0] for k in suspects],
                 [spans[k][1] for k in suspects])):
            b = decode_block(cam, epoch, models, fmt, data)
            for i, seq in enumerate(b.seq.tolist()):
                packed[(cam, epoch, seq)] = b.payload(i)
        dups = {n[:3] for n in new if n[:3] in packed}
        if not dups:
            return new
        mine = {r[:3]: r for r in rows}
        self.conn.execute(
            """DELETE FROM frames f USING unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) AS u(c, e, s, t)
               WHERE f.camera_id = u.c AND f.epoch = u.e AND f.seq = u.s AND f.ts_capture = to_timestamp(u.t / 1000.0)""",
            ([k[0] for k in dups], [k[1] for k in dups], [k[2] for k in dups], [mine[k][3] for k in dups]))
        self.conflicts += sum(1 for k in dups if packed[k] != bytes(mine[k][6]))
        return [n for n in new if n[:3] not in dups]

    def _count_conflicts(self, rows: Sequence[FrameRow]) -> int:
        """Frames whose key is stored with a different payload (a re-sent frame has the same bytes)."""
        cols = list(zip(*rows))
        cur = self.conn.execute(
            """SELECT count(*) FROM frames f JOIN unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bytea[])
                   AS u(c, e, s, p) ON f.camera_id = u.c AND f.epoch = u.e AND f.seq = u.s
               WHERE f.payload <> u.p""", (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[6])))
        return int(cur.fetchone()[0])

    def _one_snapshot(self) -> None:
        """Readers of both parts see them in one snapshot (a compaction committing between the two reads would
        otherwise show its frames twice or not at all)."""
        self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def frame_keys(self) -> list[tuple[str, int, int]]:
        """Every stored frame's key, from both parts."""
        with self.conn.transaction():
            self._one_snapshot()
            keys = [tuple(r) for r in self.conn.execute("SELECT camera_id, epoch, seq FROM frames").fetchall()]
            for cam, epoch, models, fmt, data in self.conn.execute(
                    "SELECT camera_id, epoch, models, format, data FROM frame_blocks"):
                keys += [(cam, epoch, s) for s in decode_block(cam, epoch, models, fmt, data).seq.tolist()]
        return keys

    def camera_frames(self, camera_id: str, since_ms: int, until_ms: int, limit: int = 1000,
                      newest: bool = False) -> list[tuple]:
        """One camera's frames captured in [since_ms, until_ms) from both parts, oldest (or ``newest``) first:
        (epoch, seq, ts_capture_ms, stored_ms_after, model_id, payload, prediction, confidence in 1/10000)."""
        order = "DESC" if newest else "ASC"
        with self.conn.transaction():
            self._one_snapshot()
            out = [tuple(r) for r in self.conn.execute(
                f"""SELECT epoch, seq, (extract(epoch FROM ts_capture) * 1000)::bigint, stored_ms_after, model_id,
                           payload, prediction, confidence FROM frames
                    WHERE camera_id = %s AND ts_capture >= to_timestamp(%s / 1000.0)
                      AND ts_capture < to_timestamp(%s / 1000.0)
                    ORDER BY ts_capture {order}, epoch {order}, seq {order} LIMIT %s""",
                (camera_id, since_ms, until_ms, limit))]
            # the blocks' keys first, their data one block at a time while the limit still needs it (a camera's
            # newest frames must not fetch every block of its history)
            blocks = self.conn.execute(
                f"""SELECT epoch, hour FROM frame_blocks WHERE camera_id = %s
                      AND hour >= date_trunc('hour', to_timestamp(%s / 1000.0)) AND hour < to_timestamp(%s / 1000.0)
                    ORDER BY hour {order}""", (camera_id, since_ms, until_ms)).fetchall()
            packed: list[tuple] = []
            for epoch, hour in blocks:
                start = int(hour.timestamp() * 1000)
                if len(packed) >= limit and (start > packed[limit - 1][2] if not newest
                                             else start + HOUR_MS <= packed[limit - 1][2]):
                    break
                packed += self._block_frames(camera_id, epoch, hour, since_ms, until_ms, limit, newest)
                packed.sort(key=lambda r: (r[2], r[0], r[1]), reverse=newest)
                del packed[limit:]
        out = [(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6], r[7]) for r in out] + packed
        out.sort(key=lambda r: (r[2], r[0], r[1]), reverse=newest)
        return out[:limit]

    def _block_frames(self, camera_id: str, epoch: int, hour, since_ms: int, until_ms: int, limit: int,
                      newest: bool) -> list[tuple]:
        """camera_frames' rows of one block (in the caller's transaction)."""
        models, fmt, data = self.conn.execute("SELECT models, format, data FROM frame_blocks WHERE camera_id = %s "
                                              "AND epoch = %s AND hour = %s", (camera_id, epoch, hour)).fetchone()
        b = decode_block(camera_id, epoch, models, fmt, data)
        idx = np.flatnonzero((b.ts >= since_ms) & (b.ts < until_ms))
        if len(idx) > limit:  # one epoch: (time, seq) order; this block's first ``limit`` are all it can give
            order = np.lexsort((b.seq[idx], b.ts[idx]))
            idx = idx[order[::-1][:limit] if newest else order[:limit]]
        return [(epoch, r[2], r[3], r[4] - r[3], r[5], r[6], r[7], int(r[8])) for r in b.rows(idx.tolist())]

    # compaction ----------------------------------------------------------------------------------------------------
    def compact(self, settle_s: float = COMPACT_SETTLE_S, now_ms: int | None = None, wait: bool = True) -> dict:
        """Pack the frames of capture hours that ended before ``now - settle_s`` into frame_blocks, one camera per
        transaction (rows deleted and block(s) written together, the compaction generation bumped; an
        existing block of the same hour is merged). One compaction at a time per database (``wait`` False: return
        at once when another one runs)."""
        t0 = time.monotonic()
        now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
        cutoff = (now_ms - int(settle_s * 1000)) // HOUR_MS * HOUR_MS
        done = {"frames": 0, "blocks_written": 0, "cameras": 0, "cutoff_ms": cutoff, "skipped": False}
        with self.conn.transaction():  # a session lock: held across the per-camera transactions below
            if wait:
                self.conn.execute("SELECT pg_advisory_lock(%s)", (COMPACTOR_LOCK,))
                got = True
            else:
                got = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (COMPACTOR_LOCK,)).fetchone()[0]
        if not got:
            done["skipped"] = True
            return done
        try:
            # day partitions emptied by earlier runs: give their (index) pages back
            done["reclaimed"] = self.reclaim_partitions(_day(cutoff))
            with self.conn.transaction():
                cams = [r[0] for r in self.conn.execute(
                    "SELECT DISTINCT camera_id FROM frames WHERE ts_capture < to_timestamp(%s / 1000.0)", (cutoff,))]
            for cam in cams:
                while True:  # at most COMPACT_SPAN_H capture hours per transaction (a first run may find weeks)
                    with self.conn.transaction():
                        moved, blocks = self._compact_camera(cam, cutoff)
                    if not moved:
                        break
                    done["frames"] += moved
                    done["blocks_written"] += blocks
                done["cameras"] += 1
        finally:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (COMPACTOR_LOCK,))
        done["seconds"] = round(time.monotonic() - t0, 3)
        if done["frames"]:
            log.info("compaction: %d frames of %d cameras packed (%d blocks) in %.1f s", done["frames"],
                     done["cameras"], done["blocks_written"], done["seconds"])
        return done

    def _partition_names(self) -> list[str]:
        return sorted(r[0] for r in self.conn.execute(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'frames'""").fetchall())

    def reclaim_partitions(self, before: dt.date | None = None) -> list[str]:
        """TRUNCATE the day partitions (of days before ``before``; None: all) that compaction emptied: a DELETE
        leaves their index pages allocated until then. Each under a short exclusive lock (skipped when busy), after
        checking again that it is empty; the partition stays, so a late frame of that day still has its place."""
        with self.conn.transaction():
            names = [n for n in self._partition_names() if before is None or n[len("frames_"):] < f"{before:%Y%m%d}"]
        done = []
        for name in names:
            try:
                with self.conn.transaction():
                    self.conn.execute("SET LOCAL lock_timeout = '1s'")
                    self.conn.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
                    if self.conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {name})").fetchone()[0] and \
                            self.conn.execute(f"SELECT pg_relation_size('{name}') + pg_indexes_size('{name}') > 16384"
                                              ).fetchone()[0]:
                        self.conn.execute(f"TRUNCATE {name}")
                        done.append(name)
            except psycopg.errors.LockNotAvailable:
                continue
        return done

    def _compact_camera(self, cam: str, cutoff: int) -> tuple[int, int]:
        """Pack the camera's oldest closed capture hours (up to COMPACT_SPAN_H of them) in this transaction."""
        first = self.conn.execute("SELECT (extract(epoch FROM min(ts_capture)) * 1000)::bigint FROM frames WHERE "
                                  "camera_id = %s AND ts_capture < to_timestamp(%s / 1000.0)", (cam, cutoff)).fetchone()[0]
        if first is None:
            return 0, 0
        upper = min(cutoff, (first // HOUR_MS + COMPACT_SPAN_H) * HOUR_MS)
        rows = self.conn.execute(
            """DELETE FROM frames WHERE camera_id = %s AND ts_capture < to_timestamp(%s / 1000.0)
               RETURNING epoch, seq, (extract(epoch FROM ts_capture) * 1000)::bigint, stored_ms_after, model_id,
                         payload, prediction, confidence""", (cam, upper)).fetchall()
        groups: dict[tuple[int, int], list] = {}
        for epoch, seq, ts, after, model, payload, pred, conf in rows:
            # FrameRow order; the stored time as capture + stored_ms_after, the confidence in 1/10000 (exact)
            groups.setdefault((epoch, ts // HOUR_MS), []).append(
                (cam, epoch, seq, ts, ts + after, model, bytes(payload), pred, float(conf)))
        for (epoch, hour), new in groups.items():
            start = dt.datetime.fromtimestamp(hour * HOUR_MS / 1000, dt.timezone.utc)
            old = self.conn.execute("SELECT models, format, data FROM frame_blocks WHERE camera_id = %s AND "
                                    "epoch = %s AND hour = %s", (cam, epoch, start)).fetchone()
            if old is not None:
                have = decode_block(cam, epoch, *old).rows()
                seen = {r[2] for r in have}
                new = have + [r for r in new if r[2] not in seen]
            data, models = encode_block(new)
            seqs, ts = [r[2] for r in new], [r[3] for r in new]
            self.conn.execute(
                """INSERT INTO frame_blocks VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (camera_id, epoch, hour) DO UPDATE SET seq_lo = EXCLUDED.seq_lo,
                     seq_hi = EXCLUDED.seq_hi, n = EXCLUDED.n, ts_lo = EXCLUDED.ts_lo, ts_hi = EXCLUDED.ts_hi,
                     models = EXCLUDED.models, format = EXCLUDED.format, data = EXCLUDED.data""",
                (cam, epoch, start, min(seqs), max(seqs), len(new), min(ts), max(ts), json.dumps(models),
                 BLOCK_FORMAT, data))
        if groups:  # writers' cached bounds of packed seqs end here (they read the generation after inserting)
            self.conn.execute("UPDATE compaction_state SET generation = generation + 1 WHERE id = 0")
        return len(rows), len(groups)

    def class_counts(self, camera_id: str, since_ms: int, until_ms: int) -> dict[int, int]:
        with self.conn.transaction():
            rows = self.conn.execute(
                """SELECT prediction, sum(n) FROM class_counts WHERE camera_id = %s
                   AND hour >= date_trunc('hour', to_timestamp(%s / 1000.0)) AND hour < to_timestamp(%s / 1000.0)
                   GROUP BY prediction""", (camera_id, since_ms, until_ms)).fetchall()
        return {int(p): int(n) for p, n in rows}

    def drop_partitions_before(self, day: dt.date) -> list[str]:
        """Retention by age: drop whole day partitions older than ``day``."""
        with self.conn.transaction():
            names = self._partition_names()
            old = sorted(n for n in names if n[len("frames_"):] < f"{day:%Y%m%d}")
            for name in old:
                self.conn.execute(f"DROP TABLE {name}")
            self.conn.execute("DELETE FROM frame_blocks WHERE hour < %s",
                              (dt.datetime.combine(day, dt.time(), dt.timezone.utc),))
        self._partitions = {d for d in self._partitions if d >= day}
        return old
