"""The spool is durable (a writer killed with SIGKILL loses no acknowledged-as-written frame and leaves no
duplicates), bumps its epoch on every open, hands out frames oldest first and drops the oldest when full."""

import signal
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
    assert spool.epoch > epoch
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
    # new frames of the new boot never collide with the old ones and queue behind them
    assert spool.append(5, b"new") == (spool.epoch, 0)
    assert spool.pending(10**6)[-1].epoch == spool.epoch
    spool.close()


def test_epoch_order_ack_and_drop(tmp_path):
    with Spool(tmp_path) as s:
        e = s.epoch
        assert e >= int(time.time()) - 60  # wall-clock based, so a wiped spool does not restart at 1
        for i in range(5):
            assert s.append(i, bytes([i])) == (e, i)
        assert [f.seq for f in s.pending(3)] == [0, 1, 2]
        assert [f.seq for f in s.pending(10, after=(e, 2))] == [3, 4]
        assert s.ack(e, 0, 2) == 2 and s.depth() == 3
        assert s.ack(e, 0, 2) == 0  # a duplicate ack is harmless
        assert s.drop(e, 4, 1) == 1 and s.dropped == 1
    with Spool(tmp_path) as s:
        e2 = s.epoch
        assert e2 > e and s.depth() == 2 and s.dropped == 1
        s.append(0, b"x")
        assert [(f.epoch, f.seq) for f in s.pending(10)] == [(e, 2), (e, 3), (e2, 0)]
    with Spool(tmp_path) as s:
        assert s.epoch > e2  # strictly increasing even within one second


def test_full_spool_drops_oldest(tmp_path):
    with Spool(tmp_path, max_frames=4) as s:
        for i in range(10):
            s.append(i, b"p")
        assert s.depth() == 4 and s.dropped == 6 and s.full_drops == 6
        assert [f.seq for f in s.pending(10)] == [6, 7, 8, 9]


def test_bad_spool_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match="cannot create spool folder"):
        Spool(blocker / "spool")
    (tmp_path / "bad.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError, match="cannot open spool"):
        Spool(tmp_path / "bad.sqlite3")
    with pytest.raises(SpoolError, match="at least 1"):
        Spool(tmp_path / "s", max_frames=0)
