"""The frame-source interface every capture source implements (sources.py names them by URI; fw_source.py adds the
firmware frame socket): a source yields CapturedFrame, paced to ``fps`` and resized to ``size``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from taskcodec.runtime.clock import now_ms


class SourceError(RuntimeError):
    """A source that cannot be opened or stopped delivering frames."""


@dataclass(frozen=True)
class CapturedFrame:
    image: np.ndarray      # H x W x C uint8 (BGR) or H x W (gray)
    ts_ms: int             # capture wall-clock time, ms since the epoch
    index: int             # 0, 1, 2, ... in delivery order
    label: int | None = None  # ground truth where the source knows it (virtual camera)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'640x480' -> (640, 480) (width, height)."""
    if text is None or text == "":
        return None
    try:
        w, h = (int(v) for v in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT like 640x480, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h


class Source:
    """Base class: subclasses implement ``_read`` (next image and label, or None at the end) and ``_rewind``."""

    description = "source"
    live = False  # live sources are not throttled by a file's timing and cannot loop

    def __init__(self, *, size: tuple[int, int] | None = None, fps: float | None = None, loop: bool = False):
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.size = size
        self.fps = fps
        self.loop = loop
        self.interrupted = threading.Event()
        # the pacing sleep: a held lock that interrupt() releases. One C-level timed acquire per frame instead of
        # Event.wait's Python-level condition machinery (a lock allocated per wait): measurably less CPU at 30 fps
        self._sleeper = threading.Lock()
        self._sleeper.acquire()

    def interrupt(self) -> None:
        """Make a blocked or paced iteration end soon (SIGTERM); safe from a signal handler or another thread."""
        self.interrupted.set()
        try:
            self._sleeper.release()
        except RuntimeError:  # already released by an earlier interrupt
            pass

    def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless interrupted (then at once); True if interrupted."""
        if self._sleeper.acquire(timeout=seconds):
            self._sleeper.release()  # stays released: every later pause returns at once too
        return self.interrupted.is_set()

    def _read(self) -> tuple[np.ndarray, int | None] | None:
        raise NotImplementedError

    def _rewind(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[CapturedFrame]:
        index = 0
        period = 1.0 / self.fps if self.fps else 0.0
        next_due = time.monotonic()
        while not self.interrupted.is_set():
            if period:
                delay = next_due - time.monotonic()
                if delay > 0 and self.pause(delay):
                    return
                next_due = max(next_due + period, time.monotonic() - period)
            item = self._read()
            if item is None and self.loop and self._rewind():
                item = self._read()
            if item is None:
                return
            image, label = item
            if self.size is not None and (image.shape[1], image.shape[0]) != self.size:
                image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
            yield CapturedFrame(image, now_ms(), index, label)
            index += 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


