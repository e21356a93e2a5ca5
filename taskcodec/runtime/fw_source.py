"""FrameSocketSource: the runtime's ``fw://PATH`` source. Listens on a unix socket and yields the frames camera
firmware sends (protocol in taskcodec/frame_socket.py and docs/wire-format.md).

One sender is served at a time (others wait in the listen backlog). A malformed header or a sender that hangs up
mid-frame is logged, recorded in ``errors``, and only that connection is dropped: the source keeps listening, so a
buggy or restarting firmware never takes the runtime down. Frames carry the firmware's capture time, not the time
they were read.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from taskcodec.frame_socket import BGR24, GRAY8, HEADER_BYTES, RGB24, FrameHeader, FrameProtocolError, parse_header

from taskcodec.runtime.source import CapturedFrame, Source, SourceError

log = logging.getLogger(__name__)


class _HungUp(Exception):
    """The sender closed the connection at a frame boundary (normal end)."""


class FrameSocketSource(Source):
    """Yields CapturedFrame(image HxWx3 BGR or HxWx1 gray uint8, capture ts_ms, index, label) from a unix socket.

    ``size`` resizes frames (INTER_AREA), ``fps`` drops frames that arrive faster than that (a live source must not
    queue stale frames), ``loop`` is ignored (a live stream cannot rewind). ``idle_timeout`` ends the iteration
    after that many seconds without a frame and ``max_frames`` after that many frames (both None: forever).
    """

    live = True
    interruptible = True  # close() from a signal handler or another thread ends a blocked iteration within poll_s

    def __init__(self, path: str | os.PathLike, *, size: tuple[int, int] | None = None, fps: float | None = None,
                 loop: bool = False, idle_timeout: float | None = None, max_frames: int | None = None,
                 poll_s: float = 0.2):
        super().__init__(size=size, fps=fps, loop=False)
        self.size, self.fps = size, fps
        self.path = Path(path).expanduser()
        self.description = f"firmware frame socket {self.path}"
        self.idle_timeout, self.max_frames, self.poll_s = idle_timeout, max_frames, poll_s
        self.errors: list[str] = []
        self.connections = 0
        self._closed = False
        self._listener = self._listen()

    def _listen(self) -> socket.socket:
        if not self.path.parent.is_dir():
            raise SourceError(f"cannot listen on {self.path}: folder {self.path.parent} does not exist")
        if len(os.fsencode(self.path)) > 107:
            raise SourceError(f"unix socket path {self.path} is too long (at most 107 bytes)")
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise SourceError(f"{self.path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # a stale socket from a process that is gone
            else:
                probe.close()
                raise SourceError(f"another process is already listening on {self.path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(4)
        except OSError as exc:
            listener.close()
            raise SourceError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        listener.settimeout(poll_s if (poll_s := self.poll_s) else None)
        return listener

    def close(self) -> None:
        """Stop listening and remove the socket file (safe to call from another thread, and twice)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._listener.close()
        finally:
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    self.path.unlink()
            except OSError:
                pass

    def _expired(self, deadline: float | None) -> bool:
        return self._closed or (deadline is not None and time.monotonic() > deadline)

    def _deadline(self) -> float | None:
        return None if self.idle_timeout is None else time.monotonic() + self.idle_timeout

    def _read_exact(self, conn: socket.socket, n: int, deadline_ref: list, *, at_boundary: bool) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if self._expired(deadline_ref[0]):
                return None
            try:
                k = conn.recv_into(view[got:])
            except socket.timeout:
                continue
            except OSError as exc:
                raise FrameProtocolError(f"connection error: {exc}") from exc
            if k == 0:
                if got == 0 and at_boundary:
                    raise _HungUp
                raise FrameProtocolError(f"sender hung up mid-frame ({got} of {n} bytes)")
            got += k
        return buf

    def _image(self, header: FrameHeader, payload: bytearray) -> np.ndarray:
        image = np.frombuffer(payload, np.uint8).reshape(header.height, header.width, header.channels)
        if header.pixel_format == RGB24:
            image = np.ascontiguousarray(image[..., ::-1])  # the runtime's frames are BGR
        if self.size is not None and (header.width, header.height) != tuple(self.size):
            image = cv2.resize(image, tuple(self.size), interpolation=cv2.INTER_AREA)
            if image.ndim == 2:
                image = image[..., None]
        return image

    def __iter__(self) -> Iterator[CapturedFrame]:
        index = 0
        last_ts: int | None = None
        min_gap_ms = 1000.0 / self.fps if self.fps else 0.0
        deadline = [self._deadline()]
        while not self._expired(deadline[0]):
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                raise
            self.connections += 1
            conn.settimeout(self.poll_s or None)
            try:
                while True:
                    raw = self._read_exact(conn, HEADER_BYTES, deadline, at_boundary=True)
                    if raw is None:
                        return
                    header = parse_header(bytes(raw))
                    payload = self._read_exact(conn, header.payload_len, deadline, at_boundary=False)
                    if payload is None:
                        return
                    deadline[0] = self._deadline()
                    if min_gap_ms and last_ts is not None and header.ts_ms - last_ts < min_gap_ms:
                        continue  # faster than the fps cap: drop rather than queue
                    last_ts = header.ts_ms
                    yield CapturedFrame(self._image(header, payload), header.ts_ms, index, header.label)
                    index += 1
                    if self.max_frames is not None and index >= self.max_frames:
                        return
            except _HungUp:
                pass
            except FrameProtocolError as exc:
                message = f"dropped connection {self.connections}: {exc}"
                self.errors.append(message)
                log.error("%s: %s", self.description, message)
            finally:
                conn.close()


def send_frames(path: str | os.PathLike, frames: Iterable[tuple[np.ndarray, int, int | None]],
                pixel_format: str = "bgr24", timeout: float = 10.0) -> int:
    """Python sender (for tests and tools): send (image HxWxC uint8, ts_ms, label) frames; returns the count."""
    fmt = {"gray8": GRAY8, "bgr24": BGR24, "rgb24": RGB24}[pixel_format]
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        for image, ts_ms, label in frames:
            image = np.ascontiguousarray(image, dtype=np.uint8)
            header = FrameHeader(image.shape[1], image.shape[0], fmt, int(ts_ms), label)
            if image.size != header.payload_len:
                raise ValueError(f"image of shape {image.shape} does not fit pixel format {pixel_format}")
            sock.sendall(header.pack() + image.tobytes())
            sent += 1
    return sent
