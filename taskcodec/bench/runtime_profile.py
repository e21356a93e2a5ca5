"""`taskcodec bench runtime`: where a frame's time goes on this machine, and how much memory the runtime needs.

Each run is a real `runtime capture` in its own process (so its peak RSS is the runtime's alone) streaming a virtual
640x480 camera (ROI on the item) to the real ingest server over loopback. Writes JSON and a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from taskcodec.bundle import load_bundle

COLUMNS = [("precision", "precision", "{}"), ("spool_sync", "spool sync", "{}"), ("frames", "frames", "{}"), ("fps", "fps", "{:.1f}"),
           ("bits_per_frame", "bits/frame", "{:.1f}"), ("preprocess_ms_per_frame", "preprocess ms", "{:.3f}"),
           ("inference_ms_per_frame", "inference ms", "{:.3f}"), ("coding_ms_per_frame", "range coding ms", "{:.3f}"),
           ("spool_ms_per_frame", "spool ms", "{:.3f}"), ("coding_share", "coding share of encode", "{:.1%}"),
           ("coding_share_of_frame", "coding share of frame", "{:.1%}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), {platform.system()} {platform.release()}"


def profile(bundle_path: str | None, frames: int, out: Path, threads: int = 1, precisions: list[str] | None = None,
            timeout: float = 600.0, spool_syncs: list[str] | None = None, note: str = "") -> dict:
    from taskcodec.server.process import LocalServer

    bundle = load_bundle(bundle_path)
    precisions = precisions or (["fp32", "int8"] if bundle.has("encoder_int8") else ["fp32"])
    uri = f"virtual://fashion-mnist?size=640x480&count={frames}&channels=3"  # cameras deliver BGR
    rows = []
    runs = [(p, sync) for p in precisions for sync in (spool_syncs or ["full"])]
    with tempfile.TemporaryDirectory(prefix="taskcodec-profile-") as tmp, \
            LocalServer(bundle.path, Path(tmp) / "server.db") as server:
        for precision, sync in runs:
            token = server.add_camera(f"profile-{precision}-{sync}").decode()
            report = Path(tmp) / f"{precision}-{sync}.json"
            cmd = [sys.executable, "-m", "taskcodec.runtime.cli", "capture", "--device", uri, "--bundle", str(bundle.path),
                   "--server", server.url, "--camera-id", f"profile-{precision}-{sync}", "--token", token,
                   "--precision", precision, "--threads", str(threads), "--roi", "80,0,480,480",
                   "--spool", str(Path(tmp) / f"spool-{precision}-{sync}"), "--spool-sync", sync,
                   "--frames", str(frames), "--quiet",
                   "--max-delay", "0.05", "--report", str(report)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            if done.returncode != 0:
                raise RuntimeError(f"capture ({precision}) failed: {done.stderr.strip() or done.stdout.strip()}")
            rows.append(dict(json.loads(report.read_text()), precision=precision, spool_sync=sync))
    result = {"machine": machine(), "bundle": str(bundle.path), "model_id": bundle.model_id, "threads": threads,
              "source": uri + " roi 80,0,480,480", "server": "the real ingest server (taskcodec serve) on loopback",
              "spool": "SQLite WAL; sync full = one fsync per frame, normal = none",
              "load_avg_1min": os.getloadavg()[0], "note": note,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "runtime_profile.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"Runtime profile — {result['machine']}, {result['threads']} encoder thread(s), bundle "
             f"{result['model_id']}; source {result['source']}; spool {result['spool']}; load average "
             f"{result['load_avg_1min']:.1f} at the end (a shared machine: timings are indicative). {result['note']}", "",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in result["runs"]:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
