"""Golden test vectors: frames -> symbols -> bytes, committed with a bundle so any machine can prove it decodes the
same bytes identically (the bundle ships the tables; nobody recomputes them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from taskcodec.bundle import Bundle
from taskcodec.coding import RangeCoder, compress, decompress
from taskcodec.providers import ort_session, run_batched

GOLDEN_FILE = "golden.npz"


def run_encoder(path: Path, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """The encoder ONNX at ``path`` on uint8 frames (CPU, one thread) -> int32 symbols."""
    return run_batched(ort_session(path), frames, batch)


def make_golden(bundle: Bundle, frames: np.ndarray, out: Path) -> Path:
    symbols = run_encoder(bundle.encoder_path(), frames)
    coder = RangeCoder(bundle.tables)
    streams = [compress(s, coder, bundle.model_tag) for s in symbols]
    offsets = np.cumsum([0] + [len(s) for s in streams]).astype(np.int64)
    np.savez_compressed(out, frames=frames, symbols=symbols, streams=np.frombuffer(b"".join(streams), np.uint8),
                        offsets=offsets)
    return out


@dataclass
class GoldenReport:
    frames: int
    symbols_equal: int
    bytes_equal: int
    decoded_equal: int

    @property
    def ok(self) -> bool:
        return self.frames == self.symbols_equal == self.bytes_equal == self.decoded_equal


def verify_golden(bundle: Bundle) -> GoldenReport:
    """Re-run the bundle's encoder and coder on its golden frames and compare with the committed symbols and bytes."""
    with np.load(bundle.file("golden")) as z:
        frames, symbols, blob, offsets = z["frames"], z["symbols"], z["streams"].tobytes(), z["offsets"]
    now = run_encoder(bundle.encoder_path(), frames)
    coder = RangeCoder(bundle.tables)
    streams = [blob[offsets[i]: offsets[i + 1]] for i in range(len(frames))]
    return GoldenReport(
        frames=len(frames),
        symbols_equal=int((now == symbols).all(axis=1).sum()),
        bytes_equal=sum(compress(s, coder, bundle.model_tag) == b for s, b in zip(symbols, streams)),
        decoded_equal=sum(np.array_equal(decompress(b, coder, bundle.model_tag), s) for s, b in zip(symbols, streams)),
    )
