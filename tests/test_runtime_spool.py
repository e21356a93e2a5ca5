"""The spool is durable (a writer killed with SIGKILL loses no acknowledged-as-written frame and leaves no
duplicates), keeps one random epoch and never reuses a seq across restarts, hands out frames oldest first, drops the
oldest when full (frames or bytes, counted once), refuses frames of another identity, moves a damaged file aside, and
migrates a version-1 spool."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from taskcodec.runtime.spool import Spool, SpoolError

WRITER = textwrap.dedent("""
    import sys
    from taskcodec.runtime.spool import Spool
    spool = Spool(sys.argv[1], max_frames=10**6)
    print("epoch", spool.epoch, flush=True)
    while True:
        seq = spool.next_seq
        assert spool.append(1000 + seq, b"frame-%d" % seq) == (spool.epoch, seq)
        epoch = spool.epoch
        print("stored", seq, flush=True)
        if seq % 3 == 0:
            spool.ack(epoch, seq, 1)
            print("acked", seq, flush=True)
""")


def test_spool_survives_sigkill_mid_write(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "spool")], stdout=subprocess.PIPE, text=True)
    stored, acked, epoch = [], set(), None
    deadline = time.monotonic() + 60
    try:
        while len(stored) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, value = line.split()
            if kind == "epoch":
                epoch = int(value)
            elif kind == "stored":
                stored.append(int(value))
            else:
                acked.add(int(value))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert epoch is not None and len(stored) >= 40, "writer did not get going"
    # the writer may have got further than its last line said; read the rest of what it printed
    for line in proc.stdout.read().splitlines():
        kind, value = line.split()
        (stored.append if kind == "stored" else acked.add)(int(value))
    spool = Spool(tmp_path / "spool")
    assert spool.epoch == epoch  # the epoch belongs to the spool, not to the boot
    rows = spool.pending(10**6)
    seqs = [r.seq for r in rows]
    assert len(seqs) == len(set(seqs)), "duplicates after the crash"
    assert all(r.epoch == epoch for r in rows)
    last = max(stored)
    for seq in stored:
        # the last frame's ack may have committed just before the kill, without its line printed
        ack_in_flight = seq == last and seq % 3 == 0
        if seq not in acked and not ack_in_flight:
            assert seq in seqs, f"frame {seq} was stored but is gone"
    for r in rows:
        assert r.seq not in acked, f"acked frame {r.seq} came back"
        assert r.seq <= last + 1  # at most the one append that was in flight at the kill
        assert r.payload == b"frame-%d" % r.seq and r.ts_ms == 1000 + r.seq
    # new frames of the new boot continue the sequence: never a seq of the killed run, acked or not
    epoch_seq = spool.append(5, b"new")
    assert epoch_seq[0] == epoch and epoch_seq[1] > max(stored + list(acked))
    assert spool.pending(10**6)[-1].seq == epoch_seq[1]
    spool.close()


def test_epoch_order_ack_and_drop(tmp_path):
    with Spool(tmp_path) as s:
        e = s.epoch
        assert 0 <= e < 2**63
        for i in range(5):
            assert s.append(i, bytes([i])) == (e, i)
        assert [f.seq for f in s.pending(3)] == [0, 1, 2]
        assert [f.seq for f in s.pending(10, after=(e, 2))] == [3, 4]
        assert s.ack(e, 0, 2) == 2 and s.depth() == 3
        assert s.ack(e, 0, 2) == 0  # a duplicate ack is harmless
        assert s.drop(e, 4, 1) == 1 and s.dropped == 1
    with Spool(tmp_path) as s:
        assert s.epoch == e and s.depth() == 2 and s.dropped == 1
        assert s.append(0, b"x") == (e, 5)  # seq 4 was dropped, yet never reused
        assert [(f.epoch, f.seq) for f in s.pending(10)] == [(e, 2), (e, 3), (e, 5)]
        s.ack(e, 0, 6)
    with Spool(tmp_path) as s:
        assert s.depth() == 0 and s.append(0, b"y") == (e, 6)  # the floor is durable even with nothing left


def test_wiped_spool_draws_a_new_random_epoch(tmp_path):
    epochs = set()
    for i in range(5):
        with Spool(tmp_path / f"s{i}") as s:
            epochs.add(s.epoch)
    assert len(epochs) == 5 and all(0 <= e < 2**63 for e in epochs)


def test_full_spool_drops_oldest(tmp_path):
    with Spool(tmp_path, max_frames=4) as s:
        for i in range(10):
            s.append(i, b"p")
        assert s.depth() == 4 and s.dropped == 6 and s.full_drops == 6
        assert [f.seq for f in s.pending(10)] == [6, 7, 8, 9]


def test_byte_bound_holds_and_drops_are_counted_once(tmp_path):
    limit = 1 << 20
    with Spool(tmp_path, max_frames=10**6, max_bytes=limit, sync="normal") as s:
        for i in range(6000):
            assert s.append(i, os.urandom(300)) is not None
            if i % 500 == 0:
                assert s.disk_bytes() <= limit
        assert s.disk_bytes() <= limit
        kept = s.depth()
        assert 0 < kept < 6000
        assert s.counters()["dropped_full"] == 6000 - kept == s.made_room
        seqs = [f.seq for f in s.pending(10**6)]
        assert seqs == list(range(6000 - kept, 6000))  # the newest frames, in order


def test_frames_of_another_identity_are_never_relabelled(tmp_path):
    with Spool(tmp_path, camera_id="cam-a", model_id="m1") as s:
        s.append(1, b"a")
    for cam, model in (("cam-b", "m1"), ("cam-a", "m2")):
        with pytest.raises(SpoolError, match="another identity.*1 of camera 'cam-a' model m1"):
            Spool(tmp_path, camera_id=cam, model_id=model)
    with Spool(tmp_path, camera_id="cam-a", model_id="m1") as s:
        assert s.depth() == 1
        s.ack(s.epoch, 0, 1)
    with Spool(tmp_path, camera_id="cam-b", model_id="m2") as s:  # drained: reuse is fine, seqs continue
        assert s.append(2, b"b")[1] == 1


def test_damaged_spool_is_moved_aside_and_counted(tmp_path, caplog):
    with Spool(tmp_path, sync="normal") as s:
        for i in range(2000):
            s.append(i, os.urandom(50))  # (sync full: 9 s; normal is enough here)
    db = tmp_path / "spool.sqlite3"
    data = bytearray(db.read_bytes())
    for off in range(4096 * 2, len(data), 4096 * 3):  # garble some b-tree pages, keep the header
        data[off:off + 64] = os.urandom(64)
    db.write_bytes(bytes(data))
    with caplog.at_level("ERROR"), Spool(tmp_path) as s:
        assert s.moved_aside is not None and s.moved_aside.exists()
        assert s.counters()["damaged_spools"] == 1 and s.depth() == 0
    assert "SPOOL DAMAGED" in caplog.text


def test_version_1_spool_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("CREATE TABLE frames (epoch INTEGER NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, "
               "payload BLOB NOT NULL, PRIMARY KEY (epoch, seq)) WITHOUT ROWID")
    db.execute("INSERT INTO meta VALUES ('epoch', 1700000000), ('dropped', 3)")
    db.executemany("INSERT INTO frames VALUES (1700000000, ?, ?, ?)", [(i, 1000 + i, b"old") for i in range(4)])
    db.commit()
    db.close()
    with Spool(tmp_path, camera_id="cam", model_id="m") as s:
        assert s.epoch != 1700000000 and s.dropped == 3
        assert [(f.epoch, f.seq) for f in s.pending(10)] == [(1700000000, i) for i in range(4)]
        s.append(5, b"new")
    assert sqlite3.connect(tmp_path / "spool.sqlite3").execute("PRAGMA user_version").fetchone()[0] == 2
    with pytest.raises(SpoolError, match="another identity"):
        Spool(tmp_path, camera_id="other", model_id="m")


def test_bad_spool_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match="cannot create spool folder"):
        Spool(blocker / "spool")
    (tmp_path / "bad.sqlite3").write_bytes(b"this is not a database" * 100)
    with Spool(tmp_path / "bad.sqlite3") as s:  # not silently emptied: moved aside, counted
        assert s.moved_aside.read_bytes() == b"this is not a database" * 100
        assert s.counters()["damaged_spools"] == 1
    with pytest.raises(SpoolError, match="at least"):
        Spool(tmp_path / "s2", max_bytes=1000)
    with pytest.raises(SpoolError, match="at least 1"):
        Spool(tmp_path / "s", max_frames=0)


def test_garbled_wal_is_detected_logged_and_counted(tmp_path, caplog):
    """SQLite silently ignores a WAL from its first bad frame on; the spool notices before SQLite trims it."""
    writer = textwrap.dedent("""
        import os, sys
        from taskcodec.runtime.spool import Spool
        s = Spool(sys.argv[1], sync="normal")
        s._db.execute("PRAGMA wal_autocheckpoint=0")  # keep every frame in the WAL
        for i in range(300):
            s.append(i, b"x" * 40)
        print("done", flush=True)
        os.kill(os.getpid(), 9)  # no clean close: the WAL stays
    """)
    proc = subprocess.run([sys.executable, "-c", writer, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert "done" in proc.stdout, proc.stderr
    wal = tmp_path / "spool.sqlite3-wal"
    data = bytearray(wal.read_bytes())
    assert len(data) > 50 * 4120
    data[32 + 10 * 4120 + 100] ^= 0xFF  # flip a byte in frame 10's page
    wal.write_bytes(bytes(data))
    with caplog.at_level("ERROR"), Spool(tmp_path) as s:
        assert s.counters()["damaged_spools"] == 1
        assert s.depth() < 300  # what SQLite could not replay is gone...
    assert "SPOOL DAMAGED" in caplog.text and "checksum" in caplog.text  # ...but loudly, and counted
    assert list(tmp_path.glob("spool.sqlite3-wal.damaged-*"))


def test_clean_reopen_after_kill_is_not_damage(tmp_path):
    writer = textwrap.dedent("""
        import os, sys
        from taskcodec.runtime.spool import Spool
        s = Spool(sys.argv[1])
        for i in range(50):
            s.append(i, b"x" * 40)
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", writer, str(tmp_path)], timeout=60)
    with Spool(tmp_path) as s:
        assert s.counters()["damaged_spools"] == 0 and s.depth() == 50


