"""Retention by age in the embedded server's SQLite store (issue 12 item 4): `taskcodec db retention --days N`
deletes exactly the frames captured before now - N days, keeps the rest, and the query index stays usable."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from taskcodec.server.storage import SQLiteStorage


def _fill(db, now_ms: int) -> tuple[int, int]:
    storage = SQLiteStorage(db)
    day = 86_400_000
    rows = []
    for cam in range(5):
        for i in range(300):  # 0..299 hours ago
            ts = now_ms - i * day // 24 - day // 48  # half an hour off the hour: no frame near the cutoff
            rows.append((f"cam-{cam}", 7, i, ts, ts + 5, "m", b"\x01\x02\x03\x04\x05\x06", i % 10, 0.9))
    assert storage.store_frames(rows) == len(rows)
    storage.close()
    old = sum(1 for r in rows if r[3] < now_ms - 3 * day)
    return len(rows), old


def test_retention_cli_deletes_exactly_the_old_frames(tmp_path):
    db = tmp_path / "server.db"
    now_ms = int(time.time() * 1000)
    total, old = _fill(db, now_ms)
    assert 0 < old < total
    out = subprocess.run([sys.executable, "-m", "taskcodec.server", "db", "retention", "--days", "3", "--db",
                          str(db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"deleted {old} frames" in out.stdout
    conn = sqlite3.connect(db)
    left = conn.execute("SELECT count(*), min(ts_capture_ms) FROM frames").fetchone()
    assert left[0] == total - old
    assert left[1] >= now_ms - 3 * 86_400_000 - 60_000  # nothing older than the cutoff (+ the test's run time)
    # idempotent: a second run deletes nothing
    out = subprocess.run([sys.executable, "-m", "taskcodec.server", "db", "retention", "--days", "3", "--db",
                          str(db)], capture_output=True, text=True, timeout=60)
    assert "deleted 0 frames" in out.stdout


def test_delete_before_in_chunks(tmp_path):
    db = tmp_path / "server.db"
    now_ms = int(time.time() * 1000)
    total, old = _fill(db, now_ms)
    storage = SQLiteStorage(db)
    assert storage.delete_before(now_ms - 3 * 86_400_000, chunk=7) == old
    assert storage.delete_before(now_ms + 1, chunk=1000) == total - old
    assert storage.frame_counts() == {}
    storage.close()
