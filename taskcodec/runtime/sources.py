"""Frame sources named by jetson-utils videoSource-style URIs.

    /dev/videoN, v4l2:///dev/videoN     USB / V4L2 camera (OpenCV CAP_V4L2, 1-frame buffer so frames are fresh)
    csi://N                             Jetson CSI camera through nvarguscamerasrc (needs OpenCV with GStreamer)
    rtsp://...                          network camera (OpenCV FFmpeg, TCP transport)
    file://PATH, PATH                   a video file, or a folder of images (sorted by name)
    virtual://fashion-mnist?...         built-in virtual camera rendering Fashion-MNIST items (knows each label)
    virtual://dwell?...                 objects that enter, dwell, move a little and leave (runtime/dwell.py)
    fw://PATH                           frames from the firmware frame socket (runtime/fw_source.py)

Every source yields :class:`CapturedFrame`. Common options: ``size`` (capture size asked of cameras, frames of other
sources are resized to it), ``fps`` (a cap: the source never delivers faster), ``loop`` (restart finite sources).
"""

from __future__ import annotations

import logging
import os
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from taskcodec.runtime.source import CapturedFrame, Source, SourceError, parse_size  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"}


class OpenCVSource(Source):
    """Any cv2.VideoCapture: cameras, RTSP, video files."""

    def __init__(self, target: str | int, api: int, description: str, *, live: bool, props: dict[int, float] | None = None,
                 **options):
        super().__init__(**options)
        self.description = description
        self.live = live
        self.target, self.api, self.props = target, api, dict(props or {})
        self.cap = self._open()
        if self.cap is None:
            raise SourceError(f"cannot open {description}")
        self._failures = 0

    def _open(self) -> "cv2.VideoCapture | None":
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 15000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000] \
            if self.api == cv2.CAP_FFMPEG and self.live else []
        cap = cv2.VideoCapture(self.target, self.api, params) if params else cv2.VideoCapture(self.target, self.api)
        if not cap.isOpened():
            cap.release()
            return None
        for prop, value in self.props.items():
            cap.set(prop, value)
        if self.size is not None and self.live:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        return cap

    def _read(self):
        reopens = 0
        while not self.interrupted.is_set():
            ok, image = self.cap.read() if self.cap is not None else (False, None)
            if ok and image is not None:
                self._failures = 0
                return image, None
            if not self.live:
                return None
            self._failures += 1
            if self._failures < 50:
                self.interrupted.wait(0.02)
                continue
            # a network camera dropped or a USB camera re-enumerated: reopen a few times before giving up
            if reopens >= 5:
                raise SourceError(f"{self.description} stopped delivering frames (reopened {reopens} times)")
            log.warning("%s delivers no frames; reopening", self.description)
            if self.interrupted.wait(min(2 ** reopens, 10)):
                return None
            reopens += 1
            if self.cap is not None:
                self.cap.release()
            self.cap = self._open()
            self._failures = 0
        return None  # interrupted (SIGTERM)

    def _rewind(self) -> bool:
        if self.live:
            return False
        if not self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self.cap.release()
            self.cap = self._open()
        return self.cap is not None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()


def _v4l2(path: str, **options) -> Source:
    if not os.path.exists(path):
        raise SourceError(f"camera {path} does not exist: is it plugged in? (list cameras with `v4l2-ctl --list-devices`)")
    if not stat.S_ISCHR(os.stat(path).st_mode):
        raise SourceError(f"{path} is not a V4L2 device (not a character device)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise SourceError(f"no permission to open {path}: add the user to the 'video' group")
    return OpenCVSource(path, cv2.CAP_V4L2, f"V4L2 camera {path}", live=True,
                        props={cv2.CAP_PROP_BUFFERSIZE: 1}, **options)


def gstreamer_available() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def csi_pipeline(sensor_id: int, size: tuple[int, int] | None, fps: float | None) -> str:
    w, h = size or (1280, 720)
    rate = int(round(fps or 30))
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! video/x-raw(memory:NVMM), width={w}, height={h}, "
            f"framerate={rate}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
            f"appsink drop=true max-buffers=1")


