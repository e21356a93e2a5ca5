"""The capture loop: source -> preprocess -> encode -> spool -> uplink, with status and metrics.

``CaptureRuntime`` is what `runtime capture` runs and what the fleet benchmark and the demo drive in-process
(hand it a ready Source or Bundle to share one dataset or model between many cameras).
"""

from __future__ import annotations

import logging
import os
import resource
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from taskcodec.bundle import Bundle, load_bundle
from taskcodec.runtime.encoder import FrameEncoder
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import Source, open_source
from taskcodec.runtime.spool import Spool
from taskcodec.runtime.status import RuntimeStats, StatusLine, start_metrics_server
from taskcodec.runtime.uplink import Uplink, UplinkConfig, UplinkFatal

log = logging.getLogger(__name__)


class UplinkCrashed(RuntimeError):
    """The uplink stopped on a programming error (its traceback is in the log)."""


class CaptureConfig(BaseModel):
    """Typed runtime settings (flags, a YAML file, or Python): an unknown or mistyped key is refused with its name.
    ``device``, ``server`` and ``camera_id`` have no defaults: a camera never silently streams a virtual camera, or
    to 127.0.0.1, or as camera-1."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device: str = Field(min_length=1)
    server: str = Field(min_length=1)
    camera_id: str = Field(min_length=1, max_length=255)
    token: str = Field("", repr=False)   # programmatic use; the CLI takes --token-file or $TASKCODEC_TOKEN
    token_file: Optional[str] = None
    bundle: Optional[str] = None          # None: the embedded default bundle
    precision: Literal["fp32", "int8"] = "fp32"
    # ONNX Runtime intra-op threads: 1 (a 28x28 encoder gains nothing from a pool, whose threads spin after each run);
    # None: ONNX Runtime's default (one per core)
    threads: Optional[int] = Field(1, ge=1)
    providers: Optional[str] = None       # e.g. "cuda,cpu"; None picks the best available
    fps: Optional[float] = Field(None, gt=0)
    size: Optional[tuple[int, int]] = None
    roi: Optional[tuple[int, int, int, int]] = None
    loop: bool = False
    # Frames are encoded and spooled a window at a time: the window is preprocessed, encoded (one ONNX Runtime run),
    # stored (one spool transaction: one fsync) and handed to the uplink together once a frame arrives batch_window
    # seconds after its first one (or batch_frames are held); a source that stalls has its held frames spooled
    # 1.5 x batch_window after the first. At 30 fps 0.3 s is ~9-10 frames: process CPU per frame about half of
    # frame-by-frame work (bench/results/runtime/runtime_cpu.md), for up to 0.3 s more latency; a kill -9 or power loss
    # also loses the frames still held (never one that was spooled, sent or acknowledged). 0: frame by frame.
    batch_window: float = Field(0.3, ge=0)
    batch_frames: int = Field(16, ge=1, le=1024)
    max_delay: float = Field(0.0, ge=0)  # extra batching wait of the uplink (UplinkConfig.max_delay: CPU vs latency)
    max_batch: int = Field(64, ge=1, le=4096)
    max_in_flight: int = Field(8, ge=1)
    spool: str = "~/.cache/taskcodec/spool"
    spool_max_frames: int = Field(100_000, ge=1)
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=256 * 1024)  # database + WAL on disk
    spool_sync: Literal["full", "normal"] = "full"  # "normal": no fsync per frame (survives kill -9, not power loss)
    metrics_port: Optional[int] = Field(None, ge=0, le=65535)
    frames: Optional[int] = Field(None, ge=1)       # stop after this many frames (None: until the source ends)
    drain_timeout: float = Field(30.0, ge=0)        # at the end, wait this long for the spool to empty
    quiet: bool = False
    # temporal coding (wire v3, runtime/temporal_uplink.py); a budget implies it
    temporal: bool = False
    key_interval: Optional[int] = Field(None, ge=1)     # None: the bundle's recommendation
    same_l1: Optional[int] = Field(None, ge=0)
    budget_bps: Optional[float] = Field(None, gt=0)     # payload bits per second of capture time
    budget_window: float = Field(60.0, gt=0)            # the window the budget holds over (within 5 %)
    # over-the-air rollout (runtime/rollout.py): on with at least one trusted operator key (Ed25519 public key PEM)
    trusted_keys: list[str] = []
    rollout_poll: float = Field(30.0, gt=0)             # seconds between assignment checks
    models_dir: Optional[str] = None                    # downloaded bundles (default: <spool>/models)

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v):
        from taskcodec.runtime.sources import parse_size

        return parse_size(v) if isinstance(v, str) else v

    @field_validator("roi", mode="before")
    @classmethod
    def _roi(cls, v):
        from taskcodec.runtime.preprocess import parse_roi

        return parse_roi(v) if isinstance(v, str) else v

    def resolved_token(self) -> str:
        """The camera token: the token file's content if one is set, else ``token``."""
        if not self.token_file:
            return self.token
        path = Path(self.token_file).expanduser()
        try:
            mode = path.stat().st_mode
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token


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
    spool_bytes: int = 0
    drops: dict = field(default_factory=dict)
    error: str | None = None
    labels: list[int | None] = field(default_factory=list)
    temporal: dict | None = None        # what was sent: kinds, SAME share, payload and wire bits/frame, windows

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
        from taskcodec.runtime.rollout import RolloutAgent, startup_bundle

        self.bundle = bundle or startup_bundle(config) or load_bundle(config.bundle)
        self.uplink_config = UplinkConfig(config.server, config.camera_id, config.resolved_token(),
                                          max_delay=config.max_delay,
                                          max_batch=config.max_batch, max_in_flight=config.max_in_flight)
        self.preprocess = Preprocessor(self.bundle.input, config.roi)
        self.encoder = FrameEncoder(self.bundle, config.precision, config.threads, config.providers)
        self.source = source or open_source(config.device, size=config.size, fps=config.fps, loop=config.loop)
        try:
            self.spool = Spool(config.spool, config.spool_max_frames, max_bytes=config.spool_max_bytes,
                               camera_id=config.camera_id, model_id=self.bundle.model_id, sync=config.spool_sync,
                               other_models=bool(config.trusted_keys))
        except Exception:
            self.source.close()
            raise
        self.stats = RuntimeStats(camera_id=config.camera_id)
        self.stats.set_depth(self.spool.depth())
        self.uplink = Uplink(self.spool, self.bundle.model_tag, self.uplink_config, self.stats)
        from taskcodec.runtime.temporal_uplink import TemporalSettings, TemporalTranscoder

        try:  # always present: meters the wire; codes KEY / COND / SAME only with --temporal or --budget-bps
            self.uplink.temporal = self.stats.temporal = TemporalTranscoder(self.bundle, TemporalSettings(
                bool(config.temporal or config.budget_bps), config.key_interval, config.same_l1, config.budget_bps,
                config.budget_window), self.spool)
        except Exception:
            self.spool.close()
            self.source.close()
            raise
        self.rollout = RolloutAgent(self) if config.trusted_keys else None  # over-the-air model switches
        self.keep_labels = keep_labels
        self.metrics_port: int | None = None
        self._stop = threading.Event()
        self.preprocess_s = 0.0
        self.spool_s = 0.0
        # the window of captured frames not yet encoded (see CaptureConfig.batch_window); _batch_lock serializes the
        # capture loop and the flusher thread (which flushes a window whose frames stopped coming)
        self._held: list = []
        self._held_since = 0.0
        self._batch_lock = threading.Lock()
        self._armed = threading.Event()
        self._flusher_idle = False
        self._flusher: threading.Thread | None = None
        self._flush_error: BaseException | None = None
        self._labels: list[int | None] = []

    def stop(self) -> None:
        """Ask :meth:`run` to finish (from another thread or a signal handler); unsent frames stay spooled. A source
        that blocks waiting for frames (the firmware socket) is closed so the loop ends at once."""
        self._stop.set()
        self._armed.set()  # the flusher thread ends
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:  # pacing sleeps and reconnect waits of live cameras end at once
            interrupt()
        if getattr(self.source, "interruptible", False):
            self.source.close()

    def run(self) -> CaptureReport:
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics_port = start_metrics_server(self.stats, cfg.metrics_port)
        status = None if cfg.quiet else StatusLine(self.stats).start()
        self.uplink.start()
        if self.rollout is not None:
            self.rollout.start()
        labels = self._labels
        error: str | None = None
        started = time.monotonic()
        window, most = cfg.batch_window, cfg.batch_frames
        if window > 0 and most > 1:
            self._flusher = threading.Thread(target=self._flusher_main, name="capture-flusher", daemon=True)
            self._flusher.start()
        taken = 0
        try:
            try:
                for frame in self.source:
                    if self._stop.is_set() or self.uplink.fatal is not None:
                        break
                    with self._batch_lock:
                        held = self._held
                        if not held:
                            if self.rollout is not None:
                                self.rollout.at_frame_boundary()  # a verified new model takes over from this frame on
                            self._held_since = time.monotonic()
                            if self._flusher_idle:
                                self._armed.set()  # (a flusher waiting on an earlier deadline finds this window then)
                        held.append(frame)
                        if len(held) >= most or window <= 0 or time.monotonic() - self._held_since >= window:
                            self._flush_locked()
                    if self._flush_error is not None:
                        raise self._flush_error
                    taken += 1
                    if cfg.frames is not None and taken >= cfg.frames:
                        break
            finally:
                stopping, self._flusher = self._flusher, None
                if stopping is not None:
                    self._armed.set()
                    stopping.join()
                if self._flush_error is None:
                    with self._batch_lock:
                        self._flush_locked()  # the frames still held are spooled (on a stop too: they were captured)
            if self._flush_error is not None:
                raise self._flush_error
            capture_elapsed = time.monotonic() - started
            drained = False
            if self.uplink.fatal is None and not self._stop.is_set():
                drained = self.uplink.wait_drained(cfg.drain_timeout, self._stop)
            else:
                drained = self.spool.depth() == 0
        finally:
            if self.rollout is not None:
                self.rollout.stop()
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
        crashed = getattr(self.uplink, "crashed", None)
        self.stats.set_depth(self.spool.depth())
        report = self._report(capture_elapsed, drained, error, labels)
        report.temporal = self.uplink.temporal.summary()
        self.uplink.temporal.close()
        self.spool.close()
        if crashed is not None:
            raise UplinkCrashed(f"the uplink crashed: {crashed!r}") from crashed
        if error is not None:
            raise UplinkFatal(error)
        return report

    def _flush_locked(self) -> None:
        """(Under _batch_lock.) Preprocess, encode, spool (one transaction) and hand to the uplink the held frames."""
        frames, self._held = self._held, []
        if not frames:
            return
        t0 = time.perf_counter()
        pre = self.preprocess
        batch = pre(frames[0].image) if len(frames) == 1 else np.concatenate([pre(f.image) for f in frames])
        t1 = time.perf_counter()
        payloads = self.encoder.encode(batch)
        t2 = time.perf_counter()
        self.spool.append_many([(f.ts_ms, p) for f, p in zip(frames, payloads)])  # None: disk full, counted there
        t3 = time.perf_counter()
        self.uplink.notify()
        n = len(frames)
        self.preprocess_s += t1 - t0
        self.spool_s += t3 - t2
        self.stats.frames([len(p) for p in payloads], {
            "preprocess": (t1 - t0) / n, "inference": self.encoder.last_inference_s / n,
            "coding": self.encoder.last_coding_s / n, "spool": (t3 - t2) / n})
        # count each drop once: the spool's own counters are the truth, the stats follow them
        self.stats.drop(self.spool.made_room - self.stats.drops.get("spool_full", 0), "spool_full")
        self.stats.drop(self.spool.unstored - self.stats.drops.get("disk_full", 0), "disk_full")
        self.stats.set_depth(self.spool.depth())
        if self.keep_labels:
            self._labels.extend(f.label for f in frames)

    def _flusher_main(self) -> None:
        """Spools a window whose frames stopped coming (a stalled or event-driven source) half a window after its
        deadline; the capture loop flushes every other window itself, when a frame arrives past the deadline. About one
        wake-up per window: it sleeps until the deadline it knows of, and is woken only from idle."""
        window = self.config.batch_window
        late = 1.5 * window
        while not self._stop.is_set() and self._flusher is not None:
            self._armed.clear()
            with self._batch_lock:
                since = self._held_since if self._held else None
                self._flusher_idle = since is None
            if since is None:
                self._armed.wait()
                continue
            delay = since + late - time.monotonic()
            if delay > 0:
                self._armed.wait(delay)  # set early only by a stop or the loop's end
                continue
            with self._batch_lock:
                if self._held and self._held_since == since:
                    try:
                        self._flush_locked()
                    except BaseException as exc:  # noqa: BLE001 - re-raised by the capture loop
                        self._flush_error = exc
                        return

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
            peak_rss_mb=peak_rss_mb(), epoch=self.spool.epoch, drained=drained, spool_bytes=self.spool.disk_bytes(),
            drops={**self.spool.counters(), **{f"session_{k}": v for k, v in s.drops.items()}}, error=error,
            labels=labels)


def run_capture(config: CaptureConfig | None = None, **overrides) -> CaptureReport:
    """Programmatic entry: ``run_capture(device=..., server=..., camera_id=..., token=..., frames=100)``."""
    bundle = overrides.pop("bundle_obj", None)
    source = overrides.pop("source_obj", None)
    keep_labels = overrides.pop("keep_labels", False)
    config = CaptureConfig(**{**(config.model_dump() if config else {}), **overrides})
    return CaptureRuntime(config, bundle=bundle, source=source, keep_labels=keep_labels).run()


__all__ = ["CaptureConfig", "CaptureReport", "CaptureRuntime", "UplinkCrashed", "UplinkFatal", "run_capture"]
