"""Temporal coding in the uplink (wire v3, issue 15): the runtime keeps spooling ordinary KEY payloads; at send time
this transcoder decodes each spooled payload to its symbols (cheap) and codes it as a KEY, COND or SAME frame
(taskcodec.coding.temporal) against the reference of the *current connection*, so a server restart, a reconnect or
another server process can never be asked to decode against a frame it does not have:

- every connection starts with a KEY frame (``start_connection`` resets the encoder), and so does the first frame
  after any REJECT (``lost``), after frames dropped before sending, and every ``key_interval`` frames;
- rate control (``budget_bps``): a token bucket refilled by capture time at the budget and holding
  ``0.05 * budget_window_s`` seconds of it decides per frame: the preferred kind (KEY / COND / SAME by the SAME
  threshold) if its payload fits, else SAME (skip: the server keeps the reference). So the payload bits of frames
  captured in any window of ``budget_window_s`` (60 s) stay within 5 % of the budget (plus at most one key frame when
  a connection starts with an empty bucket). Re-sent frames are charged too;
- SAME may be lossy (the server stores the reference's symbols for that frame). A frame that may already be stored
  at the server (sent before on an earlier connection, or spooled by an earlier process) is therefore always re-sent
  as exactly what was sent the first time: its lossy reconstruction, if it had one, is kept (in memory and in a small
  SQLite file next to the spool, so a kill -9 does not forget it) until the frame is acknowledged; otherwise the
  server would see another payload for the same (epoch, seq) and refuse it as a CONFLICT.

On a version-4 connection the frames go as CBATCHes (wire.CompactBatch): the connection's ``wire.Connection`` leaves
out what continues the previous CBATCH (epoch, first seq, base time), capture times at the batch's nominal interval
(``_interval``) cost nothing, and a run of SAME frames is one byte. Whatever resets the
temporal reference (a new connection, ``lost``) also makes the next CBATCH self-contained.
"""

from __future__ import annotations

import copy
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskcodec import wire
from taskcodec.bundle import Bundle, BundleError
from taskcodec.coding import RangeCoder, StreamError, decompress
from taskcodec.coding.temporal import COND, KEY, KIND_NAMES, SAME, TemporalEncoder

log = logging.getLogger(__name__)
RECON_NAME = "temporal_recon.sqlite3"


@dataclass
class TemporalSettings:
    enabled: bool = True                 # False: plain batches, only the wire metering
    key_interval: int | None = None      # None: the bundle's recommendation
    same_l1: int | None = None
    budget_bps: float | None = None
    budget_window_s: float = 60.0


class _ReconStore:
    """(epoch, seq) -> the symbols the server decoded for a frame sent lossily (SAME within the threshold)."""

    def __init__(self, path: Path | None):
        self.mem: dict[tuple[int, int], np.ndarray] = {}
        self.db = None
        if path is not None:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # survives kill -9 (the page cache is the kernel's)
            self.db.execute("CREATE TABLE IF NOT EXISTS recon (epoch INTEGER, seq INTEGER, symbols BLOB, "
                            "PRIMARY KEY (epoch, seq))")
            for e, s, blob in self.db.execute("SELECT epoch, seq, symbols FROM recon"):
                self.mem[(e, s)] = np.frombuffer(blob, np.int32).copy()

    def get(self, epoch: int, seq: int) -> np.ndarray | None:
        return self.mem.get((epoch, seq))

    def put(self, epoch: int, seq: int, symbols: np.ndarray) -> None:
        self.mem[(epoch, seq)] = symbols
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO recon VALUES (?, ?, ?)",
                            (epoch, seq, np.asarray(symbols, np.int32).tobytes()))

    def forget(self, epoch: int, first: int, count: int) -> None:
        keys = [k for k in self.mem if k[0] == epoch and first <= k[1] < first + count]
        for k in keys:
            del self.mem[k]
        if keys and self.db is not None:
            self.db.execute("DELETE FROM recon WHERE epoch = ? AND seq >= ? AND seq < ?", (epoch, first, first + count))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


