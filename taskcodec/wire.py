"""The uplink wire format (version 2), shared by runtime/, server/ and firmware_bridge/; see docs/wire-format.md.

Every message starts with a one-byte type. Integers are unsigned LEB128 varints unless noted (``svarint``: a signed
integer zig-zag mapped to an unsigned varint: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), which keeps per-frame framing to
about 3 bytes (hand-written: a dozen lines, and protobuf would cost more bytes and a schema compiler).

    HELLO  0x01  version:u8  model_tag:8 bytes  camera_id:(u8 len, utf-8)  token:(u8 len, bytes)
    BATCH  0x02  epoch  first_seq  count  base_ts_ms:svarint  then per frame: ts_delta_ms:svarint  length  payload
    ACK    0x03  epoch  first_seq  count                       (frames durably stored, duplicates included)
    REJECT 0x04  epoch  first_seq  count  code:u8  reason      (frames that will never be accepted)
    ERROR  0x05  code:u8  reason                               (the connection is refused; the server closes it)
    WELCOME 0x06 version:u8                                    (HELLO accepted)

Frames in a BATCH have consecutive sequence numbers ``first_seq + i`` within one ``epoch``: a random 63-bit id the
camera draws once when its spool is created (never derived from its clock). A frame's capture time is
``base_ts_ms`` plus the running sum of the signed deltas, so any clock step (forwards or backwards, by years) inside
a batch encodes the true per-frame times. ``reason`` is a varint length plus utf-8.

Version 2 (this one) changed from version 1: epoch limit 2^63-1 (was 2^32), signed zig-zag base time and deltas
(were unsigned, deltas capped at 2^32 and clamped at 0 for a clock going backwards), first_seq limit 2^63-1, reply
code 6 CONFLICT. A HELLO of version 1 is refused (``decode`` raises WireError naming both versions).

This module is the ONLY parser of uplink messages. Server and clients use, instead of parsing bytes themselves:

- ``decode(data)``                  one complete message (a WebSocket binary message);
- ``split_ingest_body(body)``       an HTTP ``POST /v1/ingest`` body -> (Hello, the BATCH bytes); decode the BATCH
                                    bytes with ``decode`` (so the server can authenticate before parsing the batch);
- ``decode_ingest_body(body)``      the same, fully decoded: (Hello, Batch);
- ``encode_ingest_body(hello, batch)`` the body a camera POSTs;
- ``decode_replies(data)``          an HTTP ingest response body (concatenated ACK / REJECT / ERROR) -> messages;
- ``encode_replies(msgs)``          the server's side of it.
(Note to the server side: taskcodec/server/ingest.py:split_ingest_body and server/client.py:read_replies /
_message_end should become thin calls of these; the HELLO layout is unchanged in v2, so they still work meanwhile.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

VERSION = 2
SUPPORTED_VERSIONS = (2,)
MAX_FRAMES_PER_BATCH = 4096
MAX_FRAME_BYTES = 65536
MAX_EPOCH = (1 << 63) - 1       # epochs and sequence numbers fit a signed 64-bit database column
MAX_SEQ = (1 << 63) - 1
MAX_ABS_TS_MS = (1 << 62) - 1   # |capture time| in ms; any two such times differ by less than 2^63
MAX_REASON_BYTES = 1024
MAX_HELLO_BYTES = 1 + 1 + 8 + 1 + 255 + 1 + 255  # 522: a server may refuse a longer first message unread
_U64 = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not a well-formed message."""


class Code:
    BAD_MESSAGE = 1
    UNAUTHORIZED = 2
    UNKNOWN_MODEL = 3
    BAD_PAYLOAD = 4
    BUSY = 5
    CONFLICT = 6   # REJECT: this (camera, epoch, seq) is already stored with a different payload (v2)


CODE_NAMES = {Code.BAD_MESSAGE: "bad_message", Code.UNAUTHORIZED: "unauthorized", Code.UNKNOWN_MODEL: "unknown_model",
              Code.BAD_PAYLOAD: "bad_payload", Code.BUSY: "busy", Code.CONFLICT: "conflict"}


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


