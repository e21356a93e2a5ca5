"""`taskcodec bench faults`: fault injection against the real processes (issue 11): a real ingest server subprocess
and real `runtime capture` subprocesses, killed with SIGKILL at random moments, rebooted with a wiped spool and a
fixed 1970 boot clock, and with the wall clock stepped by -1 to +1 year in the middle of a batch. After each
scenario the runtime runs once more to drain its spool, and the server's database is compared with the spools:

- acked frames missing: a (epoch, seq) the spool handed out and no longer holds (so it was acked or dropped), not
  counted as dropped, and absent from the server — the frame was lost after its ACK;
- duplicates: a server row outside every spool lifetime's (epoch, 0..next_seq) range, or two spool lifetimes (a wiped
  spool and its successor) sharing an epoch (the server would ack the second's frames as duplicates of the first's);
- wedged cameras: a final run that does not drain its spool (or exits non-zero);
- wrong times (clock steps): a stored capture time other than the fake clock's reading for that frame.

Scenarios are registered in ``SCENARIOS`` (name -> function(rig, rounds, rng) -> dict); server-side scenarios (disk
full, flood) live in their own module and register themselves with :func:`scenario` — ``run`` imports
``taskcodec.bench.faults_server`` if it exists. Results: bench/results/faults.{json,md}.

The fake clock is the runtime's TASKCODEC_FAKE_CLOCK (taskcodec/runtime/clock.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import typer

YEAR_MS = 365 * 86_400_000
SCENARIOS: dict[str, Callable] = {}


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


@dataclass
class Lifetime:
    """One spool's life (created, used by one or more runtime runs, maybe wiped)."""

    camera: str
    spool: Path
    epoch: int | None = None
    next_seq: int = 0
    depth: int = 0
    dropped: int = 0
    clock: dict = field(default_factory=dict)  # fake clock spec for a clock check: base, after, step


class Rig:
    """A real server subprocess plus helpers to run `runtime capture` subprocesses against it."""

    def __init__(self, root: Path, bundle: str | None = None):
        from taskcodec.testing import ServerProcess

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundle = bundle
        self.db = self.root / "server.db"
        self.server = ServerProcess(bundle, self.db).start()
        self.tokens: dict[str, Path] = {}
        self.runs = 0

    def close(self) -> None:
        self.server.stop()

    def token_file(self, camera: str) -> Path:
        if camera not in self.tokens:
            path = self.root / f"{camera}.token"
            path.write_bytes(self.server.add_camera(camera))
            path.chmod(0o600)
            self.tokens[camera] = path
        return self.tokens[camera]

    def command(self, camera: str, spool: Path, *, frames: int, fps: float, max_delay: float = 0.2,
                drain_timeout: float = 30.0, seed: int = 0, report: Path | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device",
               f"virtual://fashion-mnist?seed={seed}", "--server", self.server.url, "--camera-id", camera,
               "--token-file", str(self.token_file(camera)), "--spool", str(spool), "--frames", str(frames),
               "--fps", str(fps), "--max-delay", str(max_delay), "--drain-timeout", str(drain_timeout), "-q",
               "--loop"]
        if self.bundle:
            cmd += ["--bundle", str(self.bundle)]
        if report is not None:
            cmd += ["--report", str(report)]
        return cmd

    def start(self, cmd: list[str], clock: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("TASKCODEC_FAKE_CLOCK", "TASKCODEC_TOKEN")}
        if clock is not None:
            env["TASKCODEC_FAKE_CLOCK"] = clock
        self.runs += 1
        log = open(self.root / f"run-{self.runs}.log", "wb")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def run(self, cmd: list[str], clock: str | None = None, timeout: float = 300.0) -> int:
        proc = self.start(cmd, clock)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            return -9

    def stored(self, camera: str) -> list[tuple[int, int, int]]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute("SELECT epoch, seq, ts_capture_ms FROM frames WHERE camera_id = ? ORDER BY epoch, seq",
                              (camera,)).fetchall()
        finally:
            db.close()


