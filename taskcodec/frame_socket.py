"""The frame socket protocol (version 1): how camera firmware hands raw frames to the runtime over a unix socket.

Each frame is a fixed 32-byte little-endian header followed by ``payload_len`` bytes of packed pixels (row-major,
HxWxC, no padding). The header is fixed-size so a C sender needs no parser state, and it carries its own magic and
version so a stray writer or an old firmware is refused instead of being read as pixels. Mirrors
firmware_bridge/c/taskcodec_frames.h; see docs/wire-format.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"TCFR"
VERSION = 1
HEADER = struct.Struct("<4sBBBBHHIQiI")
HEADER_BYTES = HEADER.size  # 32
MAX_DIM = 4096
NO_LABEL = -1

GRAY8, BGR24, RGB24 = 1, 2, 3
FORMATS = {"gray8": GRAY8, "bgr24": BGR24, "rgb24": RGB24}
CHANNELS = {GRAY8: 1, BGR24: 3, RGB24: 3}

assert HEADER_BYTES == 32


class FrameProtocolError(ValueError):
    """A header that is not a version-1 frame header (the receiver drops the connection)."""


@dataclass(frozen=True)
class FrameHeader:
    width: int
    height: int
    pixel_format: int
    ts_ms: int
    label: int | None = None

    @property
    def channels(self) -> int:
        return CHANNELS[self.pixel_format]

    @property
    def payload_len(self) -> int:
        return self.width * self.height * self.channels

    def pack(self) -> bytes:
        if self.pixel_format not in CHANNELS:
            raise ValueError(f"pixel format must be one of {FORMATS}, got {self.pixel_format}")
        if not (0 < self.width <= MAX_DIM and 0 < self.height <= MAX_DIM):
            raise ValueError(f"width and height must be 1..{MAX_DIM}, got {self.width}x{self.height}")
        label = NO_LABEL if self.label is None else self.label
        return HEADER.pack(MAGIC, VERSION, self.pixel_format, self.channels, 0, self.width, self.height,
                           self.payload_len, self.ts_ms, label, 0)


def parse_header(raw: bytes) -> FrameHeader:
    """32 bytes -> FrameHeader; raises FrameProtocolError saying what is wrong."""
    if len(raw) != HEADER_BYTES:
        raise FrameProtocolError(f"frame header is {HEADER_BYTES} bytes, got {len(raw)}")
    magic, version, fmt, channels, flags, width, height, payload_len, ts_ms, label, reserved = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not a taskcodec frame stream")
    if version != VERSION:
        raise FrameProtocolError(f"frame protocol version {version} is not supported (this receiver speaks {VERSION})")
    if fmt not in CHANNELS:
        raise FrameProtocolError(f"unknown pixel format {fmt} (1 gray8, 2 bgr24, 3 rgb24)")
    if channels != CHANNELS[fmt]:
        raise FrameProtocolError(f"pixel format {fmt} has {CHANNELS[fmt]} channels, header says {channels}")
    if flags or reserved:
        raise FrameProtocolError("reserved header fields must be zero in version 1")
    if not (0 < width <= MAX_DIM and 0 < height <= MAX_DIM):
        raise FrameProtocolError(f"frame size {width}x{height} outside 1..{MAX_DIM}")
    if payload_len != width * height * channels:
        raise FrameProtocolError(f"payload length {payload_len} != {width}x{height}x{channels}")
    return FrameHeader(width, height, fmt, ts_ms, None if label < 0 else label)


def synthetic_pattern(width: int, height: int, channels: int, k: int) -> np.ndarray:
    """Frame ``k`` of the test pattern fw_camera_example sends without --raw (HxWxC uint8)."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
    return ((x * 3 + y * 5 + c * 11 + k * 7) & 0xFF).astype(np.uint8)
