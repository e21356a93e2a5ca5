"""Temporal coding at the server (wire v3, issue 15): per WebSocket session, a TBATCH's KEY / COND / SAME frames are
decoded in arrival order against that session's reference (taskcodec.coding.temporal.TemporalDecoder), and every
frame is turned back into its KEY-equivalent payload (the decoded symbols re-encoded with the bundle's key tables).
Storage, queries, heads and exports therefore see exactly what an independent-coding camera would have sent: the
stored payload of a frame is the same whatever kind carried it, so a frame re-sent after a reconnect (as a KEY, or
against another reference) is recognised as a duplicate.

The reference lives only in the session object: a new connection, a server restart, another ``--workers`` process
or an HTTP request (one session per request) starts without one, and the camera starts every connection with a KEY
frame. A frame that cannot be decoded (a COND or SAME frame with no reference, which only a broken camera or a
refused frame before it can cause) is never decoded against a wrong reference: the frames before it are stored and
acked, and the server answers ERROR RESYNC and closes; the camera reconnects and re-sends the rest from a KEY frame.

Wire v4 CBATCHes leave out header fields that continue the connection's previous CBATCH (epoch, first_seq, times):
the front ends decode them without the connection (``wire.decode``: a *pending* CompactBatch) and ``decode`` here
completes each in arrival order with the session's ``wire.Connection`` before anything reads its sequence numbers,
so no front end (ASGI, picows, HTTP) keeps wire state. The camera's and the server's links agree because both move
with every CBATCH of the connection in order, and any batch the server does not process ends the connection (ERROR).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from taskcodec import wire
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, StreamError, compress, decompress
from taskcodec.coding.temporal import KIND_NAMES, TemporalDecoder, TemporalError

log = logging.getLogger("taskcodec.server.temporal")


@dataclass
class SessionTemporal:
    """One connection's temporal state: its decoder (reference) and what it received."""
    decoder: TemporalDecoder
    conn: wire.Connection = field(default_factory=wire.Connection)  # the connection's CBATCH link (v4)
    kinds: dict = field(default_factory=lambda: {"key": 0, "cond": 0, "same": 0})
    payload_bytes: int = 0


class TemporalIngest:
    def __init__(self, bundle: Bundle, key: RangeCoder | None = None):
        self.model_tag = bundle.model_tag
        self.key = key or RangeCoder(bundle.tables)
        tables = bundle.residual_tables
        self.residual = RangeCoder(tables) if tables is not None else None
        self.residual_tag = bundle.residual_tag
        self.frames = {"key": 0, "cond": 0, "same": 0}
        self.resyncs = 0
        self.sessions = 0

    @property
    def available(self) -> bool:
        return self.residual is not None

    def grant(self, hello: wire.Hello) -> SessionTemporal | None:
        """The temporal state of a new session, if the camera asked for it with the residual tables we have."""
        if not (hello.version >= 3 and hello.temporal and self.available):
            return None
        if hello.residual_tag != self.residual_tag:
            log.info("camera %r asks for temporal coding with residual tables %s; this server has %s: plain batches",
                     hello.camera_id, hello.residual_tag.hex(), self.residual_tag.hex())
            return None
        self.sessions += 1
        return SessionTemporal(TemporalDecoder(self.key, self.residual, self.model_tag, self.residual_tag),
                               wire.Connection(hello.version))

    @staticmethod
    def capabilities(state: SessionTemporal | None) -> int:
        return wire.CAP_TEMPORAL if state is not None else 0

    def decode(self, state: SessionTemporal | None, batch: wire.Batch, tag: bytes
               ) -> tuple[list[tuple[wire.Frame, np.ndarray | StreamError]], wire.Error | None]:
        """Per frame (the frame as stored: KEY-equivalent payload, its symbols or the StreamError refusing it), and an
        Error that ends the connection after the frames returned (which may be fewer than the batch's)."""
        if not isinstance(batch, wire.TemporalBatch):
            out = []
            for f in batch.frames:
                try:
                    out.append((f, decompress(f.payload, self.key, tag)))
                except StreamError as exc:
                    out.append((f, exc))
            return out, None
        if state is None:
            return [], wire.Error(wire.Code.BAD_MESSAGE, "TBATCH on a connection that did not negotiate temporal "
                                                         "coding (HELLO v3 with CAP_TEMPORAL and the server's "
                                                         "residual tag)")
        if isinstance(batch, wire.CompactBatch):
            try:
                state.conn.resolve(batch)  # in arrival order: the epoch, seqs and times from the previous CBATCH
            except wire.WireError as exc:
                return [], wire.Error(wire.Code.BAD_MESSAGE, f"malformed CBATCH: {exc}")
        out = []
        dec = state.decoder
        for f in batch.frames:
            name = KIND_NAMES[f.kind]
            try:
                symbols = dec.decode(f.kind, f.payload)
            except TemporalError as exc:
                self.resyncs += 1
                log.warning("temporal: %s frame seq %d without a reference (%d frames of the batch stored): RESYNC",
                            name, f.seq, len(out))
                return out, wire.Error(wire.Code.RESYNC, f"frame seq {f.seq}: {exc}; reconnect and start with a "
                                                         f"key frame")
            except StreamError as exc:
                dec.reset()  # the camera's reference moved on with this frame; ours cannot: the next frame is refused
                out.append((f, StreamError(f"{name} frame: {exc}")))
                continue
            state.kinds[name] += 1
            self.frames[name] += 1
            state.payload_bytes += len(f.payload)
            payload = f.payload if f.kind == wire.KEY else compress(symbols, self.key, tag)
            out.append((wire.Frame(f.seq, f.ts_ms, payload), symbols))
        return out, None
