"""The uplink wire format (version 1), shared by runtime/, server/ and firmware_bridge/; see docs/wire-format.md.

Every message starts with a one-byte type. Integers are unsigned LEB128 varints unless noted, which keeps per-frame
framing to about 3 bytes (hand-written: a dozen lines, and protobuf would cost more bytes and a schema compiler).

    HELLO  0x01  version:u8  model_tag:8 bytes  camera_id:(u8 len, utf-8)  token:(u8 len, bytes)
    BATCH  0x02  epoch  first_seq  count  base_ts_ms  then per frame: ts_delta_ms  length  payload
    ACK    0x03  epoch  first_seq  count                       (frames durably stored, duplicates included)
    REJECT 0x04  epoch  first_seq  count  code:u8  reason      (frames that will never be accepted)
    ERROR  0x05  code:u8  reason                               (the connection is refused; the server closes it)
    WELCOME 0x06 version:u8                                    (HELLO accepted)

Frames in a BATCH have consecutive sequence numbers ``first_seq + i`` within one boot ``epoch``; a frame's capture time
is ``base_ts_ms`` plus the running sum of deltas. ``reason`` is a varint length plus utf-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VERSION = 1
MAX_FRAMES_PER_BATCH = 4096
MAX_FRAME_BYTES = 65536


class WireError(ValueError):
    """Bytes that are not a well-formed message."""


class Code:
    BAD_MESSAGE = 1
    UNAUTHORIZED = 2
    UNKNOWN_MODEL = 3
    BAD_PAYLOAD = 4
    BUSY = 5


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varints are unsigned")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise WireError("message ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, limit: int = 1 << 63) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise WireError("varint too long")
        if value > limit:
            raise WireError(f"value {value} exceeds {limit}")
        return value

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WireError("message ends early")
        self.pos += n
        return bytes(self.data[self.pos - n: self.pos])

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{len(self.data) - self.pos} trailing bytes")


@dataclass(frozen=True)
class Hello:
    model_tag: bytes
    camera_id: str
    token: bytes
    version: int = VERSION
    TYPE = 0x01

    def encode(self) -> bytes:
        cam = self.camera_id.encode()
        if len(self.model_tag) != 8 or not 0 < len(cam) < 256 or len(self.token) > 255:
            raise ValueError("model tag is 8 bytes, camera id 1..255 bytes, token at most 255 bytes")
        return bytes([self.TYPE, self.version]) + self.model_tag + bytes([len(cam)]) + cam + bytes([len(self.token)]) + self.token


@dataclass(frozen=True)
class Frame:
    seq: int
    ts_ms: int
    payload: bytes


@dataclass(frozen=True)
class Batch:
    epoch: int
    frames: list[Frame] = field(default_factory=list)
    TYPE = 0x02

    def encode(self) -> bytes:
        if not self.frames or len(self.frames) > MAX_FRAMES_PER_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_FRAMES_PER_BATCH} frames")
        first = self.frames[0]
        out = bytearray([self.TYPE])
        for v in (self.epoch, first.seq, len(self.frames), first.ts_ms):
            put_varint(out, v)
        prev = first.ts_ms
        for i, f in enumerate(self.frames):
            if f.seq != first.seq + i:
                raise ValueError("frames in a batch need consecutive sequence numbers")
            put_varint(out, max(0, f.ts_ms - prev))
            prev = max(prev, f.ts_ms)
            put_varint(out, len(f.payload))
            out += f.payload
        return bytes(out)


@dataclass(frozen=True)
class Ack:
    epoch: int
    first_seq: int
    count: int
    TYPE = 0x03

    def encode(self) -> bytes:
        out = bytearray([self.TYPE])
        for v in (self.epoch, self.first_seq, self.count):
            put_varint(out, v)
        return bytes(out)


@dataclass(frozen=True)
class Reject:
    epoch: int
    first_seq: int
    count: int
    code: int
    reason: str
    TYPE = 0x04

    def encode(self) -> bytes:
        out = bytearray([self.TYPE])
        for v in (self.epoch, self.first_seq, self.count):
            put_varint(out, v)
        out.append(self.code)
        _put_text(out, self.reason)
        return bytes(out)


@dataclass(frozen=True)
class Error:
    code: int
    reason: str
    TYPE = 0x05

    def encode(self) -> bytes:
        out = bytearray([self.TYPE, self.code])
        _put_text(out, self.reason)
        return bytes(out)


@dataclass(frozen=True)
class Welcome:
    version: int = VERSION
    TYPE = 0x06

    def encode(self) -> bytes:
        return bytes([self.TYPE, self.version])


Message = Hello | Batch | Ack | Reject | Error | Welcome


def _put_text(out: bytearray, text: str) -> None:
    raw = text.encode()[:1024]
    put_varint(out, len(raw))
    out += raw


def _text(r: Reader) -> str:
    return r.take(r.varint(1024)).decode("utf-8", errors="replace")


def decode(data: bytes) -> Message:
    """Parse one message; raises WireError for anything malformed (never anything else)."""
    r = Reader(data)
    kind = r.u8()
    if kind == Hello.TYPE:
        version = r.u8()
        if version != VERSION:
            raise WireError(f"wire version {version} is not supported (server speaks {VERSION})")
        tag = r.take(8)
        cam_raw = r.take(r.u8())
        try:
            cam = cam_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("camera id is not utf-8") from exc
        if not cam:
            raise WireError("empty camera id")
        msg: Message = Hello(tag, cam, r.take(r.u8()), version)
    elif kind == Batch.TYPE:
        epoch, first, count, ts = r.varint(2**32), r.varint(2**63), r.varint(MAX_FRAMES_PER_BATCH), r.varint(2**63)
        if count == 0:
            raise WireError("empty batch")
        frames = []
        for i in range(count):
            ts += r.varint(2**32)
            frames.append(Frame(first + i, ts, r.take(r.varint(MAX_FRAME_BYTES))))
        msg = Batch(epoch, frames)
    elif kind == Ack.TYPE:
        msg = Ack(r.varint(2**32), r.varint(), r.varint(MAX_FRAMES_PER_BATCH))
    elif kind == Reject.TYPE:
        msg = Reject(r.varint(2**32), r.varint(), r.varint(MAX_FRAMES_PER_BATCH), r.u8(), _text(r))
    elif kind == Error.TYPE:
        msg = Error(r.u8(), _text(r))
    elif kind == Welcome.TYPE:
        msg = Welcome(r.u8())
    else:
        raise WireError(f"unknown message type 0x{kind:02x}")
    r.end()
    return msg
