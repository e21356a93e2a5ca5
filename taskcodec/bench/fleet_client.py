"""Many cameras in one process, built from the runtime's own classes.

One process per camera is far too heavy for hundreds of cameras on two cores, so the fleet shares what a process can
share without changing what goes on the wire: one ONNX encoder session (frames of the cameras due at the same instant
go through it as one batch), one preprocessing path, and one asyncio event loop in which every camera's
:class:`runtime.uplink.Uplink` coroutine runs. Each camera keeps its *own* :class:`runtime.spool.Spool` (SQLite
file), WebSocket connection, boot epoch and sequence numbers, exactly as `runtime capture` would.

Frames are 640x480 BGR renders of the runtime's virtual camera (Fashion-MNIST test items), pre-rendered once into a
pool (rendering is the sensor's work, not the system under test); the ROI crop, colour conversion and resize of
``runtime.preprocess`` and the encoder run on every captured frame (``camera_work="live"``), or once per pooled frame
(``"cached"``: the cameras' own processors are assumed to do it, leaving this machine to the uplinks and server).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import open_source
from taskcodec.runtime.spool import Spool
from taskcodec.runtime.status import RuntimeStats
from taskcodec.runtime.uplink import Uplink, UplinkConfig
from taskcodec.bundle import Bundle

CAMERA_SIZE = (640, 480)


class FleetError(RuntimeError):
    """The fleet could not connect, or the server refused its cameras."""


class FramePool:
    """Pre-rendered camera frames and their labels from the runtime's virtual camera."""

    def __init__(self, count: int = 128, seed: int = 0, size: tuple[int, int] = CAMERA_SIZE, data: str | None = None):
        uri = f"virtual://fashion-mnist?size={size[0]}x{size[1]}&seed={seed}&count={count}"
        if data:
            uri += f"&data={data}"
        source = open_source(uri)
        try:
            rendered = [source.render(k) for k in range(count)]
            self.roi = source.item_roi
        finally:
            source.close()
        self.images = [r[0] for r in rendered]
        self.labels = np.array([r[1] for r in rendered], np.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def index(self, camera: int, frame: int) -> int:
        """Which pooled frame camera ``camera`` shows as its ``frame``-th: cameras see different items at once."""
        return (camera * 37 + frame) % len(self.images)


@dataclass
class CameraState:
    camera_id: str
    spool: Spool
    uplink: Uplink
    stats: RuntimeStats
    labels: dict[tuple[int, int], int] = field(default_factory=dict)  # (epoch, seq) -> true label


@dataclass
class CaptureTimes:
    frames: int = 0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    coding_s: float = 0.0
    spool_s: float = 0.0
    payload_bytes: int = 0
    lag_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        n = max(self.frames, 1)
        frame_s = self.preprocess_s + self.inference_s + self.coding_s + self.spool_s
        lag = np.array(self.lag_ms or [0.0])
        return {"frames": self.frames, "payload_bytes": self.payload_bytes,
                "payload_bytes_per_frame": self.payload_bytes / n,
                "preprocess_ms_per_frame": 1000 * self.preprocess_s / n,
                "inference_ms_per_frame": 1000 * self.inference_s / n,
                "coding_ms_per_frame": 1000 * self.coding_s / n,
                "spool_ms_per_frame": 1000 * self.spool_s / n,
                "coding_share_of_frame": self.coding_s / frame_s if frame_s else None,
                "capture_lag_p99_ms": float(np.percentile(lag, 99)), "capture_lag_max_ms": float(lag.max())}


class Fleet:
    """``Fleet(...).connect()``, ``capture(seconds)``, ``drain(timeout)``, ``close()``."""

    def __init__(self, bundle: Bundle, server_url: str, cameras: list[tuple[str, str]], pool: FramePool, *,
                 fps: float, max_delay: float, camera_work: str = "live", spool_root: str | Path | None = None):
        if camera_work not in ("live", "cached"):
            raise ValueError(f"camera work must be live or cached, got {camera_work!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.bundle, self.pool, self.fps, self.camera_work = bundle, pool, fps, camera_work
        self.preprocess = Preprocessor(bundle.input, pool.roi)
        self.encoder = FrameEncoder(bundle, threads=1, providers="cpu")
        self.times = CaptureTimes()
        self._cache: list[bytes] | None = None
        if camera_work == "cached":
            batch = self.preprocess.batch(pool.images)
            self._cache = [p for i in range(0, len(batch), 64) for p in self.encoder.encode(batch[i:i + 64])]
        # tmpfs by default: the spools are the cameras' flash, not this machine's disk the server's fsyncs go to.
        root = spool_root or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
        self._tmp = tempfile.TemporaryDirectory(prefix="taskcodec-fleet-", dir=root)
        self.cameras: list[CameraState] = []
        for cam_id, token in cameras:
            spool = Spool(Path(self._tmp.name) / cam_id)
            stats = RuntimeStats(camera_id=cam_id)
            config = UplinkConfig(server_url, cam_id, token, max_delay=max_delay,
                                  max_batch=max(64, int(np.ceil(fps * max_delay)) + 1))
            self.cameras.append(CameraState(cam_id, spool, Uplink(spool, bundle.model_tag, config, stats), stats))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fleet-uplinks", daemon=True)
        self._futures: list = []

    # -- connections ---------------------------------------------------------------------------------------------
    def connect(self, timeout: float = 120.0) -> float:
        """Start every camera's uplink in the shared loop and wait until all hold a session; returns seconds taken."""
        t0 = time.monotonic()
        self._thread.start()
        for cam in self.cameras:
            # Uplink.start() would give each camera its own thread and loop; in a fleet they share one loop.
            self._futures.append(asyncio.run_coroutine_threadsafe(cam.uplink._main(), self.loop))
        while time.monotonic() - t0 < timeout:
            fatal = next((c.uplink.fatal for c in self.cameras if c.uplink.fatal is not None), None)
            if fatal is not None:
                raise FleetError(str(fatal))
            if all(c.uplink.sessions >= 1 for c in self.cameras):
                return time.monotonic() - t0
            time.sleep(0.05)
        waiting = sum(c.uplink.sessions < 1 for c in self.cameras)
        last = next((c.uplink.last_error for c in self.cameras if c.uplink.last_error), None)
        raise FleetError(f"{waiting} of {len(self.cameras)} cameras not connected after {timeout:.0f} s"
                         + (f" (last error: {last})" if last else ""))

    # -- capture ---------------------------------------------------------------------------------------------------
    def capture(self, seconds: float, progress=None) -> float:
        """Capture at ``fps`` per camera for ``seconds``; cameras are spread over the frame period in phase slots so
        the load is even. Returns the capture wall time."""
        n = len(self.cameras)
        period = 1.0 / self.fps
        slots = max(1, min(n, int(round(50 * period))))  # at most 50 capture instants per second
        groups = [list(range(s, n, slots)) for s in range(slots)]
        interval = period / slots
        ticks = int(round(seconds / interval))
        start = time.monotonic()
        for t in range(ticks):
            due = start + t * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.times.lag_ms.append(max(0.0, -delay) * 1000)
            self._capture_group(groups[t % slots], t // slots)
            if progress is not None:
                progress(t + 1, ticks)
        return time.monotonic() - start

    def _capture_group(self, members: list[int], frame: int) -> None:
        ts_ms = time.time_ns() // 1_000_000
        idx = [self.pool.index(c, frame) for c in members]
        tm = self.times
        if self._cache is None:
            t0 = time.perf_counter()
            batch = np.concatenate([self.preprocess(self.pool.images[i]) for i in idx], axis=0)
            t1 = time.perf_counter()
            payloads = self.encoder.encode(batch)
            tm.preprocess_s += t1 - t0
            tm.inference_s += self.encoder.last_inference_s
            tm.coding_s += self.encoder.last_coding_s
        else:
            payloads = [self._cache[i] for i in idx]
        for c, i, payload in zip(members, idx, payloads):
            cam = self.cameras[c]
            t2 = time.perf_counter()
            epoch, seq = cam.spool.append(ts_ms, payload)
            tm.spool_s += time.perf_counter() - t2
            cam.labels[(epoch, seq)] = int(self.pool.labels[i])
            cam.stats.frame(len(payload), {})
            cam.uplink.notify()
            tm.frames += 1
            tm.payload_bytes += len(payload)

    def drain(self, timeout: float) -> bool:
        """Wait until every spool is empty (all frames acked) or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.spool.depth() == 0 for c in self.cameras):
                return True
            if any(c.uplink.fatal is not None for c in self.cameras):
                return False
            time.sleep(0.05)
        return all(c.spool.depth() == 0 for c in self.cameras)

    def pending(self) -> int:
        return sum(c.spool.depth() for c in self.cameras)

    def reconnects(self) -> int:
        return sum(max(0, c.uplink.sessions - 1) for c in self.cameras)

    def close(self) -> None:
        for cam in self.cameras:
            cam.uplink.stop(timeout=0)
        for fut in self._futures:
            try:
                fut.result(timeout=15)
            except Exception:  # noqa: BLE001  a camera that failed already reported it through uplink.fatal
                pass
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(15)
        for cam in self.cameras:
            cam.spool.close()
        self._tmp.cleanup()