def _csi(rest: str, **options) -> Source:
    try:
        sensor = int(rest or 0)
    except ValueError:
        raise SourceError(f"csi:// takes a sensor number like csi://0, got csi://{rest}") from None
    if not gstreamer_available():
        raise SourceError("csi:// needs OpenCV built with GStreamer (this cv2 has none; on a Jetson use the system "
                          "python3-opencv from JetPack instead of opencv-python-headless)")
    return OpenCVSource(csi_pipeline(sensor, options.get("size"), options.get("fps")), cv2.CAP_GSTREAMER,
                        f"CSI camera {sensor}", live=True, **options)


def _rtsp(uri: str, **options) -> Source:
    os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
    return OpenCVSource(uri, cv2.CAP_FFMPEG, f"network stream {uri}", live=True, **options)


class ImageFolderSource(Source):
    """Images of a folder in name order; unreadable files are skipped with a warning."""

    def __init__(self, folder: Path, **options):
        super().__init__(**options)
        self.description = f"image folder {folder}"
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise SourceError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.pos = 0

    def _read(self):
        while self.pos < len(self.files):
            path = self.files[self.pos]
            self.pos += 1
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                log.warning("skipping %s: not a readable image", path)
                continue
            return _to_uint8(image), None
        return None

    def _rewind(self) -> bool:
        self.pos = 0
        return True


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _path(path: str, **options) -> Source:
    p = Path(path).expanduser()
    if p.is_dir():
        return ImageFolderSource(p, **options)
    if not p.exists():
        raise SourceError(f"no such file or folder: {p}")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise SourceError(f"{p} is a single image; pass the folder that holds it")
    return OpenCVSource(str(p), cv2.CAP_FFMPEG, f"video file {p}", live=False, **options)