def test_deleted_wal_after_a_crash_is_detected_and_counted(tmp_path, caplog):
    writer = textwrap.dedent("""
        import os, sys
        from taskcodec.runtime.spool import Spool
        s = Spool(sys.argv[1], sync="normal")
        s._db.execute("PRAGMA wal_autocheckpoint=0")
        for i in range(100):
            s.append(i, b"x" * 40)
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", writer, str(tmp_path)], timeout=60)
    (tmp_path / "spool.sqlite3-wal").unlink()  # an over-eager clean-up of the camera's storage
    with caplog.at_level("ERROR"), Spool(tmp_path) as s:
        assert s.counters()["damaged_spools"] == 1
    assert "write-ahead log was deleted" in caplog.text
    with Spool(tmp_path) as s:  # closed cleanly last time: nothing to report
        assert s.counters()["damaged_spools"] == 1


def test_deferred_acks_leave_at_once_and_are_deleted_in_batches(tmp_path):
    """ack_later (the uplink's acks): the frames leave depth() and pending() at once, their DELETE is batched; a full
    spool deletes them first (they are not counted as dropped); close() deletes them for good."""
    with Spool(tmp_path, max_frames=6) as s:
        e = s.epoch
        for i in range(6):
            s.append(i, bytes([i]))
        assert s.ack_later(e, 0, 2) == 2 and s.ack_later(e, 0, 2) == 0  # a duplicate ack is harmless
        assert s.ack_later(e, 3, 1) == 1 and s.depth() == 3
        assert s._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 6  # not deleted yet
        assert [f.seq for f in s.pending(10, after=(e, 3))] == [4, 5]  # a sender's next rows
        assert s._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 6
        assert [f.seq for f in s.pending(10, after=(e, 1))] == [2, 4, 5]  # acked ones are skipped (and deleted)
        s.ack_later(e, 2, 1)
        assert s.depth() == 2
        for i in range(4):
            s.append(10 + i, b"n")  # fills up to max_frames with the acked rows deleted, nothing dropped
        assert s.depth() == 6 and s.dropped == 0
        assert s.append(20, b"m") is not None and s.dropped == 1  # now the oldest unacked frame goes
        assert [f.seq for f in s.pending(10)] == [5, 6, 7, 8, 9, 10]
        s.ack_later(e, 5, 3)
        assert s._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 6
    with Spool(tmp_path) as s:
        assert s.depth() == 3 and [f.seq for f in s.pending(10)] == [8, 9, 10] and s.dropped == 1
        s.ACK_BATCH = 2
        s.ack_later(e, 8, 2)  # reaches the batch size: deleted now
        assert s._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 1


KILLED_ACKER = textwrap.dedent("""
    import sys
    from taskcodec.runtime.spool import Spool
    spool = Spool(sys.argv[1], max_frames=10**6)
    while True:
        seq = spool.next_seq
        spool.append(seq, b"frame-%d" % seq)
        print("stored", seq, flush=True)
        if seq % 2:
            spool.ack_later(spool.epoch, seq - 1, 2)
""")


def test_kill_with_deferred_acks_loses_no_unacked_frame(tmp_path):
    """A kill -9 with deferred acks pending: frames acked but not yet deleted may come back (they are re-sent and
    the server acks duplicates), a frame that was not acked never goes missing, and seqs are never reused."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ACKER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    stored = []
    try:
        while len(stored) < 300:
            line = proc.stdout.readline()
            if not line:
                break
            stored.append(int(line.split()[1]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert len(stored) >= 300, "writer did not get going"
    stored += [int(line.split()[1]) for line in proc.stdout.read().splitlines()]
    with Spool(tmp_path) as s:
        seqs = [f.seq for f in s.pending(10**6)]
        last = max(stored)
        if last % 2 == 0:
            assert last in seqs, "an unacked frame was lost"
        assert len(seqs) == len(set(seqs))
        assert s.ACK_BATCH < len(stored) and len(seqs) < len(stored)  # batches of deletes did commit
        assert s.append(0, b"new")[1] > last


def test_pending_skips_deferred_acks_yet_fills_its_limit(tmp_path):
    """pending(after=...) with deferred acks: random appends, acks (now and deferred), drops and a full spool; it
    returns the first ``limit`` frames still to send, never acked ones, never fewer because of acked ones."""
    import random

    rng = random.Random(7)
    with Spool(tmp_path, max_frames=40, sync="normal") as s:
        e = s.epoch
        for step in range(600):
            op = rng.random()
            if op < 0.5:
                s.append(step, b"f%d" % step)
            elif s.depth():
                first = rng.randrange(max(0, s.next_seq - 50), s.next_seq)
                count = rng.randint(1, 4)
                if op < 0.8:
                    s.ack_later(e, first, count)
                elif op < 0.9:
                    s.ack(e, first, count)
                else:
                    s.drop(e, first, count)
            after = (e, rng.randrange(max(0, s.next_seq - 45), s.next_seq + 1) - 1)
            limit = rng.randint(1, 20)
            got = s.pending(limit, after=after)
            rows = s._db.execute("SELECT seq FROM frames WHERE epoch = ? AND seq > ? ORDER BY seq", after).fetchall()
            later = s._later.get(e, set())
            want = [q for (q,) in rows if q not in later][:limit]
            assert [f.seq for f in got] == want, step
            assert all(f.payload == b"f%d" % f.ts_ms and f.epoch == e for f in got)


def test_append_many_is_one_transaction_and_falls_back_when_full(tmp_path):
    """A window of frames is stored in one transaction (one commit: one fsync with sync=full), with consecutive seqs,
    durable across a reopen; a window that does not fit the bound is stored frame by frame, oldest dropped, counted."""
    spool = Spool(tmp_path / "spool", max_frames=10)
    statements = []
    spool._db.set_trace_callback(statements.append)
    got = spool.append_many([(100 + k, b"f%d" % k) for k in range(6)])
    assert got == [(spool.epoch, k) for k in range(6)] and spool.depth() == 6 and spool.next_seq == 6
    assert sum(s.strip().upper() == "COMMIT" for s in statements) == 1, statements
    spool._db.set_trace_callback(None)
    assert spool.append_many([]) == []
    got = spool.append_many([(200 + k, b"g%d" % k) for k in range(6)])  # 12 > 10: two oldest dropped
    assert [s for _, s in got] == list(range(6, 12)) and spool.depth() == 10
    assert spool.counters()["dropped_full"] == 2
    epoch = spool.epoch
    spool.close()
    again = Spool(tmp_path / "spool", max_frames=10)
    rows = again.pending(100)
    assert again.epoch == epoch and [r.seq for r in rows] == list(range(2, 12))
    assert [(r.ts_ms, r.payload) for r in rows[:4]] == [(102, b"f2"), (103, b"f3"), (104, b"f4"), (105, b"f5")]
    assert again.append_many([(1, b"x")]) == [(epoch, 12)]
    again.close()


MANY_WRITER = textwrap.dedent("""
    import sys
    from taskcodec.runtime.spool import Spool
    spool = Spool(sys.argv[1], max_frames=10**6)
    print("epoch", spool.epoch, flush=True)
    while True:
        first = spool.next_seq
        got = spool.append_many([(1000 + first + k, b"frame-%d" % (first + k)) for k in range(5)])
        assert [s for _, s in got] == list(range(first, first + 5))
        print("stored", first + 4, flush=True)
""")


def test_append_many_survives_sigkill(tmp_path):
    """Windows stored with append_many under kill -9: every window reported stored is there whole, nothing twice,
    and an interrupted window is there whole or not at all (one transaction)."""
    proc = subprocess.Popen([sys.executable, "-c", MANY_WRITER, str(tmp_path / "spool")], stdout=subprocess.PIPE,
                            text=True)
    last, epoch = -1, None
    deadline = time.monotonic() + 60
    try:
        while last < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, value = line.split()
            if kind == "epoch":
                epoch = int(value)
            else:
                last = int(value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert epoch is not None and last >= 200, "writer did not get going"
    spool = Spool(tmp_path / "spool")
    seqs = [r.seq for r in spool.pending(10**6)]
    assert seqs == list(range(len(seqs))) and len(seqs) > last and len(seqs) % 5 == 0
    spool.close()
