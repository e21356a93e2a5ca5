"""PostgreSQL store of the scale-out mode: cameras, frames partitioned by capture day, an hourly class-count rollup.

Why this shape: frames are append-only and queried by camera and time, so native RANGE partitions on the capture time
keep every index small and make retention a `DROP TABLE` of old partitions instead of a slow DELETE. The unique key
(camera, capture time, epoch, seq) includes the partition key and doubles as the per-camera time index, as PostgreSQL requires; a frame's capture time is part
of its wire record, so a re-sent frame carries the same key and `ON CONFLICT DO NOTHING` makes every insert
idempotent. Counts by class over time come from the rollup, never from a scan of the frames.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

import psycopg

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
        stored_ms_after SMALLINT NOT NULL DEFAULT 0,
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
]


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
                   SELECT c, e, s, to_timestamp(t / 1000.0), LEAST(GREATEST(st - t, 0), 32767), m, p, pr, cf
                   FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[],
                               %s::bytea[], %s::smallint[], %s::smallint[]) AS u(c, e, s, t, st, m, p, pr, cf)
                   ON CONFLICT DO NOTHING
                   RETURNING camera_id, date_trunc('hour', ts_capture), prediction""",
                (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]), list(cols[5]),
                 list(cols[6]), list(cols[7]), [int(round(c * 10000)) for c in cols[8]]))
            new = cur.fetchall()
            if len(new) < len(rows):
                self.conflicts += self._count_conflicts(rows)
            if new:
                counts: dict[tuple, int] = {}
                for key in new:
                    counts[key] = counts.get(key, 0) + 1
                self.conn.cursor().executemany(
                    """INSERT INTO class_counts VALUES (%s, %s, %s, %s)
                       ON CONFLICT (camera_id, hour, prediction) DO UPDATE SET n = class_counts.n + EXCLUDED.n""",
                    [(*k, v) for k, v in counts.items()])
        return len(new)

    def _count_conflicts(self, rows: Sequence[FrameRow]) -> int:
        """Frames whose key is stored with a different payload (a re-sent frame has the same bytes)."""
        cols = list(zip(*rows))
        cur = self.conn.execute(
            """SELECT count(*) FROM frames f JOIN unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bytea[])
                   AS u(c, e, s, p) ON f.camera_id = u.c AND f.epoch = u.e AND f.seq = u.s
               WHERE f.payload <> u.p""", (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[6])))
        return int(cur.fetchone()[0])

    def frame_keys(self) -> list[tuple[str, int, int]]:
        with self.conn.transaction():
            return [tuple(r) for r in self.conn.execute("SELECT camera_id, epoch, seq FROM frames").fetchall()]

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
            names = [r[0] for r in self.conn.execute(
                """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'frames'""").fetchall()]
            old = sorted(n for n in names if n[len("frames_"):] < f"{day:%Y%m%d}")
            for name in old:
                self.conn.execute(f"DROP TABLE {name}")
        self._partitions = {d for d in self._partitions if d >= day}
        return old
