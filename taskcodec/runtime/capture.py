"""The capture loop: source -> preprocess -> encode -> spool -> uplink, with status and metrics.

``CaptureRuntime`` is what `runtime capture` runs and what the fleet benchmark and the demo drive in-process
(hand it a ready Source or Bundle to share one dataset or model between many cameras).
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from taskcodec.bundle import Bundle, load_bundle
from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import Source, open_source
from taskcodec.runtime.spool import Spool
from taskcodec.runtime.status import RuntimeStats, StatusLine, start_metrics_server
from taskcodec.runtime.uplink import Uplink, UplinkConfig, UplinkFatal

log = logging.getLogger(__name__)


@dataclass
class CaptureConfig:
    device: str = "virtual://fashion-mnist"
    server: str = "http://127.0.0.1:8000"
    camera_id: str = "camera-1"
    token: str = ""
    bundle: str | None = None          # None: the embedded default bundle
    precision: str = "fp32"
    threads: int | None = None
    providers: str | None = None       # e.g. "cuda,cpu"; None picks the best available
    fps: float | None = None
    size: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None
    loop: bool = False
    max_delay: float = 0.05
    max_batch: int = 64
    max_in_flight: int = 8
    spool: str = "~/.cache/taskcodec/spool"
    spool_max_frames: int = 100_000
    spool_sync: str = "full"           # "normal": no fsync per frame (survives kill -9, not power loss)
    metrics_port: int | None = None
    frames: int | None = None          # stop after this many frames (None: until the source ends or stop())
    drain_timeout: float = 30.0        # at the end, wait this long for the spool to empty
    quiet: bool = False


@dataclass
class CaptureReport:
    camera_id: str
    frames: int
    acked: int
    dropped: int
    rejected: int
    spool_depth: int
    reconnects: int
    elapsed_s: float
    fps: float
    bits_per_frame: float
    kbit_per_s: float
    inference_ms_per_frame: float
    coding_ms_per_frame: float
    preprocess_ms_per_frame: float
    spool_ms_per_frame: float
    coding_share: float                 # range coding / (inference + range coding)
    coding_share_of_frame: float        # range coding / whole per-frame time (preprocess..spool)
    peak_rss_mb: float
    epoch: int
    drained: bool
    error: str | None = None
    labels: list[int | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


class CaptureRuntime:
    def __init__(self, config: CaptureConfig, *, bundle: Bundle | None = None, source: Source | None = None,
                 keep_labels: bool = False):
        """Opens everything up front so a bad bundle, source, spool or flag fails before any frame is taken."""
        self.config = config
        self.bundle = bundle or load_bundle(config.bundle)
        self.uplink_config = UplinkConfig(config.server, config.camera_id, config.token, max_delay=config.max_delay,
                                          max_batch=config.max_batch, max_in_flight=config.max_in_flight)
        self.preprocess = Preprocessor(self.bundle.input, config.roi)
        self.encoder = FrameEncoder(self.bundle, config.precision, config.threads, config.providers)
        self.source = source or open_source(config.device, size=config.size, fps=config.fps, loop=config.loop)
        try:
            self.spool = Spool(config.spool, config.spool_max_frames, sync=config.spool_sync)
        except Exception:
            self.source.close()
            raise
        self.stats = RuntimeStats(camera_id=config.camera_id)
        self.stats.set_depth(self.spool.depth())
        self.uplink = Uplink(self.spool, self.bundle.model_tag, self.uplink_config, self.stats)
        self.keep_labels = keep_labels
        self.metrics_port: int | None = None
        self._stop = threading.Event()
        self.preprocess_s = 0.0
        self.spool_s = 0.0

    def stop(self) -> None:
        """Ask :meth:`run` to finish (from another thread or a signal handler); unsent frames stay spooled."""
        self._stop.set()

    def run(self) -> CaptureReport:
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics_port = start_metrics_server(self.stats, cfg.metrics_port)
        status = None if cfg.quiet else StatusLine(self.stats).start()
        self.uplink.start()
        labels: list[int | None] = []
        error: str | None = None
        started = time.monotonic()
        try:
            for frame in self.source:
                if self._stop.is_set() or self.uplink.fatal is not None:
                    break
                t0 = time.perf_counter()
                batch = self.preprocess(frame.image)
                t1 = time.perf_counter()
                payload = self.encoder.encode(batch)[0]
                t2 = time.perf_counter()
                self.spool.append(frame.ts_ms, payload)
                t3 = time.perf_counter()
                self.uplink.notify()
                self.preprocess_s += t1 - t0
                self.spool_s += t3 - t2
                self.stats.frame(len(payload), {"preprocess": t1 - t0, "inference": self.encoder.last_inference_s,
                                                "coding": self.encoder.last_coding_s, "spool": t3 - t2})
                full = self.spool.full_drops - self.stats.dropped_full
                if full > 0:
                    self.stats.drop(full, "spool_full")
                self.stats.set_depth(self.spool.depth())
                if self.keep_labels:
                    labels.append(frame.label)
                if cfg.frames is not None and self.stats.captured >= cfg.frames:
                    break
            capture_elapsed = time.monotonic() - started
            drained = False
            if self.uplink.fatal is None and not self._stop.is_set():
                drained = self.uplink.wait_drained(cfg.drain_timeout)
            else:
                drained = self.spool.depth() == 0
        finally:
            self.uplink.stop()
            self.source.close()
            if status is not None:
                status.stop()
            server = getattr(self.stats, "metrics_server", None)
            if server is not None:
                server.shutdown()
                server.server_close()
        if self.uplink.fatal is not None:
            error = str(self.uplink.fatal)
        self.stats.set_depth(self.spool.depth())
        report = self._report(capture_elapsed, drained, error, labels)
        self.spool.close()
        if error is not None:
            raise UplinkFatal(error)
        return report

    def _report(self, elapsed: float, drained: bool, error: str | None, labels: list) -> CaptureReport:
        s, e = self.stats, self.encoder.stats
        n = max(s.captured, 1)
        frame_s = self.preprocess_s + e.inference_s + e.coding_s + self.spool_s
        return CaptureReport(
            camera_id=self.config.camera_id, frames=s.captured, acked=s.acked, dropped=s.dropped,
            rejected=s.rejected, spool_depth=self.spool.depth(), reconnects=s.reconnects, elapsed_s=elapsed,
            fps=s.captured / elapsed if elapsed > 0 else 0.0, bits_per_frame=8 * s.payload_bytes / n,
            kbit_per_s=8 * s.payload_bytes / elapsed / 1000 if elapsed > 0 else 0.0,
            inference_ms_per_frame=1000 * e.inference_s / n, coding_ms_per_frame=1000 * e.coding_s / n,
            preprocess_ms_per_frame=1000 * self.preprocess_s / n, spool_ms_per_frame=1000 * self.spool_s / n,
            coding_share=e.coding_share, coding_share_of_frame=e.coding_s / frame_s if frame_s else 0.0,
            peak_rss_mb=peak_rss_mb(), epoch=self.spool.epoch, drained=drained, error=error, labels=labels)


def run_capture(config: CaptureConfig | None = None, **overrides) -> CaptureReport:
    """Programmatic entry: ``run_capture(device=..., server=..., camera_id=..., token=..., frames=100)``."""
    bundle = overrides.pop("bundle_obj", None)
    source = overrides.pop("source_obj", None)
    keep_labels = overrides.pop("keep_labels", False)
    config = CaptureConfig(**{**(asdict(config) if config else {}), **overrides})
    return CaptureRuntime(config, bundle=bundle, source=source, keep_labels=keep_labels).run()


__all__ = ["CaptureConfig", "CaptureReport", "CaptureRuntime", "UplinkFatal", "run_capture"]