class TemporalTranscoder:
    """Owned by one Uplink (its event-loop thread); ``summary()`` may be read from any thread."""

    def __init__(self, bundle: Bundle, settings: TemporalSettings, spool=None):
        self.settings = settings
        self.model_tag = bundle.model_tag
        self.key = RangeCoder(bundle.tables)
        rec = bundle.manifest.get("temporal") or {}
        self.key_interval = settings.key_interval or int(rec.get("key_interval", 50))
        self.same_l1 = settings.same_l1 if settings.same_l1 is not None else int(rec.get("same_l1", 0))
        if settings.enabled:
            if bundle.residual_tables is None:
                raise BundleError(f"bundle {bundle.path} has no residual tables for temporal coding: add them with "
                                  f"`taskcodec bundle add-temporal {bundle.path} --out NEW`")
            self.residual_tag = bundle.residual_tag
            self.encoder = TemporalEncoder(self.key, RangeCoder(bundle.residual_tables), self.model_tag,
                                           self.key_interval, self.same_l1, self.residual_tag)
        else:
            self.residual_tag, self.encoder = b"", None
        if settings.budget_bps is not None and settings.budget_bps <= 0:
            raise ValueError("budget must be positive (bits per second)")
        self.depth = 0.05 * settings.budget_window_s * (settings.budget_bps or 0.0)  # bits
        self.tokens = self.depth
        self.last_ts: int | None = None
        self.active = False       # this connection granted CAP_TEMPORAL
        self.conn: wire.Connection | None = None  # v4: this connection's CBATCH link
        start_epoch = getattr(spool, "epoch", None)
        self.fresh_from = (start_epoch, getattr(spool, "next_seq", 0))  # frames before: maybe sent by an earlier run
        self.sent_upto: dict[int, int] = {}                                # epoch -> highest seq sent by this process
        path = Path(spool.path).with_name(RECON_NAME) if settings.enabled and getattr(spool, "path", None) else None
        self.recon = _ReconStore(path)
        # what was sent (every transmission, re-sends included)
        self.kinds = {"key": 0, "cond": 0, "same": 0, "plain": 0}
        self.payload_bytes = 0
        self.wire_bytes = 0
        self.frames_sent = 0
        self.lossy = 0
        self.forced_same = 0
        self.distortion_l1 = 0    # L1 distance between a frame's symbols and what the server decodes (SAME frames)
        self.connections = 0
        self.t0: int | None = None
        self.window_bits: dict[int, int] = {}

    # -- connection life cycle -------------------------------------------------------------------------------------
    def hello_fields(self, model_tag: bytes | None = None) -> dict:
        """HELLO capabilities for a connection under ``model_tag`` (after an over-the-air model switch the uplink may
        connect under another model: temporal coding then stays off, those frames go as plain key frames)."""
        if self.settings.enabled and model_tag in (None, self.model_tag):
            return {"capabilities": wire.CAP_TEMPORAL, "residual_tag": self.residual_tag}
        return {}

    def start_connection(self, welcome: wire.Welcome, model_tag: bytes | None = None) -> None:
        self.connections += 1
        same_model = model_tag in (None, self.model_tag)
        self.active = self.settings.enabled and welcome.temporal and same_model
        if self.settings.enabled and same_model and not welcome.temporal:
            log.warning("the server does not accept temporal coding (no or other residual tables, or wire v2): "
                        "sending independent key frames")
        self.conn = wire.Connection(welcome.version) if welcome.version >= 4 else None
        self.lost()

    def lost(self) -> None:
        """The server may not have this connection's reference any more: the next frame is a KEY frame."""
        if self.encoder is not None:
            self.encoder.reset()
        if self.conn is not None:
            self.conn.reset()  # and the next CBATCH carries every header field

    def settled(self, epoch: int, first: int, count: int) -> None:
        """Acked or rejected: these frames are never sent again."""
        self.recon.forget(epoch, first, count)

    # -- frames ----------------------------------------------------------------------------------------------------
    def _fresh(self, epoch: int, seq: int) -> bool:
        start_epoch, start_seq = self.fresh_from
        return epoch == start_epoch and seq >= start_seq and seq > self.sent_upto.get(epoch, -1)

    def batch(self, rows) -> tuple[wire.TemporalBatch | None, list]:
        """A TBATCH for spooled rows (one run of consecutive seqs), and the rows whose payload does not decode
        locally (the caller drops them; nothing was encoded then)."""
        targets, bad = [], []
        for r in rows:
            sym = self.recon.get(r.epoch, r.seq)
            if sym is None:
                try:
                    sym = decompress(r.payload, self.key, self.model_tag)
                except StreamError:
                    bad.append(r)
                    continue
            targets.append(sym)
        if bad:
            return None, bad
        frames = [self._encode(r, sym) for r, sym in zip(rows, targets)]
        if self.conn is not None:
            return self.conn.batch(rows[0].epoch, frames, self._interval(rows[0].epoch, frames)), []
        return wire.TemporalBatch(rows[0].epoch, frames), []

    def _interval(self, epoch: int, frames: list[wire.Frame]) -> int:
        """The CBATCH's nominal frame interval: of the previous CBATCH's interval, the most common gaps between these
        frames (and from the previous CBATCH's last frame) and their median, the one that makes the shortest
        message (ties: the previous interval, which the message then leaves out)."""
        link = self.conn.link
        times = [f.ts_ms for f in frames]
        if link is not None and link.epoch == epoch and link.last_seq + 1 == frames[0].seq:
            times.insert(0, link.last_ts)
        gaps = [b - a for a, b in zip(times, times[1:]) if 0 <= b - a <= wire.MAX_INTERVAL_MS]
        candidates = [link.interval_ms] if link is not None else []
        if gaps:
            values, counts = np.unique(gaps, return_counts=True)
            candidates += [int(v) for v in values[counts == counts.max()]] + [int(np.median(gaps))]
        if not candidates:
            return 0
        if len(set(candidates)) == 1:
            return candidates[0]
        return min(dict.fromkeys(candidates),
                   key=lambda iv: len(wire.CompactBatch(epoch, frames, iv, link).encode()))

    def _encode(self, row, target: np.ndarray) -> wire.Frame:
        enc = self.encoder
        fresh = self._fresh(row.epoch, row.seq)
        exact = not fresh  # maybe stored already: re-send exactly what the server may hold
        budget = self.settings.budget_bps
        if budget:
            if self.last_ts is None:
                self.tokens = self.depth
            elif row.ts_ms > self.last_ts:
                self.tokens = min(self.depth, self.tokens + budget * (row.ts_ms - self.last_ts) / 1000.0)
            self.last_ts = row.ts_ms if self.last_ts is None else max(self.last_ts, row.ts_ms)
            trial = copy.copy(enc)
            if exact:
                trial.same_l1 = 0
            kind, payload = trial.encode(target)
            if 8 * len(payload) <= self.tokens or enc.ref is None:
                pass                                  # fits (or no reference: a key frame on debt)
            elif not exact or np.array_equal(target, enc.ref):
                trial = copy.copy(enc)
                kind, payload = trial.encode(target, allow=(SAME,))
                self.forced_same += kind == SAME
            trial.same_l1 = self.same_l1
            self.encoder = enc = trial
            self.tokens -= 8 * len(payload)
        else:
            if exact:
                enc.same_l1 = 0
            kind, payload = enc.encode(target)
            enc.same_l1 = self.same_l1
        decoded = enc.ref
        if kind == SAME and not np.array_equal(decoded, target):
            self.lossy += 1
            self.distortion_l1 += int(np.abs(np.asarray(decoded, np.int64) - target).sum())
            self.recon.put(row.epoch, row.seq, np.array(decoded, np.int32))
        self.sent_upto[row.epoch] = max(self.sent_upto.get(row.epoch, -1), row.seq)
        self.kinds[KIND_NAMES[kind]] += 1
        self._meter(row.ts_ms, len(payload))
        return wire.Frame(row.seq, row.ts_ms, payload, kind)

    def _meter(self, ts_ms: int, nbytes: int) -> None:
        self.frames_sent += 1
        self.payload_bytes += nbytes
        if self.t0 is None:
            self.t0 = ts_ms
        w = int((ts_ms - self.t0) // (1000 * self.settings.budget_window_s))
        self.window_bits[w] = self.window_bits.get(w, 0) + 8 * nbytes

    def sent(self, batch: wire.Batch, data: bytes) -> None:
        """A batch went on the wire (plain batches are metered here; temporal frames already in ``batch``)."""
        self.wire_bytes += len(data)
        if not isinstance(batch, wire.TemporalBatch):
            for f in batch.frames:
                self.kinds["plain"] += 1
                self._meter(f.ts_ms, len(f.payload))

    # -- reporting -------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        n = max(self.frames_sent, 1)
        window = self.settings.budget_window_s
        full = sorted(self.window_bits.items())[:-1]  # the last window is still open (or partial)
        rates = [bits / window for _, bits in full]
        return {"temporal": self.settings.enabled, "budget_bps": self.settings.budget_bps, "budget_window_s": window,
                "key_interval": self.key_interval, "same_l1": self.same_l1, "frames_sent": self.frames_sent,
                "kinds": dict(self.kinds), "same_share": self.kinds["same"] / n,
                "payload_bits_per_frame": 8 * self.payload_bytes / n, "wire_bits_per_frame": 8 * self.wire_bytes / n,
                "lossy_same": self.lossy, "forced_same": self.forced_same, "connections": self.connections,
                # what SAME (and the budget's forced SAME) costs: mean L1 distance of the symbols the server decodes
                "l1_distortion_per_frame": self.distortion_l1 / n,
                "window_bps": rates, "max_window_bps": max(rates) if rates else None,
                "max_window_over_budget": (max(rates) / self.settings.budget_bps - 1.0)
                if rates and self.settings.budget_bps else None}

    def status(self) -> str:
        n = max(self.frames_sent, 1)
        return f"{8 * self.payload_bytes / n:.1f} payload bits/frame sent, SAME {100 * self.kinds['same'] / n:.0f} %"

    def close(self) -> None:
        self.recon.close()