def zigzag(value: int) -> int:
    """Signed -> unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    return value << 1 if value >= 0 else ((-value) << 1) - 1


def unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def put_svarint(out: bytearray, value: int) -> None:
    put_varint(out, zigzag(value))


class Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = memoryview(data)
        self.pos = pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise WireError("message ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, limit: int = MAX_SEQ) -> int:
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

    def svarint(self, limit: int) -> int:
        """A zig-zag signed varint with ``|value| <= limit``."""
        value = unzigzag(self.varint(_U64))
        if abs(value) > limit:
            raise WireError(f"value {value} outside ±{limit}")
        return value

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WireError("message ends early")
        self.pos += n
        return bytes(self.data[self.pos - n: self.pos])

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

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
        if not 0 <= self.epoch <= MAX_EPOCH or not 0 <= first.seq or first.seq + len(self.frames) - 1 > MAX_SEQ:
            raise ValueError(f"epoch and sequence numbers are 0..{MAX_EPOCH}")
        out = bytearray([self.TYPE])
        for v in (self.epoch, first.seq, len(self.frames)):
            put_varint(out, v)
        prev = first.ts_ms
        put_svarint(out, prev)
        for i, f in enumerate(self.frames):
            if f.seq != first.seq + i:
                raise ValueError("frames in a batch need consecutive sequence numbers")
            if not -MAX_ABS_TS_MS <= f.ts_ms <= MAX_ABS_TS_MS:
                raise ValueError(f"capture time {f.ts_ms} ms is outside ±{MAX_ABS_TS_MS}")
            if len(f.payload) > MAX_FRAME_BYTES:
                raise ValueError(f"a payload is at most {MAX_FRAME_BYTES} bytes")
            put_svarint(out, f.ts_ms - prev)
            prev = f.ts_ms
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
REPLY_TYPES = (Ack, Reject, Error, Welcome)


def _put_text(out: bytearray, text: str) -> None:
    raw = text.encode()[:MAX_REASON_BYTES]
    put_varint(out, len(raw))
    out += raw


def _text(r: Reader) -> str:
    return r.take(r.varint(MAX_REASON_BYTES)).decode("utf-8", errors="replace")


def _read_message(r: Reader) -> Message:
    """Parse one message at the reader's position (the reader ends just after it)."""
    kind = r.u8()
    if kind == Hello.TYPE:
        version = r.u8()
        if version not in SUPPORTED_VERSIONS:
            raise WireError(f"wire version {version} is not supported: this side speaks version {VERSION} "
                            f"(update the camera's taskcodec runtime or firmware library)")
        tag = r.take(8)
        cam_raw = r.take(r.u8())
        try:
            cam = cam_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("camera id is not utf-8") from exc
        if not cam:
            raise WireError("empty camera id")
        return Hello(tag, cam, r.take(r.u8()), version)
    if kind == Batch.TYPE:
        epoch, first, count = r.varint(MAX_EPOCH), r.varint(MAX_SEQ), r.varint(MAX_FRAMES_PER_BATCH)
        if count == 0:
            raise WireError("empty batch")
        if first + count - 1 > MAX_SEQ:
            raise WireError(f"sequence numbers beyond {MAX_SEQ}")
        ts = r.svarint(MAX_ABS_TS_MS)
        frames = []
        for i in range(count):
            ts += r.svarint(2 * MAX_ABS_TS_MS)
            if abs(ts) > MAX_ABS_TS_MS:
                raise WireError(f"capture time {ts} ms outside ±{MAX_ABS_TS_MS}")
            frames.append(Frame(first + i, ts, r.take(r.varint(MAX_FRAME_BYTES))))
        return Batch(epoch, frames)
    if kind == Ack.TYPE:
        return Ack(r.varint(MAX_EPOCH), r.varint(MAX_SEQ), r.varint(MAX_FRAMES_PER_BATCH))
    if kind == Reject.TYPE:
        return Reject(r.varint(MAX_EPOCH), r.varint(MAX_SEQ), r.varint(MAX_FRAMES_PER_BATCH), r.u8(), _text(r))
    if kind == Error.TYPE:
        return Error(r.u8(), _text(r))
    if kind == Welcome.TYPE:
        return Welcome(r.u8())
    raise WireError(f"unknown message type 0x{kind:02x}")


def decode(data: bytes) -> Message:
    """Parse exactly one message; raises WireError for anything malformed (never anything else)."""
    r = Reader(data)
    msg = _read_message(r)
    r.end()
    return msg


def decode_all(data: bytes) -> list[Message]:
    """Messages concatenated back to back (no length prefixes: each message's own fields delimit it)."""
    r, out = Reader(data), []
    while not r.at_end():
        out.append(_read_message(r))
    return out


def decode_replies(data: bytes) -> list[Message]:
    """An HTTP ingest response body: one or more ACK / REJECT / ERROR messages."""
    msgs = decode_all(data)
    for m in msgs:
        if not isinstance(m, (Ack, Reject, Error)):
            raise WireError(f"unexpected {type(m).__name__} in an ingest reply")
    return msgs


def encode_replies(msgs: list[Message]) -> bytes:
    return b"".join(m.encode() for m in msgs)


def encode_ingest_body(hello: Hello, batch: Batch) -> bytes:
    """The body of ``POST /v1/ingest``: HELLO || BATCH."""
    return hello.encode() + batch.encode()


def split_ingest_body(body: bytes) -> tuple[Hello, bytes]:
    """An ingest body -> (its HELLO, the bytes after it, which should be one BATCH: pass them to ``decode``)."""
    r = Reader(body)
    if not body or body[0] != Hello.TYPE:
        raise WireError("an ingest body starts with a HELLO message")
    hello = _read_message(r)
    assert isinstance(hello, Hello)
    return hello, bytes(r.data[r.pos:])


def decode_ingest_body(body: bytes) -> tuple[Hello, Batch]:
    hello, rest = split_ingest_body(body)
    batch = decode(rest)
    if not isinstance(batch, Batch):
        raise WireError(f"an ingest body is HELLO || BATCH, got HELLO || {type(batch).__name__}")
    return hello, batch
