"""What the runtime is doing, for people (a live one-line status) and for Prometheus (``taskcodec_runtime_*``).

Each runtime owns a private CollectorRegistry, so several runtimes can live in one process (the fleet benchmark)
without their metrics colliding.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class RuntimeStats:
    """Counters shared by the capture loop and the uplink thread (plain ints: updates are atomic under the GIL)."""

    camera_id: str = ""
    captured: int = 0
    payload_bytes: int = 0
    acked: int = 0
    dropped_full: int = 0
    rejected: int = 0
    reconnects: int = 0
    connected: bool = False
    spool_depth: int = 0
    started: float = field(default_factory=time.monotonic)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    drops: dict = field(default_factory=dict)
    temporal: object = None  # runtime/temporal_uplink.py TemporalTranscoder (its status() joins the status line)

    def __post_init__(self) -> None:
        r = self.registry
        self.m_captured = Counter("taskcodec_runtime_frames_captured", "Frames captured and encoded", registry=r)
        self.m_acked = Counter("taskcodec_runtime_frames_acked", "Frames the server acknowledged", registry=r)
        self.m_dropped = Counter("taskcodec_runtime_frames_dropped", "Frames dropped, by reason",
                                 ["reason"], registry=r)
        self.m_bytes = Counter("taskcodec_runtime_payload_bytes", "Encoded payload bytes", registry=r)
        self.m_reconnects = Counter("taskcodec_runtime_reconnects", "Uplink connection attempts after a failure",
                                    registry=r)
        self.m_connected = Gauge("taskcodec_runtime_connected", "1 while the uplink holds a session", registry=r)
        self.m_depth = Gauge("taskcodec_runtime_spool_depth", "Frames waiting in the spool for an ack", registry=r)
        self.m_bits = Histogram("taskcodec_runtime_frame_bits", "Payload bits per frame", registry=r,
                                buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536))
        self.m_stage = Histogram("taskcodec_runtime_stage_seconds", "Per-frame time by stage", ["stage"], registry=r,
                                 buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1))
        self.m_rtt = Histogram("taskcodec_runtime_batch_ack_seconds", "Batch send to ack time", registry=r)
        # labelled children bound once: labels() is a locked dict lookup with label validation, per frame and stage
        self._stage_children: dict[str, object] = {s: self.m_stage.labels(s)
                                                   for s in ("preprocess", "inference", "coding", "spool")}
        self._drop_children: dict[str, object] = {}

    def frame(self, nbytes: int, stages: dict[str, float]) -> None:
        self.captured += 1
        self.payload_bytes += nbytes
        self.m_captured.inc()
        self.m_bytes.inc(nbytes)
        self.m_bits.observe(8 * nbytes)
        children = self._stage_children
        for stage, seconds in stages.items():
            child = children.get(stage)
            if child is None:
                child = children[stage] = self.m_stage.labels(stage)
            child.observe(seconds)

    def frames(self, sizes: list[int], stages: dict[str, float]) -> None:
        """A window of frames (payload sizes) encoded together; ``stages``: seconds per frame of each stage."""
        n = len(sizes)
        if n == 1:
            return self.frame(sizes[0], stages)
        total = sum(sizes)
        self.captured += n
        self.payload_bytes += total
        self.m_captured.inc(n)
        self.m_bytes.inc(total)
        bits = self.m_bits
        for size in sizes:
            bits.observe(8 * size)
        children = self._stage_children
        for stage, seconds in stages.items():
            child = children.get(stage)
            if child is None:
                child = children[stage] = self.m_stage.labels(stage)
            for _ in range(n):
                child.observe(seconds)

    def ack(self, n: int, rtt: float | None = None) -> None:
        self.acked += n
        self.m_acked.inc(n)
        if rtt is not None:
            self.m_rtt.observe(rtt)

    def drop(self, n: int, reason: str) -> None:
        """Count ``n`` dropped frames once, by reason: spool_full, disk_full (the spool made room or could not store),
        rejected_<code> (the server refused them), malformed, unencodable."""
        if n <= 0:
            return
        if reason in ("spool_full", "disk_full"):
            self.dropped_full += n
        else:
            self.rejected += n
        self.drops[reason] = self.drops.get(reason, 0) + n
        child = self._drop_children.get(reason)
        if child is None:
            child = self._drop_children[reason] = self.m_dropped.labels(reason)
        child.inc(n)

    def set_connected(self, up: bool) -> None:
        self.connected = up
        self.m_connected.set(1 if up else 0)

    def reconnect(self) -> None:
        self.reconnects += 1
        self.m_reconnects.inc()

    def set_depth(self, depth: int) -> None:
        self.spool_depth = depth
        self.m_depth.set(depth)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.rejected


def start_metrics_server(stats: RuntimeStats, port: int, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` on ``port`` (0 picks a free one); returns the port."""
    from prometheus_client import start_http_server

    try:
        result = start_http_server(port, addr=addr, registry=stats.registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on port {port}: {exc}") from exc
    if isinstance(result, tuple):
        stats.metrics_server = result[0]
        return int(result[0].server_port)
    return port


class StatusLine:
    """Refreshes one status line about once a second on stderr (a new line each 10 s when not a terminal)."""

    def __init__(self, stats: RuntimeStats, stream=None, interval: float = 1.0):
        self.stats = stats
        self.stream = stream or sys.stderr
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)
        self._last = (time.monotonic(), 0, 0)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self) -> "StatusLine":
        self._thread.start()
        return self

    def render(self) -> str:
        now, frames, nbytes = time.monotonic(), self.stats.captured, self.stats.payload_bytes
        t0, f0, b0 = self._last
        self._last = (now, frames, nbytes)
        dt = max(now - t0, 1e-6)
        s = self.stats
        bits = 8 * (nbytes - b0) / (frames - f0) if frames > f0 else 0.0
        link = "connected" if s.connected else "offline"
        return (f"{s.camera_id} {(frames - f0) / dt:6.1f} fps  {bits:7.1f} bits/frame  "
                f"{8 * (nbytes - b0) / dt / 1000:7.2f} kbit/s  spool {s.spool_depth}  dropped {s.dropped}  "
                f"acked {s.acked}  [{link}]"
                + (f"  {s.temporal.status()}" if getattr(s.temporal, "encoder", None) is not None else ""))

    def _run(self) -> None:
        every = self.interval if self.tty else max(self.interval, 10.0)
        while not self._stop.wait(every):
            line = self.render()
            self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
            self.stream.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
