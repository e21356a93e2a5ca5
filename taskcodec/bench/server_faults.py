"""`taskcodec bench server-faults`: the server-side fault scenarios of issue 11 against the real processes (a real
`taskcodec serve` subprocess, a real `runtime capture` subprocess as the camera):

- ``disk_full``: the server's database on its own small tmpfs (a real filesystem, filled to the last byte with a
  file for ``--full-seconds``, then freed). Measured: frames the server received while full per second vs the
  camera's capture rate (the issue asks for at most 1.2x), HELLOs and BUSY replies per second, /healthz polled every
  0.5 s (share of 503 while full, and whether it is back to 200 after), "storage full" log lines (one per episode),
  and after recovery: every frame the camera captured and was acked is stored (acked missing = 0). Needs root (mount).
- ``flood``: ``--peers`` concurrent unauthenticated connections each trying to send ``--flood-mib`` MiB
  (taskcodec.testing.flood) while the camera streams: server RSS before / peak (psutil, every 20 ms), what the
  flooders got in, and whether the camera lost anything (its report's acked = frames stored, spool drained).

Results: bench/results/server_faults.{json,md} with the machine (taskcodec.report.machine_info()).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional

import typer


def _metrics(srv) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(srv.get_text("/metrics")):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class _Camera:
    """A `runtime capture` subprocess streaming the virtual camera at ``fps`` to the server."""

    def __init__(self, srv, root: Path, camera: str, fps: float, frames: int, bundle: str | None):
        self.root, self.camera = root, camera
        token = root / f"{camera}.token"
        token.write_bytes(srv.add_camera(camera))
        token.chmod(0o600)
        self.report_path = root / f"{camera}.report.json"
        cmd = [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device", "virtual://fashion-mnist?seed=3",
               "--server", srv.url, "--camera-id", camera, "--token-file", str(token), "--spool",
               str(root / f"{camera}.spool"), "--frames", str(frames), "--fps", str(fps), "--max-delay", "0.2",
               "--drain-timeout", "120", "-q", "--loop", "--report", str(self.report_path)]
        if bundle:
            cmd += ["--bundle", bundle]
        env = {k: v for k, v in os.environ.items() if k not in ("TASKCODEC_FAKE_CLOCK", "TASKCODEC_TOKEN")}
        self.log = open(root / f"{camera}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(30)
        self.log.close()
        try:
            report = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            report = {}
        return {"exit_code": rc, **{k: report.get(k) for k in ("frames", "acked", "dropped", "spool_depth",
                                                               "reconnects", "error") if k in report}}


def _stored(db: Path, camera: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM frames WHERE camera_id = ?", (camera,)).fetchone()[0]
    finally:
        conn.close()


def disk_full(root: Path, bundle: str | None, full_s: float, fps: float, log: Callable[[str], None]) -> dict:
    from taskcodec.testing import ServerProcess, fill_filesystem

    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a small tmpfs"}
    disk = root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        db = disk / "server.db"
        with ServerProcess(bundle, db) as srv:
            warm_s, after_s = 15.0, 60.0
            frames = int(fps * (warm_s + full_s + 10))
            cam = _Camera(srv, root, "cam-full", fps, frames, bundle)
            time.sleep(warm_s)
            before = _metrics(srv)
            filled = fill_filesystem(disk / "filler")
            t0 = time.monotonic()
            log(f"disk_full: filled {filled / 1e6:.1f} MB; full for {full_s:.0f} s")
            codes = []
            while time.monotonic() - t0 < full_s:
                codes.append(_health(srv.url))
                time.sleep(0.5)
            during = _metrics(srv)
            full_elapsed = time.monotonic() - t0
            (disk / "filler").unlink()
            t1 = time.monotonic()
            while _health(srv.url) != 200 and time.monotonic() - t1 < 30:
                time.sleep(0.2)
            healthy_after_s = time.monotonic() - t1
            camera = cam.wait(warm_s + full_s + after_s + 120)
            stored = _stored(db, "cam-full")
            server_log = srv.log_path.read_text(errors="replace")
        d = {k: during.get(k, 0.0) - before.get(k, 0.0) for k in during}
        received = d.get("taskcodec_server_frames_received_total", 0.0)
        busy = d.get("taskcodec_server_messages_refused_total{reason=busy}", 0.0)
        return {
            "full_s": round(full_elapsed, 1), "capture_fps": fps, "filled_mb": round(filled / 1e6, 1),
            "frames_received_while_full": received,
            "resend_rate_vs_capture": round(received / full_elapsed / fps, 3),
            "busy_replies_per_s": round(busy / full_elapsed, 2),
            "healthz_503_share_while_full": round(sum(c == 503 for c in codes) / max(1, len(codes)), 3),
            "healthz_polls_while_full": len(codes), "healthz_ok_again_after_s": round(healthy_after_s, 1),
            "storage_full_log_lines": server_log.count("storage full:"),
            "writable_again_log_lines": server_log.count("storage writable again"),
            "cannot_rollback_seen": "cannot rollback" in server_log,
            "camera": camera, "stored": stored,
            "acked_missing": max(0, (camera.get("acked") or 0) - stored),
            "ok": bool(received / full_elapsed <= 1.2 * fps and codes and all(c == 503 for c in codes[1:])
                       and server_log.count("storage full:") == 1 and camera.get("exit_code") == 0
                       and camera.get("spool_depth") == 0 and (camera.get("acked") or 0) <= stored),
        }
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def flood(root: Path, bundle: str | None, peers: int, mib: int, fps: float, log: Callable[[str], None]) -> dict:
    import psutil

    from taskcodec.testing import ServerProcess
    from taskcodec.testing.flood import flood as run_flood

    db = root / "server.db"
    with ServerProcess(bundle, db) as srv:
        proc = psutil.Process(srv.proc.pid)
        cam = _Camera(srv, root, "cam-live", fps, int(fps * 40), bundle)
        time.sleep(8)
        baseline = proc.memory_info().rss
        peak, stop = [baseline], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak.append(proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        try:
            stats = asyncio.run(run_flood(srv.port, peers, mib << 20))
        finally:
            flood_s = time.monotonic() - t0
            time.sleep(1)
            stop.set()
            sampler.join()
        log(f"flood: {stats} in {flood_s:.1f} s")
        camera = cam.wait(200)
        stored = _stored(db, "cam-live")
        alive = srv.alive()
    growth = (max(peak) - baseline) / (1 << 20)
    return {"peers": peers, "mib_each": mib, "flood_s": round(flood_s, 1), **stats,
            "rss_before_mib": round(baseline / (1 << 20), 1), "rss_peak_mib": round(max(peak) / (1 << 20), 1),
            "rss_growth_mib": round(growth, 1), "server_alive": alive, "camera": camera, "stored": stored,
            "camera_lost": max(0, (camera.get("acked") or 0) - stored),
            "ok": bool(growth < 100 and stats["sent_everything"] == 0 and alive and camera.get("exit_code") == 0
                       and camera.get("spool_depth") == 0 and (camera.get("acked") or 0) <= stored)}


SCENARIOS = ("disk_full", "flood")


def run(only: list[str] | None, out: Path | None, bundle: str | None, full_s: float, fps: float, peers: int,
        mib: int, log: Callable[[str], None] = print) -> dict:
    from taskcodec.report import machine_info, utc_now, write_json, write_text

    results = {}
    with tempfile.TemporaryDirectory(prefix="taskcodec-server-faults-") as tmp:
        for name in only or SCENARIOS:
            root = Path(tmp) / name
            root.mkdir()
            t0 = time.monotonic()
            if name == "disk_full":
                results[name] = disk_full(root, bundle, full_s, fps, log)
            elif name == "flood":
                results[name] = flood(root, bundle, peers, mib, fps, log)
            else:
                raise typer.BadParameter(f"unknown scenario {name!r} (have {', '.join(SCENARIOS)})")
            results[name]["wall_s"] = round(time.monotonic() - t0, 1)
            log(f"{name}: {json.dumps(results[name])}")
    command = (f"taskcodec bench server-faults --full-seconds {full_s:g} --fps {fps:g} --peers {peers} "
               f"--flood-mib {mib}" + "".join(f" --only {n}" for n in only or []))
    report = {"command": command, "machine": machine_info(), "utc": utc_now(), "scenarios": results,
              "ok": all(r.get("ok", False) for r in results.values() if "skipped" not in r)}
    if out is not None:
        write_json(out / "server_faults.json", report)
        write_text(out / "server_faults.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    from taskcodec.report import machine_line

    lines = ["# Server faults: disk full and unauthenticated flood (issue 11)", "",
             f"`{report['command']}` — real `taskcodec serve` subprocess, real `runtime capture` subprocess as the "
             f"camera; machine: {machine_line(report['machine'])}; {report['utc']}.", ""]
    s = report["scenarios"]
    if "disk_full" in s:
        r = s["disk_full"]
        if "skipped" in r:
            lines += [f"Disk full: skipped ({r['skipped']}).", ""]
        else:
            c = r["camera"]
            lines += ["## Disk full (database on a 16 MiB tmpfs filled to the last byte)", "",
                      "| measure | value |", "|---|---|",
                      f"| full for | {r['full_s']} s |",
                      f"| camera capture rate | {r['capture_fps']} frames/s |",
                      f"| frames the server received while full | {r['frames_received_while_full']:.0f} "
                      f"({r['resend_rate_vs_capture']}x the capture rate; target <= 1.2x) |",
                      f"| BUSY replies while full | {r['busy_replies_per_s']}/s |",
                      f"| /healthz 503 while full | {r['healthz_503_share_while_full'] * 100:.0f} % of "
                      f"{r['healthz_polls_while_full']} polls; 200 again {r['healthz_ok_again_after_s']} s after "
                      f"space was freed |",
                      f"| 'storage full' log lines | {r['storage_full_log_lines']} (and "
                      f"{r['writable_again_log_lines']} 'writable again') |",
                      f"| 'cannot rollback' seen | {r['cannot_rollback_seen']} |",
                      f"| camera: captured / acked / dropped / left in spool / reconnects | {c.get('frames')} / "
                      f"{c.get('acked')} / {c.get('dropped')} / {c.get('spool_depth')} / {c.get('reconnects')} "
                      f"(exit {c.get('exit_code')}) |",
                      f"| frames stored / acked missing | {r['stored']} / {r['acked_missing']} |", ""]
    if "flood" in s:
        r = s["flood"]
        c = r["camera"]
        lines += [f"## Flood: {r['peers']} unauthenticated peers each trying to send {r['mib_each']} MiB", "",
                  "| measure | value |", "|---|---|",
                  f"| server RSS before / peak / growth | {r['rss_before_mib']} / {r['rss_peak_mib']} / "
                  f"{r['rss_growth_mib']} MiB (target growth < 100 MB) |",
                  f"| refused before the upgrade / cut off / got everything in | {r['refused_before_upgrade']} / "
                  f"{r['cut_off']} / {r['sent_everything']} |",
                  f"| bytes the flooders wrote (mostly kernel socket buffers) | {r['bytes'] / 1e6:.0f} MB in "
                  f"{r['flood_s']} s |",
                  f"| streaming camera: captured / acked / left in spool / stored / lost | {c.get('frames')} / "
                  f"{c.get('acked')} / {c.get('spool_depth')} / {r['stored']} / {r['camera_lost']} |", ""]
    lines += [f"All targets met: {'yes' if report['ok'] else '**NO**'}", ""]
    return "\n".join(lines)


def server_faults_cmd(
    only: Optional[List[str]] = typer.Option(None, "--only", help="disk_full and/or flood (repeatable)"),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for server_faults.{json,md}"),
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)"),
    full_seconds: float = typer.Option(60.0, "--full-seconds", min=1.0, help="How long the disk stays full"),
    fps: float = typer.Option(10.0, "--fps", min=0.1, help="The camera's capture rate"),
    peers: int = typer.Option(200, "--peers", min=1, help="Concurrent unauthenticated flooders"),
    flood_mib: int = typer.Option(60, "--flood-mib", min=1, help="MiB each flooder tries to send"),
) -> None:
    """Server-side faults against the real processes: disk full (re-send rate vs capture rate, /healthz, one log
    line, recovery) and an unauthenticated flood (server RSS, a streaming camera loses nothing)."""
    report = run(only, out, bundle, full_seconds, fps, peers, flood_mib, log=typer.echo)
    typer.echo(markdown(report))
    if not report["ok"]:
        raise typer.Exit(1)