class VirtualFashionMNIST(Source):
    """A deterministic virtual camera: Fashion-MNIST items, optionally placed in a larger camera frame.

    Query options: ``split`` (test), ``seed`` (0; frame order and placement depend only on it), ``count`` (frames per
    pass, default the whole split), ``size`` (WxH canvas; default 28x28), ``item`` (item size in pixels; default the
    canvas height), ``place`` (center or random), ``noise`` (background noise std), ``channels`` (1 or 3; default 3
    for a canvas larger than 28x28). Each frame carries its true label.
    """

    def __init__(self, query: dict[str, str], **options):
        from taskcodec.data import load_fashion_mnist

        known = {"split", "seed", "count", "size", "item", "place", "noise", "channels", "data"}
        unknown = set(query) - known
        if unknown:
            raise SourceError(f"virtual://fashion-mnist does not know {', '.join(sorted(unknown))} "
                              f"(options: {', '.join(sorted(known))})")
        try:
            canvas = parse_size(query.get("size")) or options.get("size") or (28, 28)
            self.seed = int(query.get("seed", 0))
            self.place = query.get("place", "center")
            self.noise = float(query.get("noise", 0))
            channels = int(query.get("channels", 3 if canvas != (28, 28) else 1))
            item = int(query.get("item", min(canvas)))
        except ValueError as exc:
            raise SourceError(f"bad virtual camera option: {exc}") from None
        if self.place not in ("center", "random"):
            raise SourceError(f"place must be center or random, got {self.place!r}")
        if channels not in (1, 3) or not 0 < item <= min(canvas):
            raise SourceError(f"channels must be 1 or 3 and item 1..{min(canvas)} pixels")
        options["size"] = canvas
        super().__init__(**options)
        self.images, self.labels = load_fashion_mnist(query.get("split", "test"), query.get("data"))
        count = int(query.get("count", len(self.images)))
        rng = np.random.default_rng(self.seed)
        self.order = rng.permutation(len(self.images))[:count] if count <= len(self.images) else \
            rng.integers(0, len(self.images), count)
        self.canvas, self.channels, self.item = canvas, channels, item
        self.description = f"virtual Fashion-MNIST camera {canvas[0]}x{canvas[1]} seed {self.seed}"
        self.pos = 0

    @property
    def item_roi(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the item when ``place=center`` — the ROI a real deployment would configure."""
        w, h = self.canvas
        return (w - self.item) // 2, (h - self.item) // 2, self.item, self.item

    def render(self, k: int) -> tuple[np.ndarray, int]:
        """Frame ``k`` of a pass (deterministic given the seed) and its label."""
        idx = int(self.order[k])
        w, h = self.canvas
        rng = np.random.default_rng((self.seed, k))
        frame = np.zeros((h, w), np.float32)
        if self.noise:
            frame += rng.normal(0, self.noise, frame.shape).astype(np.float32)
        item = self.images[idx]
        if self.item != 28:
            item = cv2.resize(item, (self.item, self.item), interpolation=cv2.INTER_CUBIC)
        if self.place == "center":
            x, y = (w - self.item) // 2, (h - self.item) // 2
        else:
            x, y = int(rng.integers(0, w - self.item + 1)), int(rng.integers(0, h - self.item + 1))
        frame[y:y + self.item, x:x + self.item] += item
        frame = np.clip(frame, 0, 255).astype(np.uint8)
        if self.channels == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return frame, int(self.labels[idx])

    def _read(self):
        if self.pos >= len(self.order):
            return None
        self.pos += 1
        return self.render(self.pos - 1)

    def _rewind(self) -> bool:
        self.pos = 0
        return True


def _virtual(rest: str, **options) -> Source:
    parsed = urllib.parse.urlsplit("virtual://" + rest)
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    if parsed.netloc == "dwell":  # objects that enter, dwell and leave (runtime/dwell.py)
        from taskcodec.runtime.dwell import DwellCamera

        return DwellCamera(query, **options)
    if parsed.netloc != "fashion-mnist":
        raise SourceError(f"unknown virtual camera {parsed.netloc!r}; available: virtual://fashion-mnist, "
                          "virtual://dwell")
    return VirtualFashionMNIST(query, **options)


def _firmware(path: str, **options) -> Source:
    try:
        from taskcodec.runtime.fw_source import FrameSocketSource
    except ImportError as exc:
        raise SourceError(f"fw:// needs firmware_bridge.frame_socket, which cannot be imported: {exc}") from exc
    return FrameSocketSource(path, **options)


SCHEMES: dict[str, Callable[..., Source]] = {
    "v4l2": _v4l2,
    "csi": _csi,
    "rtsp": _rtsp,
    "rtsps": _rtsp,
    "file": _path,
    "virtual": _virtual,
    "fw": _firmware,
}


def register_scheme(scheme: str, factory: Callable[..., Source]) -> None:
    """Add a URI scheme: ``factory(rest_of_uri, size=..., fps=..., loop=...)`` returns a Source."""
    SCHEMES[scheme] = factory


def open_source(uri: str, *, size: tuple[int, int] | None = None, fps: float | None = None,
                loop: bool = False) -> Source:
    """Open a source by URI (see the module docstring); raises SourceError with a clear reason."""
    uri = str(uri).strip()
    if not uri:
        raise SourceError("no source given (e.g. /dev/video0, csi://0, rtsp://..., a video file, virtual://fashion-mnist)")
    options = dict(size=size, fps=fps, loop=loop)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("rtsp", "rtsps"):
            return _rtsp(uri, **options)
        factory = SCHEMES.get(scheme)
        if factory is None:
            raise SourceError(f"unknown source scheme {scheme}://; known: {', '.join(s + '://' for s in SCHEMES)}")
        return factory(rest, **options)
    if uri.startswith("/dev/video"):
        return _v4l2(uri, **options)
    return _path(uri, **options)
