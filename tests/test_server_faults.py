"""Storage faults and frame identity on the real server subprocess: a disk that fills up (a real tmpfs mount of a few
MiB: this test runs as root, or is skipped saying so), a corrupted database page, a re-used key with another
payload, and revocation (remove / rotate) of a camera with a live session."""

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.server.process import ServerError
from taskcodec.testing import ServerProcess, wait_for, fill_filesystem
from tiny_bundle import make_tiny_bundle


def _frames(bundle, first_seq, n, seed=0, ts0=1_700_000_000_000):
    coder = RangeCoder(bundle.tables)
    symbols = np.random.default_rng(seed).integers(-6, 7, (n, bundle.latent_dim)).astype(np.int32)
    return [wire.Frame(first_seq + i, ts0 + 100 * i, compress(s, coder, bundle.model_tag))
            for i, s in enumerate(symbols)]


def _stored(db, cam=None):
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT camera_id, epoch, seq, payload FROM frames").fetchall()
    return {(c, e, s): bytes(p) for c, e, s, p in rows if cam is None or c == cam}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "taskcodec.server", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


def test_same_key_other_payload_is_refused_loudly_same_payload_acked(bundle, tmp_path):
    db = tmp_path / "frames.db"
    with ServerProcess(bundle.path, db) as srv:
        token = srv.add_camera("cam-c")
        hello = wire.Hello(bundle.model_tag, "cam-c", token)
        first = _frames(bundle, 0, 6, seed=1)
        other = _frames(bundle, 0, 6, seed=2)  # same keys, different payloads
        epoch = 0x5EED_0000_0000_0001
        with srv.stream() as c:
            assert c.hello(hello) == wire.Welcome()
            assert c.send(wire.Batch(epoch, first)) == [wire.Ack(epoch, 0, 6)]
            assert c.send(wire.Batch(epoch, first)) == [wire.Ack(epoch, 0, 6)]  # duplicate: acked again
            mixed = first[:2] + other[2:4] + first[4:]
            replies = c.send(wire.Batch(epoch, mixed))
        assert replies[0] == wire.Ack(epoch, 0, 2) and replies[2] == wire.Ack(epoch, 4, 2)
        assert isinstance(replies[1], wire.Reject) and replies[1].code == wire.Code.CONFLICT
        assert (replies[1].first_seq, replies[1].count) == (2, 2) and "different payload" in replies[1].reason
        stored = _stored(db, "cam-c")
        assert {k[2]: v for k, v in stored.items()} == {f.seq: f.payload for f in first}  # originals kept
        assert "already stored with a different payload" in srv.log()
        metrics = srv.get_text("/metrics")
        assert "taskcodec_server_frames_conflict_total 2.0" in metrics
        assert 'taskcodec_server_frames_rejected_total{reason="conflict"} 2.0' in metrics


