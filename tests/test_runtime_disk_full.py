"""The runtime as a real subprocess on a full disk, and blocking sources under SIGTERM.

Disk full: the spool lives on a real 8 MB tmpfs (mounted here; this needs root, which the CI and dev containers
have — without it the test falls back to emulating the limit with --spool-max-bytes, i.e. SQLite's max_page_count,
and says so). The filesystem is filled to the brim by another file while the camera cannot reach its server: the
runtime keeps capturing, drops the oldest frames and counts them, never exits with an error, keeps its disk use
bounded; then a real server comes up and everything still spooled is delivered, with stored + dropped = captured."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from taskcodec.bench import faults
from taskcodec.testing import fill_filesystem

RUNTIME = [sys.executable, "-m", "taskcodec.runtime.cli", "capture"]


@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    mounted = proc.returncode == 0
    yield mnt, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_spool_filesystem_drops_oldest_counts_and_never_exits(small_fs, tmp_path):
    mnt, mounted = small_fs
    spool = mnt / "spool"
    rig = faults.Rig(tmp_path / "rig")
    try:
        token = rig.token_file("cam-full")
        port = rig.server.port
        rig.server.stop()  # the camera's server is down while its disk fills
        offline = ["--device", "virtual://fashion-mnist?size=64x64", "--server", f"http://127.0.0.1:{port}",
                   "--camera-id", "cam-full", "--token-file", str(token), "--spool", str(spool), "--max-delay", "0",
                   "-q", "--loop"]
        if not mounted:  # emulate an 8 MB disk with the spool's own byte bound (SQLite max_page_count)
            offline += ["--spool-max-bytes", str(1 << 20)]
        first = subprocess.run(RUNTIME + offline + ["--frames", "300", "--drain-timeout", "0"], capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 3 and "nothing was delivered" in first.stderr, first.stderr[-2000:]
        if mounted:
            fill_filesystem(mnt / "filler")  # to the brim: not one more 512-byte block fits
            assert os.statvfs(mnt).f_bavail == 0
        report = tmp_path / "r.json"
        second = subprocess.run(RUNTIME + offline + ["--frames", "3000", "--drain-timeout", "0", "--report",
                                                     str(report)], capture_output=True, text=True, timeout=300)
        # exit 3 = "nothing delivered" (the server is down): the run itself never failed on the full disk
        assert second.returncode == 3, second.stderr[-3000:]
        assert "Traceback" not in second.stderr and "spool full" in second.stderr
        r = json.loads(report.read_text())
        assert r["frames"] == 3000
        dropped = r["drops"]["dropped_full"]
        assert dropped > 0 and r["drops"]["dropped_disk_full"] == 0  # room was made by dropping, not by losing
        own = sum(p.stat().st_size for p in spool.iterdir())
        assert own <= (8 << 20) if mounted else own <= (1 << 20) + (256 << 10)
        db = sqlite3.connect(f"file:{spool / 'spool.sqlite3'}?mode=ro", uri=True)
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        seqs = [s for (s,) in db.execute("SELECT seq FROM frames ORDER BY seq")]
        db.close()
        assert seqs == list(range(3300 - len(seqs), 3300))  # the newest frames survive, the oldest were dropped
        assert dropped == 3300 - len(seqs)  # each drop counted once
        # the server comes back (same port): everything still spooled is delivered, even with the disk still full
        rig.server.extra_args += ["--port", str(port)]
        rig.server.start()
        online = subprocess.run(RUNTIME + [a if a != f"http://127.0.0.1:{port}" else rig.server.url for a in offline]
                                + ["--frames", "20", "--drain-timeout", "60"], capture_output=True, text=True,
                                timeout=300)
        assert online.returncode == 0, online.stderr[-3000:]
        life = faults.read_spool(faults.Lifetime("cam-full", spool))
        assert life.depth == 0 and life.next_seq == 3320
        stored = rig.stored("cam-full")
        assert len(stored) + life.dropped == life.next_seq  # stored + dropped = every frame captured
        assert faults.audit(rig, [life])["acked_missing"] == 0
    finally:
        rig.close()


def test_fw_source_without_firmware_honours_sigterm(tmp_path):
    sock = tmp_path / "frames.sock"
    proc = subprocess.Popen(RUNTIME + ["--device", f"fw://{sock}", "--server", "http://127.0.0.1:9", "--camera-id",
                                       "c", "--spool", str(tmp_path / "s"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "socket never appeared"
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert time.monotonic() - sent < 5
        assert code == 0, proc.stderr.read()  # nothing captured and nothing pending: a clean stop
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_paced_source_honours_sigterm_between_frames(tmp_path):
    """--fps 0.1: the source sleeps 10 s between frames; SIGTERM ends the sleep at once (not after the next frame)."""
    proc = subprocess.Popen(RUNTIME + ["--device", "virtual://fashion-mnist", "--server", "http://127.0.0.1:9",
                                       "--camera-id", "c", "--spool", str(tmp_path / "s"), "--fps", "0.1",
                                       "--drain-timeout", "0", "-q", "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        spool = tmp_path / "s" / "spool.sqlite3"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if spool.exists() and sqlite3.connect(spool).execute("SELECT COUNT(*) FROM frames").fetchone()[0]:
                    break  # the first frame is in: the source now sleeps ~10 s
            except sqlite3.Error:
                pass  # the runtime is still creating its spool
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        assert time.monotonic() - sent < 5, "the source slept through SIGTERM"
        assert code == 3, proc.stderr.read()  # one frame captured, nothing delivered (no server): exit 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
