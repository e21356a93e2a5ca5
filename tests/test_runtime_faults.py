"""Fault injection with the real processes (issue 11): a real server subprocess (taskcodec.testing.ServerProcess via
taskcodec.bench.faults.Rig) and `runtime capture` subprocesses. The full runs (10+ rounds each) are
`taskcodec bench faults`; these are the same scenarios with fewer rounds, plus the audit's own negative control."""

import random
import subprocess
import sys

import pytest

from taskcodec import wire
from taskcodec.bench import faults


@pytest.fixture()
def rig(tmp_path):
    r = faults.Rig(tmp_path)
    yield r
    r.close()


def _clean(result):
    assert result["acked_missing"] == 0 and result["duplicates"] == 0, result
    assert result["wedged"] == 0 and result["wrong_times"] == 0, result


def test_runtime_killed_at_random_moments_loses_and_duplicates_nothing(rig):
    result = faults.runtime_kill9(rig, 3, random.Random(1))
    _clean(result)
    assert result["stored"] == result["frames_handed_out"] > 0


def test_reboots_with_a_wiped_spool_and_a_1970_clock(rig):
    result = faults.reboot_wiped_spool_1970(rig, 2, random.Random(2))
    _clean(result)
    assert result["epochs"] == 2 and result["stored"] == result["handed_out"] >= 40
    assert result["max_stored_ts_ms"] < 120_000  # the fake 1970 clock's times are what the server stored


def test_clock_steps_of_a_year_inside_a_batch_store_true_times(rig):
    result = faults.clock_step(rig, 2, random.Random(3))  # +1 year (from 1970), -1 year (from 2023)
    _clean(result)
    assert {s["step_ms"] for s in result["steps"]} == {faults.YEAR_MS, -faults.YEAR_MS}
    assert result["stored"] == 90


def test_the_audit_can_fail(tmp_path):
    """Negative control: lost, foreign and reused-epoch rows are counted (so zeros above mean something)."""

    class FakeRig:
        def stored(self, camera):
            return [(7, 0, 10), (7, 1, 20), (7, 3, 40), (9, 0, 1), (7, 99, 1)]

    a = faults.Lifetime("c", tmp_path, epoch=7, next_seq=5)  # seqs 0..4 handed out, all gone: 2 and 4 are lost
    b = faults.Lifetime("c", tmp_path, epoch=7, next_seq=0)  # a wiped spool that drew the same epoch
    result = faults.audit(FakeRig(), [a, b])
    assert result["acked_missing"] == 2
    assert result["duplicates"] == 1 + 1 + 1  # reused epoch, a row of an unknown epoch, a seq never handed out
    clocked = faults.Lifetime("c", tmp_path, epoch=7, next_seq=5, clock={"base": 0, "after": 1, "step": 1000})
    assert faults.audit(FakeRig(), [clocked])["wrong_times"] == 2  # seq 1 at 20 and seq 3 at 40, not >= 1000


def test_server_refuses_a_version_1_camera_with_a_clear_reason(rig):
    from taskcodec.bundle import load_bundle

    token = rig.server.add_camera("old-cam")
    hello = bytearray(wire.Hello(load_bundle(None).model_tag, "old-cam", token).encode())
    hello[1] = 1  # a camera still speaking wire version 1
    with rig.server.stream() as c:
        replies = c.send_raw(bytes(hello))
    assert len(replies) == 1 and isinstance(replies[0], wire.Error) and replies[0].code == wire.Code.BAD_MESSAGE
    assert "wire version 1 is not supported" in replies[0].reason and "version 2" in replies[0].reason


def test_runtime_exits_loudly_on_an_old_server_protocol_error(rig, tmp_path):
    """A HELLO refusal (here: unknown camera) stops the runtime with exit 1 at once, not a retry loop."""
    cmd = rig.command("cam-x", tmp_path / "s", frames=3, fps=50)
    cmd[cmd.index("--token-file") + 1] = str(tmp_path / "wrong-token")
    (tmp_path / "wrong-token").write_text("not-the-token")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unauthorized" in proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