def test_remove_and_rotate_end_live_sessions(bundle, tmp_path):
    db = tmp_path / "frames.db"
    with ServerProcess(bundle.path, db) as srv:
        tokens = {cam: srv.add_camera(cam) for cam in ("cam-r", "cam-s")}
        frames = _frames(bundle, 0, 4)
        # removal: an idle session is closed within the re-check interval (2 s by default)
        idle = srv.stream(timeout=15)
        assert idle.hello(wire.Hello(bundle.model_tag, "cam-r", tokens["cam-r"])) == wire.Welcome()
        assert idle.send(wire.Batch(1, frames[:2])) == [wire.Ack(1, 0, 2)]
        out = _cli("cameras", "remove", "cam-r", "--db", str(db))
        assert out.returncode == 0, out.stderr
        t0 = time.monotonic()
        replies = idle.receive()
        assert time.monotonic() - t0 < 10
        assert replies and replies[0].code == wire.Code.UNAUTHORIZED and "removed or token rotated" in replies[0].reason
        assert idle.closed()
    # rotation: the next batch of an open session is refused inside its storing transaction, nothing stored (the
    # idle re-check is pushed out of the way so that the transaction is what refuses it)
    cfg = tmp_path / "slow-recheck.yaml"
    cfg.write_text("limits:\n  revocation_check_s: 120\n")
    with ServerProcess(bundle.path, db, "--config", str(cfg)) as srv:
        busy = srv.stream(timeout=15)
        assert busy.hello(wire.Hello(bundle.model_tag, "cam-s", tokens["cam-s"])) == wire.Welcome()
        assert busy.send(wire.Batch(1, frames[:2])) == [wire.Ack(1, 0, 2)]
        out = _cli("cameras", "rotate", "cam-s", "--db", str(db))
        assert out.returncode == 0, out.stderr
        new_token = out.stdout.strip().encode()
        assert len(new_token) >= 40 and new_token != tokens["cam-s"]
        replies = busy.send(wire.Batch(1, frames[2:]))
        assert [type(r) for r in replies] == [wire.Error] and replies[0].code == wire.Code.UNAUTHORIZED
        assert set(_stored(db, "cam-s")) == {("cam-s", 1, 0), ("cam-s", 1, 1)}
        with srv.stream() as c:  # the old token is refused, the new one works
            assert c.hello(wire.Hello(bundle.model_tag, "cam-s", tokens["cam-s"])).code == wire.Code.UNAUTHORIZED
        with srv.stream() as c:
            assert c.hello(wire.Hello(bundle.model_tag, "cam-s", new_token)) == wire.Welcome()
            assert c.send(wire.Batch(1, frames[2:])) == [wire.Ack(1, 2, 2)]
        assert "camera authentication failed: camera 'cam-s' from 127.0.0.1" in srv.log()
        assert _cli("cameras", "rotate", "nobody", "--db", str(db)).returncode == 2


def test_removal_ends_sessions_on_every_worker(bundle, tmp_path):
    """With --workers 2 the sessions live in two processes; removal reaches both through the database."""
    db = tmp_path / "frames.db"
    with ServerProcess(bundle.path, db, "--workers", "2", "--log-level", "info") as srv:
        token = srv.add_camera("cam-w")
        import psutil

        def holders():
            return {c.pid for c in psutil.Process(srv.proc.pid).children(recursive=True)
                    if any(k.status == psutil.CONN_ESTABLISHED and k.laddr.port == srv.port
                           for k in c.net_connections(kind="tcp"))}

        sessions = []
        while len(holders()) < 2 and len(sessions) < 40:  # the kernel spreads connections over the two workers
            s = srv.stream(timeout=15)
            k = len(sessions)
            assert s.hello(wire.Hello(bundle.model_tag, "cam-w", token)) == wire.Welcome()
            assert s.send(wire.Batch(k, _frames(bundle, 0, 1))) == [wire.Ack(k, 0, 1)]
            sessions.append(s)
        assert len(holders()) == 2, "sessions on both workers"
        assert _cli("cameras", "remove", "cam-w", "--db", str(db)).returncode == 0
        for s in sessions:
            replies = s.receive()
            assert replies and replies[0].code == wire.Code.UNAUTHORIZED, replies
            assert s.closed()