def read_spool(life: Lifetime) -> Lifetime:
    """The spool's durable state, read directly (no identity check, no integrity fix-ups)."""
    db = sqlite3.connect(f"file:{life.spool / 'spool.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        life.epoch = int(meta["epoch"])
        top = db.execute("SELECT MAX(seq) FROM frames WHERE epoch = ?", (life.epoch,)).fetchone()[0]
        life.next_seq = max(int(meta["seq_floor"]), -1 if top is None else top + 1)
        life.depth = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
        life.dropped = sum(int(meta.get(k, 0)) for k in ("dropped_full", "dropped_rejected"))
    finally:
        db.close()
    return life


def audit(rig: Rig, lives: list[Lifetime], *, time_tolerance_ms: int = 120_000) -> dict:
    """Compare the server's rows with the spools' lifetimes (see the module docstring)."""
    missing = duplicates = wrong_times = 0
    cameras = {life.camera for life in lives}
    for camera in cameras:
        rows = rig.stored(camera)
        mine = [life for life in lives if life.camera == camera]
        epochs = [life.epoch for life in mine]
        duplicates += len(epochs) - len(set(epochs))  # a reused epoch: the server would take frames for duplicates
        by_epoch: dict[int, dict[int, int]] = {}
        for epoch, seq, ts in rows:
            by_epoch.setdefault(epoch, {})[seq] = ts
        known: dict[int, Lifetime] = {}
        for life in mine:
            if life.epoch not in known or life.next_seq > known[life.epoch].next_seq:
                known[life.epoch] = life
        for epoch, seqs in by_epoch.items():
            life = known.get(epoch)
            duplicates += len(seqs) if life is None else sum(1 for s in seqs if s >= life.next_seq)
        for life in mine:
            seqs = {s: ts for s, ts in by_epoch.get(life.epoch, {}).items() if s < life.next_seq}
            # every seq handed out left the spool (depth 0 after the drain) acked or dropped; dropped are counted
            gone = life.next_seq - life.depth
            missing += max(0, gone - life.dropped - len(seqs))
            if life.clock:
                base, after, step = life.clock["base"], life.clock["after"], life.clock["step"]
                for seq, ts in seqs.items():
                    expect = base + (step if seq >= after else 0)
                    if not expect <= ts <= expect + time_tolerance_ms:
                        wrong_times += 1
    return {"acked_missing": missing, "duplicates": duplicates, "wrong_times": wrong_times}


def _final_drain(rig: Rig, life: Lifetime, clock: str | None = None) -> bool:
    """One more normal run (5 frames) that must drain the spool and exit 0; False = wedged."""
    code = rig.run(rig.command(life.camera, life.spool, frames=5, fps=50, drain_timeout=60), clock=clock)
    read_spool(life)
    return code == 0 and life.depth == 0


@scenario("runtime_kill9")
def runtime_kill9(rig: Rig, rounds: int, rng: random.Random) -> dict:
    """SIGKILL the runtime at a random moment (0.3..5 s after its start: during start-up, capture, send, ack),
    ``rounds`` times on one spool, then drain."""
    life = Lifetime("kill9", rig.root / "spool-kill9")
    kills = []
    for _ in range(rounds):
        proc = rig.start(rig.command(life.camera, life.spool, frames=10**6, fps=40))
        delay = rng.uniform(0.3, 5.0)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        kills.append(round(delay, 2))
    wedged = 0 if _final_drain(rig, life) else 1
    result = audit(rig, [life])
    return {**result, "wedged": wedged, "rounds": rounds, "kill_after_s": kills, "frames_handed_out": life.next_seq,
            "stored": len(rig.stored(life.camera))}


@scenario("server_kill9")
def server_kill9(rig: Rig, rounds: int, rng: random.Random) -> dict:
    """SIGKILL the server at a random moment (0.5..4 s into each stretch) while a camera streams at 40 fps, restart
    it on the same port and database, ``rounds`` times; then stop the camera with SIGTERM and drain."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rig.server.stop()
    rig.server.extra_args += ["--port", str(port)]  # the last --port wins: restarts keep the camera's URL valid
    rig.server.start()
    life = Lifetime("srvkill9", rig.root / "spool-srvkill9")
    proc = rig.start(rig.command(life.camera, life.spool, frames=10**6, fps=40))
    kills = []
    for _ in range(rounds):
        delay = rng.uniform(0.5, 4.0)
        time.sleep(delay)
        rig.server.kill()
        kills.append(round(delay, 2))
        rig.server.start()
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
        sigterm_ok = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        sigterm_ok = False
    wedged = 0 if _final_drain(rig, life) else 1
    result = audit(rig, [life])
    return {**result, "wedged": wedged + int(not sigterm_ok), "rounds": rounds, "kill_after_s": kills,
            "frames_handed_out": life.next_seq, "stored": len(rig.stored(life.camera))}


@scenario("reboot_wiped_spool_1970")
def reboot_wiped_spool_1970(rig: Rig, rounds: int, rng: random.Random) -> dict:
    """Each round: a camera boots with its clock at 1970-01-01 00:00:00 (no real-time clock) and an empty spool
    (wiped), captures 20 frames and delivers them; half the rounds are SIGKILLed mid-stream and rebooted (same spool,
    same 1970 clock) before the wipe. Under wire v1 every boot reused the same epoch."""
    lives, wedged = [], 0
    for i in range(rounds):
        spool = rig.root / "spool-1970"
        shutil.rmtree(spool, ignore_errors=True)  # the wipe
        life = Lifetime("reboot1970", spool)
        if i % 2:
            proc = rig.start(rig.command(life.camera, spool, frames=10**6, fps=40), clock="0")
            time.sleep(rng.uniform(2.0, 4.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        code = rig.run(rig.command(life.camera, spool, frames=20, fps=50), clock="0")
        read_spool(life)
        wedged += int(code != 0 or life.depth != 0)
        lives.append(life)
    result = audit(rig, lives)
    rows = rig.stored("reboot1970")
    return {**result, "wedged": wedged, "rounds": rounds, "epochs": len({life.epoch for life in lives}),
            "stored": len(rows), "handed_out": sum(life.next_seq for life in lives),
            "max_stored_ts_ms": max((r[2] for r in rows), default=None)}


@scenario("clock_step")
def clock_step(rig: Rig, rounds: int, rng: random.Random) -> dict:
    """Each round: a fresh camera whose clock steps by one of -1 year, -1 day, +1 day, +1 year after frame k
    (random 5..30), inside a batch (batches of up to 0.5 s at 60 fps); every stored time must be the clock's."""
    lives, wedged, steps = [], 0, []
    bases = {YEAR_MS: 0, -YEAR_MS: 1_700_000_000_000, 86_400_000: 1_700_000_000_000, -86_400_000: 1_700_000_000_000}
    for i in range(rounds):
        step = [YEAR_MS, -YEAR_MS, 86_400_000, -86_400_000][i % 4] if i >= 2 else [YEAR_MS, -YEAR_MS][i]
        after = rng.randint(5, 30)
        base = bases[step]
        life = Lifetime(f"clock-{i}", rig.root / f"spool-clock-{i}", clock={"base": base, "after": after, "step": step})
        code = rig.run(rig.command(life.camera, life.spool, frames=45, fps=60, max_delay=0.5),
                       clock=f"{base},{after}:{step}")
        read_spool(life)
        wedged += int(code != 0 or life.depth != 0)
        lives.append(life)
        steps.append({"step_ms": step, "after_frame": after, "exit": code})
    result = audit(rig, lives)
    return {**result, "wedged": wedged, "rounds": rounds, "steps": steps,
            "stored": sum(len(rig.stored(life.camera)) for life in lives)}


def run(rounds: int = 10, only: list[str] | None = None, out: Path | None = Path("bench/results"), seed: int = 0,
        bundle: str | None = None, log: Callable[[str], None] = print) -> dict:
    try:
        import taskcodec.bench.faults_server  # noqa: F401  (server-side scenarios register themselves)
    except ImportError:
        pass
    from taskcodec.report import machine_info, utc_now, write_json, write_text

    rng = random.Random(seed)
    names = only or list(SCENARIOS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="taskcodec-faults-") as tmp:
        for name in names:
            root = Path(tmp) / name
            root.mkdir()
            rig = Rig(root, bundle)
            started = time.monotonic()
            try:
                results[name] = SCENARIOS[name](rig, rounds, rng)
            finally:
                rig.close()
            results[name]["wall_s"] = round(time.monotonic() - started, 1)
            log(f"{name}: {json.dumps(results[name])}")
    report = {"rounds": rounds, "seed": seed, "machine": machine_info(), "utc": utc_now(), "scenarios": results,
              "command": f"taskcodec bench faults --rounds {rounds}" + "".join(f" --only {n}" for n in only or []),
              "ok": all(r.get("acked_missing", 0) == 0 and r.get("duplicates", 0) == 0 and r.get("wedged", 0) == 0
                        and r.get("wrong_times", 0) == 0 for r in results.values())}
    if out is not None:
        write_json(out / "faults.json", report)
        write_text(out / "faults.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    from taskcodec.report import machine_line

    lines = ["# Fault injection against the real processes (issue 11)", "",
             f"`{report['command']}` — real `taskcodec serve` subprocess and real `runtime capture` subprocesses; "
             f"machine: {machine_line(report['machine'])}; {report.get('utc', '')}.", "",
             "| scenario | rounds | acked frames missing | duplicates | wedged cameras | wrong capture times | "
             "frames stored | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["scenarios"].items():
        lines.append(f"| {name} | {r.get('rounds', '')} | {r.get('acked_missing', '')} | {r.get('duplicates', '')} | "
                     f"{r.get('wedged', '')} | {r.get('wrong_times', '')} | {r.get('stored', '')} | "
                     f"{r.get('wall_s', '')} |")
    lines += ["", "Definitions: see the docstring of taskcodec/bench/faults.py. All zero: "
              + ("yes" if report["ok"] else "**NO**"), ""]
    return "\n".join(lines)


def faults_cmd(
    rounds: int = typer.Option(10, "--rounds", min=1, help="Rounds per scenario (kills, reboots, clock steps)."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these scenarios (repeatable): "
                                             "runtime_kill9, reboot_wiped_spool_1970, clock_step, and any registered "
                                             "server-side ones."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for faults.{json,md}."),
    seed: int = typer.Option(0, "--seed"),
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
) -> None:
    """Fault injection against the real server and runtime processes: kill -9, wiped spool + 1970 clock, clock
    steps; counts acked frames missing, duplicates and wedged cameras (bench/results/faults.{json,md})."""
    report = run(rounds, only, out, seed, bundle, log=typer.echo)
    typer.echo(markdown(report))
    if not report["ok"]:
        raise typer.Exit(1)


def uplink_cpu(seconds: float = 20.0, fps: float = 30.0, repeats: int = 2, out: Path | None = Path("bench/results"),
               baseline_commit: str = "bf4fb9f", log: Callable[[str], None] = print) -> dict:
    """CPU of the uplink thread vs the whole runtime process at ``fps`` (issue 11 C), for this uplink + spool and
    those of ``baseline_commit`` (loaded from git), interleaved ``repeats`` times, each ``seconds`` long, against the real
    server. Per-thread CPU from /proc/self/task/TID/stat (utime + stime)."""
    import threading

    from taskcodec.bench.ab import load_module_copy
    from taskcodec.report import machine_info, utc_now
    from taskcodec.runtime.capture import CaptureConfig, CaptureRuntime
    from taskcodec.testing import ServerProcess

    tick = os.sysconf("SC_CLK_TCK")

    def cpu_of(tid: int | str) -> float:
        fields = Path(f"/proc/self/task/{tid}/stat" if tid != "self" else "/proc/self/stat").read_text()
        fields = fields.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    def load(name: str):
        src = subprocess.run(["git", "show", f"{baseline_commit}:taskcodec/runtime/{name}.py"], capture_output=True,
                             text=True, check=True).stdout
        path = Path(tmp) / f"baseline_{name}.py"
        path.write_text(src)
        return load_module_copy(f"baseline_{name}", path)

    with tempfile.TemporaryDirectory() as tmp:
        baseline, baseline_spool = load("uplink"), load("spool")

        class OldSpool(baseline_spool.Spool):  # the baseline spool, with what today's capture loop reads
            made_room = unstored = 0

            def counters(self):
                return {}

            def disk_bytes(self):
                return 0

        rows = []
        with ServerProcess(None, Path(tmp) / "server.db") as server:
            token = server.add_camera("cpu-cam").decode()
            for rep in range(repeats):
                for variant in ("baseline", "current"):
                    cfg = CaptureConfig(device="virtual://fashion-mnist", server=server.url, camera_id="cpu-cam",
                                        token=token, spool=str(Path(tmp) / f"spool-{variant}-{rep}"), fps=fps,
                                        loop=True, quiet=True, threads=1, drain_timeout=10)
                    rt = CaptureRuntime(cfg)
                    if variant == "baseline":
                        rt.spool.close()
                        rt.spool = OldSpool(Path(tmp) / f"spool-old-{rep}", cfg.spool_max_frames)
                        rt.uplink = baseline.Uplink(rt.spool, rt.bundle.model_tag, rt.uplink_config, rt.stats)
                    threading.Timer(seconds, rt.stop).start()
                    proc0 = cpu_of("self")
                    holder = {}

                    def sample():
                        while rt.uplink._thread is None or rt.uplink._thread.native_id is None:
                            time.sleep(0.01)
                        tid = rt.uplink._thread.native_id
                        holder["t0"] = cpu_of(tid)
                        holder["tid"] = tid
                        while rt.uplink._thread.is_alive():
                            try:
                                holder["t1"] = cpu_of(tid)
                            except OSError:
                                break
                            time.sleep(0.2)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    report = rt.run()
                    sampler.join(10)
                    proc = cpu_of("self") - proc0
                    up = holder.get("t1", 0.0) - holder.get("t0", 0.0)
                    rows.append({"variant": variant, "repeat": rep, "frames": report.frames, "acked": report.acked,
                                 "process_cpu_s": round(proc, 2), "uplink_cpu_s": round(up, 2),
                                 "uplink_share": round(up / proc, 3) if proc else None,
                                 "uplink_ms_per_frame": round(1000 * up / max(report.frames, 1), 3)})
                    log(json.dumps(rows[-1]))
    summary = {}
    for variant in ("baseline", "current"):
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {k: round(sum(r[k] for r in mine) / len(mine), 3)
                            for k in ("uplink_share", "uplink_ms_per_frame", "process_cpu_s", "uplink_cpu_s")}
    result = {"fps": fps, "seconds": seconds, "repeats": repeats, "baseline_commit": baseline_commit,
              "machine": machine_info(), "utc": utc_now(), "rows": rows, "summary": summary,
              "command": f"python -m taskcodec.bench.faults uplink-cpu --seconds {seconds:g} --fps {fps:g}"}
    if out is not None:
        from taskcodec.report import machine_line

        out.mkdir(parents=True, exist_ok=True)
        (out / "uplink_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = ["# Uplink thread CPU at a camera's frame rate (issue 11 C)", "",
                 f"`{result['command']}`: the runtime in-process (virtual 28x28 camera, {fps:g} fps cap, 1 encoder "
                 f"thread) against the real server, {seconds:g} s per run, runs interleaved; uplink thread CPU from "
                 f"/proc/self/task/TID/stat. Baseline = the uplink and spool of commit {baseline_commit}. "
                 f"{machine_line(result['machine'])}; {result['utc']}.", "",
                 "| uplink | uplink share of process CPU | uplink CPU ms/frame | process CPU s | uplink CPU s |",
                 "|---|---|---|---|---|"]
        for variant, s in summary.items():
            lines.append(f"| {variant} | {100 * s['uplink_share']:.1f} % | {s['uplink_ms_per_frame']:.3f} | "
                         f"{s['process_cpu_s']:.2f} | {s['uplink_cpu_s']:.2f} |")
        (out / "uplink_cpu.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["uplink-cpu"]:
        args = sys.argv[2:]
        opts = {args[i].lstrip("-"): float(args[i + 1]) for i in range(0, len(args), 2)}
        uplink_cpu(seconds=opts.get("seconds", 20.0), fps=opts.get("fps", 30.0), repeats=int(opts.get("repeats", 2)))
    else:
        print("usage: python -m taskcodec.bench.faults uplink-cpu [--seconds S] [--fps F] [--repeats N]")
