"""Temporal coding of consecutive frames of one camera: each frame is a KEY frame (coded on its own, the ordinary
per-image stream), a COND frame (the difference to the reference symbols, coded with residual tables), or SAME (no
payload: the reference symbols stand for this frame too).

The reference is the last KEY or COND frame's symbols, the same on both sides. SAME may be lossy: the encoder sends
SAME when the frame's symbols are within ``same_l1`` (L1 distance) of the reference, so a still object costs nothing;
with ``same_l1=0`` the whole scheme is lossless. The encoder sends a KEY frame first, every ``key_interval`` frames,
and whenever the caller says the decoder may have lost its reference (``reset()``: a dropped frame, a reconnect, a
restart of either side), so a decoder never has to decode against a frame it does not have. The frame kind travels
outside the payload (the uplink's frame header), so a COND payload costs no extra marker.

In the product (wire v3) temporal coding is a per-connection transport feature: the runtime spools ordinary KEY
payloads, its uplink transcodes them at send time against the reference of *its* connection, and the server keeps
the reference per WebSocket session (taskcodec/server/temporal.py, taskcodec/runtime/temporal_uplink.py). COND
payloads carry the stream check seeded with the **residual tag** (``residual_tag``: 8 bytes of sha256 over the model
tag and the residual tables' digest), so COND bytes made with other residual tables never decode.

Why residuals: invariant training maps two views of one object to nearby latents, so the difference of consecutive
frames' symbols is mostly zero and cheap to code; the residual tables are fitted on pairs of consecutive frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import hashlib

import numpy as np

from taskcodec.coding.range_coder import RangeCoder
from taskcodec.coding.stream import StreamError, compress, decompress
from taskcodec.coding.tables import EntropyTables

KEY, COND, SAME = 0, 1, 2
KIND_NAMES = {KEY: "key", COND: "cond", SAME: "same"}


class TemporalError(ValueError):
    """A frame that cannot be decoded: a COND or SAME frame without the reference it depends on."""


def fit_residual_tables(residuals: np.ndarray, support: int = 8, prior: float = 0.5) -> EntropyTables:
    """Per-dimension tables of residual symbols in ``-support..support`` (others escape), from observed residuals
    [N, D] with an additive ``prior`` count per value so that no value in the support is impossible."""
    residuals = np.asarray(residuals, dtype=np.int64)
    values = np.arange(-support, support + 1)
    pmfs = []
    for d in range(residuals.shape[1]):
        counts = np.array([(residuals[:, d] == v).sum() for v in values], dtype=np.float64) + prior
        pmfs.append(counts / counts.sum())
    return EntropyTables.from_pmfs(np.full(residuals.shape[1], -support, np.int32), pmfs)


def residual_tag(model_tag: bytes, tables: EntropyTables) -> bytes:
    """8 bytes naming (model, residual tables): the HELLO's residual tag and the COND payloads' check seed."""
    return hashlib.sha256(b"taskcodec-residual/" + bytes(model_tag) + tables.digest().encode()).digest()[:8]


def policy_residuals(sym: np.ndarray, key: RangeCoder, res: RangeCoder, tag: bytes, key_interval: int,
                     same_l1: int) -> np.ndarray:
    """The residuals (frame minus reference) of the frames a temporal encoder with this policy would not send as
    SAME, on a training video [N, D]."""
    enc = TemporalEncoder(key, res, tag, key_interval, same_l1)
    out = []
    for s in sym:
        ref = enc.ref
        kind, _ = enc.encode(s)
        if ref is not None and kind != SAME:
            out.append(s - ref)
    return np.array(out).reshape(-1, sym.shape[1])


def fit_policy_tables(sym: np.ndarray, key: RangeCoder, tag: bytes, key_interval: int, same_l1: int,
                      support: int = 8) -> EntropyTables:
    """Residual tables for a policy, from the symbols of consecutive frames of a training video: first fitted on
    every non-zero difference, then refitted on the residuals COND frames of this policy actually see."""
    diffs = np.diff(np.asarray(sym, np.int64), axis=0)
    first = RangeCoder(fit_residual_tables(diffs[np.abs(diffs).sum(1) > 0], support))
    return fit_residual_tables(policy_residuals(sym, key, first, tag, key_interval, same_l1), support)


@dataclass
class TemporalEncoder:
    key: RangeCoder
    residual: RangeCoder
    model_tag: bytes
    key_interval: int = 50
    same_l1: int = 0
    cond_tag: bytes | None = None   # the check seed of COND payloads (the residual tag); None: the model tag

    def __post_init__(self) -> None:
        if self.key_interval < 1 or self.same_l1 < 0:
            raise ValueError("key_interval must be >= 1 and same_l1 >= 0")
        self.ref: np.ndarray | None = None
        self.since_key = 0
        if self.cond_tag is None:
            self.cond_tag = self.model_tag

    def reset(self) -> None:
        """The decoder may have lost the reference: the next frame is a KEY frame."""
        self.ref = None

    def encode(self, symbols: np.ndarray, allow: tuple[int, ...] = (KEY, COND, SAME)) -> tuple[int, bytes]:
        """(kind, payload) for one frame's symbols; ``allow`` lets a rate controller forbid the costlier kinds
        (SAME is always possible once a reference exists)."""
        symbols = np.asarray(symbols, dtype=np.int32)
        if self.ref is None or self.since_key + 1 >= self.key_interval:
            return self._key(symbols)
        diff = symbols - self.ref
        self.since_key += 1
        if SAME in allow and int(np.abs(diff).sum()) <= self.same_l1:
            return SAME, b""
        if COND not in allow and KEY not in allow:
            return SAME, b""
        cond = compress(diff, self.residual, self.cond_tag) if COND in allow else None
        if cond is not None:
            if KEY in allow:
                key = compress(symbols, self.key, self.model_tag)
                if len(key) < len(cond):
                    return self._key(symbols, key)
            self.ref = symbols
            return COND, cond
        return self._key(symbols)

    def _key(self, symbols: np.ndarray, payload: bytes | None = None) -> tuple[int, bytes]:
        self.ref = symbols
        self.since_key = 0
        return KEY, payload if payload is not None else compress(symbols, self.key, self.model_tag)


@dataclass
class TemporalDecoder:
    key: RangeCoder
    residual: RangeCoder
    model_tag: bytes
    cond_tag: bytes | None = None

    def __post_init__(self) -> None:
        self.ref: np.ndarray | None = None
        if self.cond_tag is None:
            self.cond_tag = self.model_tag

    def reset(self) -> None:
        self.ref = None

    def decode(self, kind: int, payload: bytes) -> np.ndarray:
        if kind == KEY:
            self.ref = decompress(payload, self.key, self.model_tag)
            return self.ref
        if self.ref is None:
            raise TemporalError(f"a {KIND_NAMES.get(kind, kind)} frame needs the previous frame, which this decoder "
                                "does not have (the encoder must send a key frame after any loss)")
        if kind == SAME:
            if payload:
                raise StreamError("a SAME frame has no payload")
            return self.ref
        if kind == COND:
            self.ref = (self.ref + decompress(payload, self.residual, self.cond_tag)).astype(np.int32)
            return self.ref
        raise StreamError(f"unknown frame kind {kind}")
