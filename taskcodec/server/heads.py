"""Heads: tasks added after the fact, on the latents the server already stores.

A head is a small classifier (logistic regression or a one-hidden-layer MLP, trained with scikit-learn by
``taskcodec heads train``) over the integer symbols decoded from the stored payloads — never from pixels, which the
server never had. It lives in the server database (table ``heads``: weights as JSON, bound to one bundle model id),
and its labels in ``head_labels`` (one row per frame and head). The server applies every active head of its model to
each batch it stores (:func:`attach_heads` hooks :class:`HeadRunner` into the ingest service's ``stored_hooks``;
heads registered while it runs are picked up on the next batch). Inference is numpy only: no torch, no sklearn, no
pickle on the server.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, StreamError, decompress
from taskcodec.server.storage import frames_by_keys, frames_of_model

log = logging.getLogger("taskcodec.server.heads")

SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    name TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    classes TEXT NOT NULL,
    params TEXT NOT NULL,
    n_labels INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS head_labels (
    camera_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    head TEXT NOT NULL,
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    labelled_ms INTEGER NOT NULL,
    PRIMARY KEY (head, camera_id, epoch, seq)
);
"""


class HeadError(ValueError):
    """A head that cannot be stored or used (bad weights, wrong model, unknown name)."""


@dataclass
class Head:
    """Standardise the symbols, then dense layers with ReLU between them; softmax over ``classes``."""

    name: str
    model_id: str
    kind: str
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W [in, out], b [out])

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        self.layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in self.layers]
        dim = len(self.mean)
        for w, b in self.layers:
            if w.ndim != 2 or w.shape[0] != dim or b.shape != (w.shape[1],):
                raise HeadError(f"head {self.name!r}: layer shapes do not chain ({w.shape}, {b.shape}, input {dim})")
            dim = w.shape[1]
        if dim != len(self.classes) or len(self.std) != len(self.mean) or not len(self.layers):
            raise HeadError(f"head {self.name!r}: {dim} outputs for {len(self.classes)} classes")

    @property
    def latent_dim(self) -> int:
        return len(self.mean)

    def predict(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int symbols [N, D] -> (class index [N], softmax confidence [N])."""
        x = (np.asarray(symbols, np.float64).reshape(-1, self.latent_dim) - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        x -= x.max(axis=1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(axis=1, keepdims=True)
        idx = p.argmax(axis=1)
        return idx, p[np.arange(len(idx)), idx]

    def params_json(self) -> str:
        return json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist(),
                           "layers": [[w.tolist(), b.tolist()] for w, b in self.layers]})

    @classmethod
    def from_row(cls, name: str, model_id: str, kind: str, classes: str, params: str) -> "Head":
        p = json.loads(params)
        return cls(name, model_id, kind, json.loads(classes), p["mean"], p["std"], [tuple(l) for l in p["layers"]])


def _now_ms() -> int:
    return int(time.time() * 1000)


class HeadStore:
    """The heads tables in the server's SQLite file (own connection; WAL mode is set by the server's storage)."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        if not self.path.is_file():
            raise HeadError(f"no server database at {self.path}")
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def register(self, head: Head, n_labels: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO heads (name, model_id, kind, classes, params, n_labels, created_ms, "
                          "active) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                          (head.name, head.model_id, head.kind, json.dumps(head.classes), head.params_json(),
                           int(n_labels), _now_ms()))

    def deactivate(self, name: str) -> bool:
        return self.conn.execute("UPDATE heads SET active = 0 WHERE name = ?", (name,)).rowcount > 0

    def version(self) -> tuple:
        """Changes whenever a head is registered, replaced or (de)activated."""
        return self.conn.execute("SELECT count(*), coalesce(max(created_ms), 0), coalesce(sum(active), 0) "
                                 "FROM heads").fetchone()

    def active(self, model_id: str | None = None) -> list[Head]:
        rows = self.conn.execute("SELECT name, model_id, kind, classes, params FROM heads WHERE active = 1 "
                                 "ORDER BY name").fetchall()
        return [Head.from_row(*r) for r in rows if model_id is None or r[1] == model_id]

    def list(self) -> list[dict]:
        cols = ("name", "model_id", "kind", "classes", "n_labels", "created_ms", "active")
        rows = self.conn.execute(f"SELECT {', '.join(cols)} FROM heads ORDER BY name").fetchall()
        return [dict(zip(cols, r)) | {"classes": json.loads(r[3])} for r in rows]

    def payloads(self, model_id: str, keys: Sequence[tuple[str, int, int]] | None = None,
                 unlabelled_by: str | None = None) -> list[tuple[str, int, int, bytes]]:
        """Stored (camera_id, epoch, seq, payload) of one model: the given keys, or all (optionally only those that
        ``unlabelled_by`` has not labelled yet)."""
        if keys is None:  # recent rows and packed blocks (storage's reader API)
            rows = [r[:3] + (r[6],) for r in frames_of_model(self.conn, model_id)]
            if unlabelled_by:
                done = set(self.conn.execute("SELECT camera_id, epoch, seq FROM head_labels WHERE head = ?",
                                             (unlabelled_by,)).fetchall())
                rows = [r for r in rows if r[:3] not in done]
            return sorted(rows, key=lambda r: r[:3])
        return [(cam, int(epoch), int(seq), payload) for cam, epoch, seq, *_, payload, _, _ in
                frames_by_keys(self.conn, [(c, int(e), int(s)) for c, e, s in keys], model_id)]

    def write_labels(self, head: Head, keys: Iterable[tuple[str, int, int]], idx: np.ndarray,
                     conf: np.ndarray) -> int:
        now = _now_ms()
        rows = [(cam, int(epoch), int(seq), head.name, head.classes[int(i)], float(c), now)
                for (cam, epoch, seq), i, c in zip(keys, idx, conf)]
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR REPLACE INTO head_labels (camera_id, epoch, seq, head, label, confidence, "
                                  "labelled_ms) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.conn.execute("COMMIT")
        return len(rows)

    def labels(self, head: str) -> dict[tuple[str, int, int], tuple[str, float]]:
        rows = self.conn.execute("SELECT camera_id, epoch, seq, label, confidence FROM head_labels WHERE head = ?",
                                 (head,)).fetchall()
        return {(c, e, s): (lab, conf) for c, e, s, lab, conf in rows}


def decode_payloads(bundle: Bundle, payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Payloads -> (symbols [M, D] of those that decode, bool mask [N] of which did)."""
    coder = RangeCoder(bundle.tables)
    symbols, ok = [], np.zeros(len(payloads), bool)
    for i, p in enumerate(payloads):
        try:
            symbols.append(decompress(p, coder, bundle.model_tag))
            ok[i] = True
        except StreamError:
            pass
    dim = bundle.latent_dim
    return (np.stack(symbols) if symbols else np.zeros((0, dim), np.int32)), ok


def relabel(store: HeadStore, bundle: Bundle, head: Head, only_missing: bool = False, chunk: int = 4096) -> int:
    """Label every stored frame of the bundle's model with ``head`` (or only those it has not labelled yet)."""
    rows = store.payloads(bundle.model_id, unlabelled_by=head.name if only_missing else None)
    n = 0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        symbols, ok = decode_payloads(bundle, [r[3] for r in part])
        if len(symbols):
            idx, conf = head.predict(symbols)
            n += store.write_labels(head, [r[:3] for r, good in zip(part, ok) if good], idx, conf)
    return n


class HeadRunner:
    """The ingest hook: after each commit, label the new frames with every active head of the server's model."""

    def __init__(self, bundle: Bundle, db_path: str | Path):
        self.bundle = bundle
        self.db_path = Path(db_path)
        self.store: HeadStore | None = None
        self.heads: list[Head] = []
        self._version: tuple | None = None
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        if self.store is None:
            self.store = HeadStore(self.db_path)
        version = self.store.version()
        if version != self._version:
            self.heads = [h for h in self.store.active(self.bundle.model_id) if h.latent_dim == self.bundle.latent_dim]
            self._version = version
            log.info("heads active for model %s: %s", self.bundle.model_id, [h.name for h in self.heads] or "none")

    def on_stored(self, rows: Sequence[tuple]) -> None:
        """rows: the storage's FrameRow tuples (camera_id, epoch, seq, ts, stored, model_id, payload, pred, conf)."""
        try:
            with self._lock:
                self._refresh()
                if not self.heads or not rows:
                    return
                symbols, ok = decode_payloads(self.bundle, [r[6] for r in rows])
                keys = [r[:3] for r, good in zip(rows, ok) if good]
                for head in self.heads:
                    idx, conf = head.predict(symbols)
                    self.store.write_labels(head, keys, idx, conf)
        except Exception:  # a head must never break ingest: the frames are already stored and acked
            log.exception("applying heads to %d stored frames failed", len(rows))


def attach_heads(service, db_path: str | Path) -> HeadRunner:
    """Hook a :class:`HeadRunner` into an ingest service (``service.bundle``, ``service.stored_hooks``)."""
    runner = HeadRunner(service.bundle, db_path)
    service.stored_hooks.append(runner.on_stored)
    return runner
