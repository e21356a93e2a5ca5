"""Prometheus metrics of one server instance, in their own registry so several apps can live in one process (tests).

Counters and the histogram touched per message or per frame are plain Python numbers (``LocalCounter``,
``LocalHistogram``) exported by a collector at scrape time: prometheus_client's own Counter takes a mutex and checks
its arguments on every ``inc`` (visible in the per-message profile). A LocalCounter is incremented from one thread
only (the event loop, or the ingest thread), so ``+=`` under the GIL loses nothing; the histogram is filled once per
micro-batch under its own lock. The exposed names and types are those prometheus_client would write.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

PREFIX = "taskcodec_server_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class LocalCounter:
    """A counter without a lock: ``inc`` from a single thread (see the module docstring)."""

    __slots__ = ("name", "doc", "value")

    def __init__(self, name: str, doc: str):
        self.name, self.doc, self.value = name, doc, 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LocalHistogram:
    """A histogram filled with many observations at once (``observe_many``: one numpy call per micro-batch)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc = name, doc
        self.bounds = np.asarray(buckets, float)
        self.counts = np.zeros(len(buckets) + 1, np.int64)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value], float))

    def observe_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        # le semantics: a value equal to a bound falls in that bound's bucket
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def family(self) -> HistogramMetricFamily:
        with self._lock:
            cumulative = np.cumsum(self.counts)
            total = self.sum
        buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cumulative[:-1])] + [("+Inf", float(cumulative[-1]))]
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=total)


def _le(bound: float) -> str:
    return repr(float(bound))


class _LocalCollector:
    def __init__(self, counters: list[LocalCounter], histograms: list[LocalHistogram]):
        self.counters, self.histograms = counters, histograms

    def collect(self):
        for c in self.counters:
            yield CounterMetricFamily(c.name, c.doc, value=float(c.value))
        for h in self.histograms:
            yield h.family()


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # per message / per frame: plain numbers, exported by _LocalCollector
        self.frames_received = LocalCounter(PREFIX + "frames_received", "Frames received in batches")
        self.frames_stored = LocalCounter(PREFIX + "frames_stored", "Frames newly committed to storage")
        self.frames_duplicate = LocalCounter(PREFIX + "frames_duplicate", "Frames already stored (acked again)")
        self.bytes_received = LocalCounter(PREFIX + "bytes_received", "Message bytes received (WS and HTTP)")
        self.capture_to_stored = LocalHistogram(PREFIX + "capture_to_stored_seconds",
                                                "Camera capture time to commit time per stored frame (camera clock!)",
                                                _LATENCY_BUCKETS + (300.0, 3600.0))
        # CPU of the ingest thread (time.thread_time) per micro-batch: all of process(), and its storage call alone
        self.process_cpu = LocalCounter(PREFIX + "process_cpu_seconds", "Ingest thread CPU in decode + classify + "
                                        "store of micro-batches")
        self.store_cpu = LocalCounter(PREFIX + "store_cpu_seconds", "Ingest thread CPU in the storage write "
                                      "(store_batches) of micro-batches")
        r.register(_LocalCollector([self.frames_received, self.frames_stored, self.frames_duplicate,
                                    self.bytes_received, self.process_cpu, self.store_cpu],
                                   [self.capture_to_stored]))
        self.frames_rejected = Counter(PREFIX + "frames_rejected", "Frames rejected, by reason", ["reason"],
                                       registry=r)
        self.messages_refused = Counter(PREFIX + "messages_refused", "Messages answered with an Error, by reason",
                                        ["reason"], registry=r)
        self.process_seconds = Histogram(PREFIX + "decode_classify_seconds",
                                         "Decode + classify + commit time of one micro-batch", registry=r,
                                         buckets=_LATENCY_BUCKETS)
        self.microbatch_frames = Histogram(PREFIX + "microbatch_frames", "Frames per micro-batch", registry=r,
                                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.frames_conflict = Counter(PREFIX + "frames_conflict", "Frames refused: key already stored with another "
                                       "payload", registry=r)
        self.storage_full = Gauge(PREFIX + "storage_full", "1 while the database or disk is full", registry=r)
        self.storage_full_episodes = Counter(PREFIX + "storage_full_episodes", "Storage-full episodes", registry=r)
        self.storage_damaged = Gauge(PREFIX + "storage_damaged", "1 once the database failed an integrity check",
                                     registry=r)
        self.pending_connections = Gauge(PREFIX + "pending_connections", "WebSocket connections not yet "
                                         "authenticated", registry=r)
        self.pending_refused = Counter(PREFIX + "connections_refused", "Connections refused by a limit, by limit",
                                       ["limit"], registry=r)
        self.auth_failures = Counter(PREFIX + "auth_failures", "Failed authentications, by kind (camera, operator)",
                                     ["kind"], registry=r)
        self.connections = Gauge(PREFIX + "connections", "Open WebSocket connections", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
