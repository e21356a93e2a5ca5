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


# ---------------------------------------------------------------------------------------------------------------
# Process CPU per frame at a camera's frame rate (issue 10 item 7): the real `runtime capture` command, run in a
# child process whose virtual camera is rendered before the measurement (so rendering is excluded), paced at --fps.

PRERENDERED_SCHEME = "prerendered"


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of this process, by native id, with its name."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        tid = int(task.name)
        out[tid] = (names.get(tid, comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


def _thread_group(name: str) -> str:
    if name == "MainThread":
        return "capture loop (main thread: source pacing; per window of frames: preprocess, encode, spool append)"
    if name == "capture-flusher":
        return "capture flusher thread (spools a window whose frames stopped coming)"
    if name.startswith("uplink-"):
        return "uplink thread (asyncio + websockets + spool reads/acks)"
    if name == "status-line":
        return "status line thread"
    return f"other threads ({name})" if name else "other threads"


class _Meter:
    """Marks the measurement window from inside the source: starts when frame ``warmup`` is delivered."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start_cpu = self.start_wall = None
        self.start_threads: dict = {}
        self.source_end_threads: dict = {}
        self.source_end_cpu = None
        self.source_end_wall = None

    def delivered(self, k: int) -> None:
        if k == self.warmup:
            self.start_threads = _thread_cpu()
            self.start_cpu, self.start_wall = time.process_time(), time.monotonic()

    def exhausted(self) -> None:
        if self.source_end_cpu is None:
            self.source_end_threads = _thread_cpu()
            self.source_end_cpu, self.source_end_wall = time.process_time(), time.monotonic()


def _register_prerendered(meter: _Meter, pool: int) -> None:
    """``prerendered://fashion-mnist?...`` = the virtual camera, its first ``pool`` frames rendered up front and
    repeated (rendering a 640x480 frame costs about as much as the runtime's whole frame, and is not the runtime's)."""
    import urllib.parse

    from taskcodec.runtime.source import Source
    from taskcodec.runtime.sources import VirtualFashionMNIST, register_scheme

    class Prerendered(Source):
        def __init__(self, rest: str, **options):
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit("virtual://" + rest).query))
            self.count = int(query.pop("count", 600))
            camera = VirtualFashionMNIST(dict(query, count=str(min(pool, self.count))), **options)
            self.frames = [camera.render(k) for k in range(len(camera.order))]
            super().__init__(size=camera.size, fps=options.get("fps"), loop=False)
            self.description = f"pre-rendered {camera.description}"
            self.pos = 0

        def _read(self):
            if self.pos >= self.count:
                return None
            meter.delivered(self.pos)
            if self.pos == self.count - 1:  # the runtime stops after this frame (--frames)
                meter.exhausted()
            self.pos += 1
            return self.frames[(self.pos - 1) % len(self.frames)]

    register_scheme(PRERENDERED_SCHEME, Prerendered)


def _cpu_child(args: list[str], report: Path, warmup: int, pool: int) -> None:
    """Runs `runtime capture ARGS` in this process and adds the CPU measurement to its --report JSON."""
    meter = _Meter(warmup)
    _register_prerendered(meter, pool)
    from taskcodec.runtime.cli import app

    code = 0
    try:
        app(args=["capture", *args, "--report", str(report)], standalone_mode=False, prog_name="runtime")
    except SystemExit as exc:  # typer.Exit inside standalone_mode=False surfaces as an exit code
        code = int(exc.code or 0)
    end_cpu, end_wall = time.process_time(), time.monotonic()
    if code or meter.start_cpu is None:
        raise SystemExit(code or 3)
    data = json.loads(report.read_text())
    frames = data["frames"] - warmup
    groups: dict[str, float] = {}
    for tid, (name, cpu) in meter.source_end_threads.items():
        before = meter.start_threads.get(tid, (name, 0.0))[1]
        groups[_thread_group(name)] = groups.get(_thread_group(name), 0.0) + cpu - before
    data["cpu"] = {
        "frames_measured": frames, "warmup_frames": warmup,
        "process_cpu_ms_per_frame": 1000 * (end_cpu - meter.start_cpu) / frames,
        "process_cpu_ms_per_frame_until_last_frame": 1000 * (meter.source_end_cpu - meter.start_cpu) / frames,
        "wall_s": end_wall - meter.start_wall,
        "drain_s": end_wall - meter.source_end_wall,
        "threads_ms_per_frame": {k: 1000 * v / frames for k, v in sorted(groups.items())},
        "thread_clock": "per-thread utime+stime from /proc (10 ms ticks) between the warm-up frame and the source's "
                        "end; the process total from CLOCK_PROCESS_CPUTIME_ID up to the end of the drain",
    }
    report.write_text(json.dumps(data, indent=2) + "\n")


CPU_TARGET_MS = 0.6      # issue 10: process CPU per frame at 30 fps, 640x480 virtual camera, rendering excluded
CODING_TARGET_MS = 0.010  # range coding per frame


def cpu_profile(bundle_path: str | None, out: Path, frames: int = 600, fps: float = 30.0, warmup: int = 60,
                precisions: list[str] | None = None, spool_syncs: list[str] | None = None, threads: int = 1,
                pool: int = 120, timeout: float = 600.0, note: str = "", capture_args: list[str] | None = None) -> dict:
    """Process CPU per frame of `runtime capture` at ``fps`` (the command's own defaults otherwise), against the real
    server; writes runtime_cpu.{json,md} to ``out``."""
    from taskcodec.report import machine_info, machine_line
    from taskcodec.server.process import LocalServer

    bundle = load_bundle(bundle_path)
    precisions = precisions or (["fp32", "int8"] if bundle.has("encoder_int8") else ["fp32"])
    size, roi = "640x480", "80,0,480,480"
    uri = f"{PRERENDERED_SCHEME}://fashion-mnist?size={size}&count={frames}&channels=3"
    rows = []
    with tempfile.TemporaryDirectory(prefix="taskcodec-cpu-") as tmp, \
            LocalServer(bundle.path, Path(tmp) / "server.db") as server:
        for precision in precisions:
            for sync in spool_syncs or ["full"]:
                name = f"cpu-{precision}-{sync}"
                token = server.add_camera(name).decode()
                report = Path(tmp) / f"{name}.json"
                args = ["--device", uri, "--bundle", str(bundle.path), "--server", server.url, "--camera-id", name,
                        "--token", token, "--precision", precision, "--threads", str(threads), "--roi", roi,
                        "--fps", str(fps), "--spool", str(Path(tmp) / f"spool-{name}"), "--spool-sync", sync,
                        "--frames", str(frames), "--quiet", *(capture_args or [])]
                cmd = [sys.executable, "-m", "taskcodec.bench.runtime_profile", "--cpu-child", str(report),
                       str(warmup), str(pool), "--", *args]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if done.returncode != 0:
                    raise RuntimeError(f"capture ({name}) failed: {done.stderr.strip()[-2000:] or done.stdout.strip()}")
                data = json.loads(report.read_text())
                cpu = data.pop("cpu")
                rows.append({"precision": precision, "spool_sync": sync, **cpu,
                             **{k: data[k] for k in ("frames", "acked", "fps", "bits_per_frame", "preprocess_ms_per_frame",
                                                     "inference_ms_per_frame", "coding_ms_per_frame",
                                                     "spool_ms_per_frame", "peak_rss_mb")}})
    info = machine_info()
    coding = coding_cpu(bundle)
    pacing = pacing_probe(bundle, fps)
    from taskcodec.runtime.capture import CaptureConfig

    fields = CaptureConfig.model_fields
    defaults = {k: fields[k].default for k in ("batch_window", "batch_frames", "max_delay", "threads", "spool_sync")}
    result = {"machine": info, "machine_line": machine_line(info), "bundle": str(bundle.path), "coding_cpu": coding,
              "pacing_probe": pacing, "capture_defaults": defaults,
              "model_id": bundle.model_id, "threads": threads, "fps_cap": fps,
              "source": f"virtual://fashion-mnist?size={size}&channels=3, first {pool} frames rendered before the "
                        f"run and repeated (rendering excluded), paced at {fps:g} fps; roi {roi}",
              "command": "runtime capture --device SOURCE --roi " + roi + f" --fps {fps:g} --threads {threads} "
                         "--precision P --spool-sync S --quiet " + " ".join(capture_args or []) +
                         " (other settings: the command's defaults: " +
                         ", ".join(f"{k.replace('_', '-')} {v}" for k, v in defaults.items()) + "), in a child "
                         "process (python -m taskcodec.bench.runtime_profile --cpu-child)",
              "server": "the real ingest server (LocalServer) on loopback, its CPU not counted",
              "targets": {"process_cpu_ms_per_frame": CPU_TARGET_MS, "coding_ms_per_frame": CODING_TARGET_MS},
              "load_avg_1min": os.getloadavg()[0], "note": note, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "runtime_cpu.md").write_text(cpu_markdown(result))
    return result


def coding_cpu(bundle, frames: int = 1000, repeats: int = 5) -> dict:
    """Range coding CPU per frame (thread CPU time, best of ``repeats``) the way the runtime calls it (one
    ``compress`` per frame with the model tag), on the symbols of ``frames`` virtual-camera frames; per coder backend.
    The capture report's coding time is wall time per frame, which a loaded machine inflates with preemptions."""
    import numpy as np

    from taskcodec.coding import RangeCoder, compress
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source

    source = open_source(f"virtual://fashion-mnist?size=640x480&channels=3&count={frames}")
    pre = Preprocessor(bundle.input, (80, 0, 480, 480))
    symbols = FrameEncoder(bundle, threads=1).symbols(np.concatenate([pre(f.image) for f in source]))
    try:
        from taskcodec.coding.range_coder import BACKENDS, c_available
        backends = [b for b in BACKENDS if b != "c" or c_available()]
    except ImportError:
        backends = [None]
    out = {}
    for backend in backends:
        coder = RangeCoder(bundle.tables, backend=backend) if backend else RangeCoder(bundle.tables)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.thread_time()
            for row in symbols:
                compress(row, coder, bundle.model_tag)
            best = min(best, (time.thread_time() - t0) / len(symbols))
        out[backend or "default"] = {"encode_us_per_frame": 1e6 * best}
    return {"frames": len(symbols), "repeats": repeats, "backends": out}


def pacing_probe(bundle, fps: float = 30.0, frames: int = 120, rounds: int = 2, window_frames: int = 6) -> dict:
    """The same preprocess + encode calls, back to back, with the camera's frame interval between frames, and paced
    in windows of ``window_frames`` (what `runtime capture --batch-window` does: one wake-up per window, one encoder
    run) (thread CPU per frame, in this process). On a VM shared with other jobs the paced calls cost several times
    more CPU: each wake-up starts with cold caches. This separates what the runtime's code costs from what the machine
    adds at a low frame rate, and shows what windows save."""
    import numpy as np

    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source

    pre = Preprocessor(bundle.input, (80, 0, 480, 480))
    enc = FrameEncoder(bundle, threads=1)
    images = [f.image for f in open_source(f"virtual://fashion-mnist?size=640x480&channels=3&count={frames}")]
    out = {}
    k = window_frames
    modes = [("back_to_back", 0.0, 1), (f"paced_{fps:g}fps", 1.0 / fps, 1),
             (f"paced_{fps:g}fps_windows_of_{k}", 1.0 / fps, k)]
    for name, pause, group in modes * rounds:
        spent = np.zeros(2)
        for i in range(0, len(images), group):
            chunk = images[i:i + group]
            if pause:
                time.sleep(pause * len(chunk))
            t0 = time.thread_time()
            x = pre(chunk[0]) if len(chunk) == 1 else np.concatenate([pre(image) for image in chunk])
            t1 = time.thread_time()
            enc.encode(x)
            spent += (t1 - t0, time.thread_time() - t1)
        ms = 1000 * spent / len(images)
        best = out.get(name)
        if best is None or ms.sum() < best["preprocess_ms"] + best["encode_ms"]:
            out[name] = {"preprocess_ms": float(ms[0]), "encode_ms": float(ms[1])}
    return {"frames": frames, "rounds": rounds, "best_round": out}


def preprocess_check(bundle_path: str | None, out: Path, frames: int = 10000) -> dict:
    """The runtime's preprocessing against the direct OpenCV INTER_AREA resize on the 640x480 virtual camera (ROI
    480x480): accuracy at the server's classifier, symbol agreement, pixel differences and CPU per frame; writes
    preprocess_check.{json,md}."""
    import cv2
    import numpy as np

    from taskcodec.report import machine_info, machine_line
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor
    from taskcodec.runtime.sources import open_source
    from taskcodec.server.classify import Classifier

    bundle = load_bundle(bundle_path)
    roi = (80, 0, 480, 480)
    pre = Preprocessor(bundle.input, roi)
    if bundle.input.color_order != "gray":
        raise RuntimeError("the preprocessing check compares the gray path; this bundle is not gray")

    def direct(image):
        crop = image[roi[1]:roi[1] + roi[3], roi[0]:roi[0] + roi[2]]
        size = (bundle.input.width, bundle.input.height)
        return cv2.resize(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), size, interpolation=cv2.INTER_AREA)[None, :, :, None]

    ours, theirs, labels = [], [], []
    cpu = np.zeros(2)
    for frame in open_source(f"virtual://fashion-mnist?size=640x480&channels=3&count={frames}"):
        t0 = time.thread_time()
        ours.append(pre(frame.image))
        t1 = time.thread_time()
        theirs.append(direct(frame.image))
        cpu += (t1 - t0, time.thread_time() - t1)
        labels.append(frame.label)
    ours, theirs, labels = np.concatenate(ours), np.concatenate(theirs), np.asarray(labels)
    enc, clf = FrameEncoder(bundle, threads=1), Classifier(bundle)
    sym_ours = np.concatenate([enc.symbols(ours[i:i + 500]) for i in range(0, len(ours), 500)])
    sym_theirs = np.concatenate([enc.symbols(theirs[i:i + 500]) for i in range(0, len(theirs), 500)])
    diff = np.abs(ours.astype(int) - theirs)
    info = machine_info()
    result = {"machine": info, "machine_line": machine_line(info), "model_id": bundle.model_id, "frames": len(labels),
              "source": "virtual://fashion-mnist?size=640x480&channels=3 (test split), roi 80,0,480,480",
              "accuracy_runtime": float((clf.predict(sym_ours)[0] == labels).mean()),
              "accuracy_direct_inter_area": float((clf.predict(sym_theirs)[0] == labels).mean()),
              "symbols_equal": float((sym_ours == sym_theirs).mean()),
              "frames_all_symbols_equal": int((sym_ours == sym_theirs).all(axis=1).sum()),
              "pixel_absdiff_mean": float(diff.mean()), "pixel_absdiff_max": int(diff.max()),
              "cpu_ms_per_frame_runtime": 1000 * cpu[0] / len(labels),
              "cpu_ms_per_frame_direct": 1000 * cpu[1] / len(labels),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess_check.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    (out / "preprocess_check.md").write_text(
        f"Preprocessing check — {r['machine_line']}; bundle {r['model_id']}; {r['frames']} frames of {r['source']}.\n\n"
        "| preprocessing | accuracy at the classifier | CPU ms/frame (back to back) |\n|---|---|---|\n"
        f"| runtime (integer-factor area) | {100 * r['accuracy_runtime']:.2f} % | {r['cpu_ms_per_frame_runtime']:.3f} |\n"
        f"| direct cv2 INTER_AREA | {100 * r['accuracy_direct_inter_area']:.2f} % | {r['cpu_ms_per_frame_direct']:.3f} |\n\n"
        f"Symbols equal: {100 * r['symbols_equal']:.2f} % ({r['frames_all_symbols_equal']} frames with all symbols "
        f"equal); pixel |difference| mean {r['pixel_absdiff_mean']:.3f}, max {r['pixel_absdiff_max']}.\n")
    return result


def cpu_markdown(result: dict) -> str:
    lines = [f"Process CPU per frame of `runtime capture` at {result['fps_cap']:g} fps — {result['machine_line']}; "
             f"bundle {result['model_id']}, {result['threads']} encoder thread(s); source {result['source']}; "
             f"command: {result['command']}; {result['server']}; load average {result['load_avg_1min']:.1f} at the end (shared machine). "
             f"Targets: <= {result['targets']['process_cpu_ms_per_frame']} ms process CPU per frame, range coding "
             f"<= {1000 * result['targets']['coding_ms_per_frame']:.0f} us per frame. {result['note']}", "",
             "| precision | spool sync | frames measured | fps | process CPU ms/frame | until last frame | "
             "preprocess ms | inference ms | range coding us | spool append ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['precision']} | {r['spool_sync']} | {r['frames_measured']} | {r['fps']:.1f} | "
                     f"{r['process_cpu_ms_per_frame']:.3f} | {r['process_cpu_ms_per_frame_until_last_frame']:.3f} | "
                     f"{r['preprocess_ms_per_frame']:.3f} | {r['inference_ms_per_frame']:.3f} | "
                     f"{1000 * r['coding_ms_per_frame']:.1f} | {r['spool_ms_per_frame']:.3f} | {r['peak_rss_mb']:.0f} |")
    coding = result.get("coding_cpu")
    if coding:
        lines += ["", f"Range coding CPU per frame, as the runtime calls it (thread CPU, {coding['frames']} frames, best of "
                      f"{coding['repeats']}): " + ", ".join(f"{name} coder {v['encode_us_per_frame']:.2f} us"
                                                           for name, v in coding["backends"].items())
                  + " (the table's range coding column is wall time per frame, inflated by preemption on a loaded "
                    "machine)."]
    pacing = result.get("pacing_probe")
    if pacing:
        lines += ["", f"Pacing probe (the same preprocess + encode calls in one process, thread CPU per frame, best of "
                      f"{pacing['rounds']} rounds of {pacing['frames']} frames): " + "; ".join(
                          f"{name.replace('_', ' ')}: preprocess {v['preprocess_ms']:.3f} ms + encode "
                          f"{v['encode_ms']:.3f} ms" for name, v in pacing["best_round"].items())
                  + ". Frame by frame, the difference is the machine (cold caches after each frame interval), not the "
                    "code; windows of frames pay it once per window."]
    lines += ["", "CPU per frame by thread (ms, from the warm-up frame to the source's last frame):", ""]
    for r in result["runs"]:
        parts = ", ".join(f"{k}: {v:.3f}" for k, v in r["threads_ms_per_frame"].items())
        lines.append(f"- {r['precision']} / {r['spool_sync']}: {parts}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--cpu-child":
    # python -m taskcodec.bench.runtime_profile --cpu-child REPORT WARMUP POOL -- CAPTURE ARGS...
    _cpu_child(sys.argv[6:], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
