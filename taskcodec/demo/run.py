"""`taskcodec demo`: the whole chain on one machine — a local ingest server, a virtual 640×480 camera streaming
Fashion-MNIST items through the edge runtime with the embedded default bundle — and the report a fleet operator
wants: frames, bits per frame, kbit/s up, accuracy at the server, latency, and what JPEG would have cost."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from taskcodec.bundle import load_bundle

CANVAS = (640, 480)
ITEM = 112  # pixels: a Fashion-MNIST item seen at 4x, cropped back by the runtime's ROI
JPEG_QUALITY = 75


@dataclass
class DemoResult:
    frames: int
    stored: int
    acked: int
    fps: float
    payload_bits_per_frame: float
    kbit_per_s: float
    accuracy_at_server: float
    latency_p50_ms: float
    latency_p99_ms: float
    jpeg_frame_bytes: float
    jpeg_roi_bytes: float
    model_id: str
    wall_s: float

    @property
    def jpeg_ratio(self) -> float:
        return self.jpeg_roi_bytes * 8 / self.payload_bits_per_frame

    @property
    def jpeg_frame_ratio(self) -> float:
        return self.jpeg_frame_bytes * 8 / self.payload_bits_per_frame


def _jpeg_costs(uri: str, roi: tuple[int, int, int, int], n: int) -> tuple[float, float]:
    """Mean JPEG bytes of the whole camera frame and of the ROI (at the encoder's input size) on the demo's frames."""
    from taskcodec.runtime.sources import open_source

    source = open_source(uri)
    x, y, w, h = roi
    whole, crop = [], []
    for k, frame in enumerate(source):
        if k >= n:
            break
        ok, a = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        small = cv2.resize(cv2.cvtColor(frame.image[y:y + h, x:x + w], cv2.COLOR_BGR2GRAY), (28, 28),
                           interpolation=cv2.INTER_AREA)
        ok2, b = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        whole.append(len(a))
        crop.append(len(b))
    source.close()
    return float(np.mean(whole)), float(np.mean(crop))


def run_demo(frames: int = 600, fps: float = 30.0, max_delay: float = 0.0, bundle_path: Path | None = None,
             seed: int = 0, quiet: bool = False) -> DemoResult:
    from taskcodec.runtime.capture import run_capture
    from taskcodec.server.process import LocalServer

    started = time.monotonic()
    bundle = load_bundle(bundle_path)
    uri = f"virtual://fashion-mnist?size={CANVAS[0]}x{CANVAS[1]}&item={ITEM}&seed={seed}&count={frames}"
    roi = ((CANVAS[0] - ITEM) // 2, (CANVAS[1] - ITEM) // 2, ITEM, ITEM)
    with tempfile.TemporaryDirectory(prefix="taskcodec-demo-") as tmp:
        tmp = Path(tmp)
        with LocalServer(bundle.path, tmp / "server.db") as server:
            token = server.add_camera("demo-camera").decode()
            report = run_capture(device=uri, server=server.url, camera_id="demo-camera", token=token,
                                 bundle=str(bundle.path), frames=frames, fps=fps, roi=roi, max_delay=max_delay,
                                 spool=str(tmp / "spool"), quiet=quiet, keep_labels=True, drain_timeout=120.0)
            rows = server.get_json(f"/v1/cameras/demo-camera/frames?since_seq=-1&limit=10000")["frames"]
    rows.sort(key=lambda r: (r["epoch"], r["seq"]))
    predictions = np.array([r["prediction"] for r in rows])
    labels = np.array(report.labels[: len(rows)])
    latency = np.array([r["ts_stored_ms"] - r["ts_capture_ms"] for r in rows], dtype=np.float64)
    jpeg_frame, jpeg_roi = _jpeg_costs(uri, roi, min(frames, 200))
    return DemoResult(
        frames=report.frames, stored=len(rows), acked=report.acked, fps=report.fps,
        payload_bits_per_frame=report.bits_per_frame, kbit_per_s=report.kbit_per_s,
        accuracy_at_server=float((predictions == labels).mean()) if len(rows) else 0.0,
        latency_p50_ms=float(np.percentile(latency, 50)) if len(rows) else float("nan"),
        latency_p99_ms=float(np.percentile(latency, 99)) if len(rows) else float("nan"),
        jpeg_frame_bytes=jpeg_frame, jpeg_roi_bytes=jpeg_roi, model_id=bundle.model_id,
        wall_s=time.monotonic() - started)


def format_report(r: DemoResult) -> str:
    return "\n".join([
        f"taskcodec demo — model {r.model_id}, virtual {CANVAS[0]}x{CANVAS[1]} camera, local server on loopback",
        f"  frames captured / acked / stored : {r.frames} / {r.acked} / {r.stored}",
        f"  capture rate                     : {r.fps:.1f} fps",
        f"  payload per frame                : {r.payload_bits_per_frame:.1f} bits ({r.payload_bits_per_frame / 8:.1f} bytes)",
        f"  uplink payload rate              : {r.kbit_per_s:.2f} kbit/s",
        f"  accuracy at the server           : {100 * r.accuracy_at_server:.2f} % (vs the virtual camera's labels)",
        f"  capture -> stored latency        : p50 {r.latency_p50_ms:.0f} ms, p99 {r.latency_p99_ms:.0f} ms",
        f"  JPEG q{JPEG_QUALITY} of the 28x28 ROI         : {r.jpeg_roi_bytes:.0f} bytes/frame = {r.jpeg_ratio:.0f}x taskcodec",
        f"  JPEG q{JPEG_QUALITY} of the whole frame       : {r.jpeg_frame_bytes:.0f} bytes/frame = {r.jpeg_frame_ratio:.0f}x taskcodec",
        f"  wall time                        : {r.wall_s:.0f} s",
    ])


def to_json(r: DemoResult) -> str:
    d = dict(r.__dict__, jpeg_ratio=r.jpeg_ratio, jpeg_frame_ratio=r.jpeg_frame_ratio)
    return json.dumps(d, indent=2)
