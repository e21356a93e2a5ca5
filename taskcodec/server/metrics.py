"""Prometheus metrics of one server instance, in their own registry so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "taskcodec_server_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter(PREFIX + "frames_received", "Frames received in batches", registry=r)
        self.frames_stored = Counter(PREFIX + "frames_stored", "Frames newly committed to storage", registry=r)
        self.frames_duplicate = Counter(PREFIX + "frames_duplicate", "Frames already stored (acked again)",
                                        registry=r)
        self.frames_rejected = Counter(PREFIX + "frames_rejected", "Frames rejected, by reason", ["reason"],
                                       registry=r)
        self.messages_refused = Counter(PREFIX + "messages_refused", "Messages answered with an Error, by reason",
                                        ["reason"], registry=r)
        self.bytes_received = Counter(PREFIX + "bytes_received", "Message bytes received (WS and HTTP)", registry=r)
        self.process_seconds = Histogram(PREFIX + "decode_classify_seconds",
                                         "Decode + classify + commit time of one micro-batch", registry=r,
                                         buckets=_LATENCY_BUCKETS)
        self.capture_to_stored = Histogram(PREFIX + "capture_to_stored_seconds",
                                           "Camera capture time to commit time per stored frame (camera clock!)",
                                           registry=r, buckets=_LATENCY_BUCKETS + (300.0, 3600.0))
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