def _corrupt_page(db: Path, page: int) -> None:
    with open(db, "r+b") as f:
        f.seek(4096 * page)
        f.write(np.random.default_rng(page).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _filled_db(bundle, db):
    with ServerProcess(bundle.path, db) as srv:
        token = srv.add_camera("cam-d")
        with srv.stream() as c:
            assert c.hello(wire.Hello(bundle.model_tag, "cam-d", token)) == wire.Welcome()
            for k in range(6):
                assert c.send(wire.Batch(3, _frames(bundle, 100 * k, 100, seed=k)))[0].count == 100
    return token


def test_corrupted_page_refuses_to_start_and_turns_healthz_503(bundle, tmp_path):
    db = tmp_path / "frames.db"
    _filled_db(bundle, db)
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0  # checkpointed on close
    pages = db.stat().st_size // 4096
    assert pages > 8
    good = db.read_bytes()
    _corrupt_page(db, pages // 2)
    with pytest.raises(ServerError) as err:
        ServerProcess(bundle.path, db, startup_timeout=30).start()
    assert "is damaged" in str(err.value) and "refusing to start" in str(err.value)
    assert _cli("db", "check", "--db", str(db)).returncode == 2
    # a file damaged while the server runs: the periodic check turns /healthz to 503
    db.write_bytes(good)
    cfg = tmp_path / "server.yaml"
    cfg.write_text("storage:\n  integrity_check_interval_s: 1\n")
    with ServerProcess(bundle.path, db, "--config", str(cfg)) as srv:
        assert srv.health()["integrity"] == "ok"
        _corrupt_page(db, pages // 2)
        wait_for(lambda: srv.health().get("http_status") == 503, 20, "healthz 503")
        health = srv.health()
        assert health["integrity"] == "damaged" and health["status"] != "ok"
        assert "storage damaged" in srv.log()


def test_database_files_are_private_and_schema_versioned(bundle, tmp_path):
    db = tmp_path / "frames.db"
    _filled_db(bundle, db)
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if p.exists():
            assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))
    with sqlite3.connect(db) as conn:
        from taskcodec.server.storage import SCHEMA_VERSION

        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.execute("PRAGMA user_version=0")  # an old database: migrated at start with a log line
    os.chmod(db, 0o644)
    out = _cli("db", "migrate", "--db", str(db))
    assert out.returncode == 0 and f"0 -> {SCHEMA_VERSION}" in out.stdout, out
    assert db.stat().st_mode & 0o077 == 0
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ServerError) as err:
        ServerProcess(bundle.path, db, startup_timeout=30).start()
    assert "newer than this taskcodec" in str(err.value)


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB tmpfs, so SQLite meets a genuinely full filesystem (ENOSPC -> SQLITE_FULL)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk-full test emulates nothing else)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_busy_healthz_one_log_line_then_full_recovery(bundle, small_disk):
    db = small_disk / "frames.db"
    filler = small_disk / "filler"
    with ServerProcess(bundle.path, db) as srv:
        token = srv.add_camera("cam-f")
        hello = wire.Hello(bundle.model_tag, "cam-f", token)
        sent = _frames(bundle, 0, 400, seed=5)
        acked: set[int] = set()

        def send(c, lo, hi):
            replies = c.send(wire.Batch(7, sent[lo:hi]))
            for r in replies:
                if isinstance(r, wire.Ack):
                    acked.update(range(r.first_seq, r.first_seq + r.count))
            return replies

        with srv.stream() as c:
            assert c.hello(hello) == wire.Welcome()
            send(c, 0, 50)
        fill_filesystem(filler)
        busy = []
        # frames keep coming while the disk is full: a batch is answered BUSY (never "cannot rollback"), new
        # HELLOs get BUSY at once; /healthz says 503 throughout
        deadline = time.monotonic() + 4
        k = 50
        while time.monotonic() < deadline:
            with srv.stream() as c:
                first = c.hello(hello)
                if first == wire.Welcome():
                    replies = send(c, k, k + 50)
                    if isinstance(replies[-1], wire.Ack):
                        k += 50  # room was left for this one
                        continue
                    first = replies[-1]
                busy.append(first)
            time.sleep(0.2)
        assert busy and all(isinstance(e, wire.Error) and e.code == wire.Code.BUSY for e in busy), busy
        assert "retry_after_s=" in busy[0].reason and "rollback" not in busy[0].reason
        health = srv.health()
        assert health.get("http_status") == 503 and health["storage"] == "full", health
        with srv.http() as h:  # over HTTP: 503 with a Retry-After
            r = h.post(hello, wire.Batch(7, sent[k:k + 5]))
            assert r.status == 503 and r.retry_after == "5" and r.replies[0].code == wire.Code.BUSY, r
        filler.unlink()
        wait_for(lambda: srv.health()["status"] == "ok", 20, "recovery")
        with srv.stream() as c:
            assert c.hello(hello) == wire.Welcome()
            for lo in range(k, 400, 50):
                assert isinstance(send(c, lo, lo + 50)[-1], wire.Ack)
            send(c, 0, k)  # what the camera still held is re-sent: acked (duplicates or new)
        log = srv.log()
        assert log.count("storage full:") == 1, log
        assert log.count("storage writable again") == 1, log
        assert "cannot rollback" not in log
    assert acked == set(range(400))
    assert set(_stored(db)) >= {("cam-f", 7, s) for s in acked}
