"""server/storage.py on real SQLite files: frame identity (new / duplicate / conflict / revoked) in one transaction,
SQLITE_FULL without "cannot rollback", the WAL bounded by the checkpoint policy, schema migration of an old file."""

import os
import sqlite3

import pytest

from taskcodec.server.storage import (CONFLICT, DUPLICATE, JOURNAL_SIZE_LIMIT, NEW, SCHEMA_VERSION,
                                      WAL_AUTOCHECKPOINT_PAGES, BatchRows, SQLiteStorage, StorageFull)


def _rows(cam, epoch, seqs, payload=b"p"):
    return [(cam, epoch, s, 1000 + s, 2000, "m", payload + bytes([s % 256]), 1, 0.5) for s in seqs]


def test_store_batches_tells_new_duplicate_conflict_and_revoked(tmp_path):
    st = SQLiteStorage(tmp_path / "f.db")
    st.add_camera("a", "hash-1")
    out = st.store_batches([BatchRows("a", "hash-1", _rows("a", 1, range(4)))])
    assert out == [[NEW] * 4]
    mixed = _rows("a", 1, range(2)) + _rows("a", 1, range(2, 4), payload=b"q") + _rows("a", 1, range(4, 6))
    assert st.store_batches([BatchRows("a", "hash-1", mixed)]) == [[DUPLICATE] * 2 + [CONFLICT] * 2 + [NEW] * 2]
    # the same key twice in one micro-batch: the second sees the first
    twice = [BatchRows("a", "hash-1", _rows("a", 2, [0])), BatchRows("a", "hash-1", _rows("a", 2, [0], b"z"))]
    assert st.store_batches(twice) == [[NEW], [CONFLICT]]
    st.set_token_hash("a", "hash-2")  # rotated: the old session's batch stores nothing
    assert st.store_batches([BatchRows("a", "hash-1", _rows("a", 3, [0])), BatchRows("a", "hash-2", _rows("a", 3, [1]))]) \
        == [None, [NEW]]
    with sqlite3.connect(tmp_path / "f.db") as conn:
        stored = dict(((e, s), bytes(p)) for e, s, p in conn.execute("SELECT epoch, seq, payload FROM frames"))
    assert stored[(1, 2)] == b"p\x02" and (3, 0) not in stored and (3, 1) in stored
    st.close()


def test_full_database_raises_storage_full_and_recovers(tmp_path):
    st = SQLiteStorage(tmp_path / "f.db")
    st.add_camera("a", "h")
    pages = st._writer.execute("PRAGMA page_count").fetchone()[0]
    st._writer.execute(f"PRAGMA max_page_count={pages + 2}")  # SQLITE_FULL within a few inserts
    big = [("a", 1, s, 0, 0, "m", os.urandom(3000), 0, 0.5) for s in range(50)]
    for _ in range(3):
        with pytest.raises(StorageFull) as err:
            st.store_batches([BatchRows("a", "h", big)])
        assert "rollback" not in str(err.value)
        with pytest.raises(StorageFull):
            st.probe_write()
    assert not st._writer.in_transaction
    st._writer.execute("PRAGMA max_page_count=1073741823")
    st.probe_write()
    assert st.store_batches([BatchRows("a", "h", big)]) == [[NEW] * 50]
    st.close()


def test_wal_stays_bounded_and_truncates(tmp_path):
    db = tmp_path / "f.db"
    st = SQLiteStorage(db)
    wal = tmp_path / "f.db-wal"
    largest = 0
    for k in range(800):  # 800 commits of 100 frames of 64 bytes: ~50 MiB of WAL frames without checkpoints
        st.store_frames([("c", 1, 100 * k + i, 0, 0, "m", os.urandom(64), 0, 0.5) for i in range(100)])
        largest = max(largest, wal.stat().st_size)
    # PASSIVE checkpoints every WAL_AUTOCHECKPOINT_PAGES pages (16 MiB) keep it near that, below the size limit
    assert largest < min(1.2 * WAL_AUTOCHECKPOINT_PAGES * (4096 + 24), JOURNAL_SIZE_LIMIT), largest
    st.checkpoint("TRUNCATE")
    assert wal.stat().st_size == 0
    st.close()
    assert (db.stat().st_mode & 0o077) == 0


def test_old_database_is_migrated_with_its_data(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the schema before versioning (user_version 0)
        conn.executescript("""
            CREATE TABLE cameras (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created INTEGER NOT NULL);
            CREATE TABLE frames (camera_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                ts_capture_ms INTEGER NOT NULL, ts_stored_ms INTEGER NOT NULL, model_id TEXT NOT NULL,
                payload BLOB NOT NULL, prediction INTEGER NOT NULL, confidence REAL NOT NULL,
                PRIMARY KEY (camera_id, epoch, seq));
            INSERT INTO cameras VALUES ('a', 'h', 1);
            INSERT INTO frames VALUES ('a', 1, 0, 5, 6, 'm', x'00', 1, 0.5);""")
    from taskcodec.server.storage import SchemaError

    with pytest.raises(SchemaError, match="taskcodec db migrate"):
        SQLiteStorage(db, migrate=False)
    st = SQLiteStorage(db)
    assert st.schema_version() == SCHEMA_VERSION and st.migrate() == []
    assert st.get_camera("a").token_hash == "h" and st.frame_counts() == {"a": 1}
    st.add_operator("op", "sha256$x", "read")
    st.close()
