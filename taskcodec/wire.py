"""The uplink wire format (version 3), shared by runtime/, server/ and firmware_bridge/; see docs/wire-format.md.

Every message starts with a one-byte type. Integers are unsigned LEB128 varints unless noted (``svarint``: a signed
integer zig-zag mapped to an unsigned varint: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), which keeps per-frame framing to
about 3 bytes (hand-written: a dozen lines, and protobuf would cost more bytes and a schema compiler).

    HELLO  0x01  version:u8  model_tag:8 bytes  camera_id:(u8 len, utf-8)  token:(u8 len, bytes)
                 [v3: capabilities:varint  and, if bit 0 (temporal), residual_tag:8 bytes]
    BATCH  0x02  epoch  first_seq  count  base_ts_ms:svarint  then per frame: ts_delta_ms:svarint  length  payload
    TBATCH 0x07  (v3) as BATCH, but per frame: ts_delta_ms:svarint  (length << 2 | kind)  payload
                 kind 0 KEY, 1 COND, 2 SAME (length 0), 3 refused; only in a session whose WELCOME granted temporal
    ACK    0x03  epoch  first_seq  count                       (frames durably stored, duplicates included)
    REJECT 0x04  epoch  first_seq  count  code:u8  reason      (frames that will never be accepted)
    ERROR  0x05  code:u8  reason                               (the connection is refused; the server closes it)
    WELCOME 0x06 version:u8  [v3: granted capabilities:varint] (HELLO accepted)

Frames in a BATCH have consecutive sequence numbers ``first_seq + i`` within one ``epoch``: a random 63-bit id the
camera draws once when its spool is created (never derived from its clock). A frame's capture time is
``base_ts_ms`` plus the running sum of the signed deltas, so any clock step (forwards or backwards, by years) inside
a batch encodes the true per-frame times. ``reason`` is a varint length plus utf-8.

Version 2 (this one) changed from version 1: epoch limit 2^63-1 (was 2^32), signed zig-zag base time and deltas
(were unsigned, deltas capped at 2^32 and clamped at 0 for a clock going backwards), first_seq limit 2^63-1, reply
code 6 CONFLICT. A HELLO of version 1 is refused (``decode`` raises WireError naming both versions).

Version 3 (this one) adds temporal coding as a per-connection capability: HELLO v3 ends with a capabilities varint
(bit 0 CAP_TEMPORAL, followed by the 8-byte residual tag of the camera's residual tables); WELCOME v3 ends with the
capabilities the server grants; TBATCH (0x07) carries each frame's kind in the low 2 bits of its length; ERROR code 7
RESYNC ("I lost this connection's reference: reconnect, starting with a key frame"). Version 2 HELLOs are still
accepted (answered with a version-2 WELCOME; such a session is plain BATCHes only).

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

VERSION = 3
SUPPORTED_VERSIONS = (2, 3)
CAP_TEMPORAL = 1                # HELLO/WELCOME capability bit: TBATCH frames (KEY / COND / SAME) on this connection
MAX_CAPABILITIES = (1 << 32) - 1
KEY, COND, SAME = 0, 1, 2       # TBATCH frame kinds (taskcodec.coding.temporal uses the same numbers)
MAX_FRAMES_PER_BATCH = 4096
MAX_FRAME_BYTES = 65536
MAX_EPOCH = (1 << 63) - 1       # epochs and sequence numbers fit a signed 64-bit database column
MAX_SEQ = (1 << 63) - 1
MAX_ABS_TS_MS = (1 << 62) - 1   # |capture time| in ms; any two such times differ by less than 2^63
MAX_REASON_BYTES = 1024
MAX_HELLO_BYTES = 1 + 1 + 8 + 1 + 255 + 1 + 255 + 5 + 8  # 535: a server may refuse a longer first message unread
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
    RESYNC = 7     # ERROR (v3): the server lost this connection's temporal reference; reconnect (next frame KEY)


CODE_NAMES = {Code.BAD_MESSAGE: "bad_message", Code.UNAUTHORIZED: "unauthorized", Code.UNKNOWN_MODEL: "unknown_model",
              Code.BAD_PAYLOAD: "bad_payload", Code.BUSY: "busy", Code.CONFLICT: "conflict", Code.RESYNC: "resync"}


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
    capabilities: int = 0          # v3: CAP_TEMPORAL asks for TBATCH frames
    residual_tag: bytes = b""      # v3 with CAP_TEMPORAL: 8 bytes naming the residual tables of the camera's bundle
    TYPE = 0x01

    def encode(self) -> bytes:
        cam = self.camera_id.encode()
        if len(self.model_tag) != 8 or not 0 < len(cam) < 256 or len(self.token) > 255:
            raise ValueError("model tag is 8 bytes, camera id 1..255 bytes, token at most 255 bytes")
        out = bytearray([self.TYPE, self.version]) + self.model_tag + bytes([len(cam)]) + cam
        out += bytes([len(self.token)]) + self.token
        if self.version >= 3:
            if not 0 <= self.capabilities <= MAX_CAPABILITIES:
                raise ValueError(f"capabilities are 0..{MAX_CAPABILITIES}")
            put_varint(out, self.capabilities)
            if self.capabilities & CAP_TEMPORAL:
                if len(self.residual_tag) != 8:
                    raise ValueError("a temporal HELLO carries an 8-byte residual tag")
                out += self.residual_tag
        elif self.capabilities or self.residual_tag:
            raise ValueError("a version-2 HELLO carries no capabilities")
        return bytes(out)

    @property
    def temporal(self) -> bool:
        return bool(self.capabilities & CAP_TEMPORAL)


@dataclass(frozen=True)
class Frame:
    seq: int
    ts_ms: int
    payload: bytes
    kind: int = KEY    # TBATCH only: KEY, COND or SAME (SAME has an empty payload)


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
            if self.TYPE == TemporalBatch.TYPE:
                if f.kind not in (KEY, COND, SAME) or (f.kind == SAME and f.payload):
                    raise ValueError(f"frame kind {f.kind}: KEY, COND or SAME (SAME has no payload)")
                put_varint(out, len(f.payload) << 2 | f.kind)
            else:
                if f.kind != KEY:
                    raise ValueError("a plain BATCH carries key frames only (use TemporalBatch)")
                put_varint(out, len(f.payload))
            out += f.payload
        return bytes(out)


@dataclass(frozen=True)
class TemporalBatch(Batch):
    """TBATCH (v3): a BATCH whose frames carry their kind (KEY / COND / SAME), decoded in order against the
    connection's reference (taskcodec.coding.temporal). Only in a session whose WELCOME granted CAP_TEMPORAL."""
    TYPE = 0x07


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
    capabilities: int = 0   # v3: what the server grants of the HELLO's capabilities
    TYPE = 0x06

    def encode(self) -> bytes:
        out = bytearray([self.TYPE, self.version])
        if self.version >= 3:
            put_varint(out, self.capabilities)
        elif self.capabilities:
            raise ValueError("a version-2 WELCOME carries no capabilities")
        return bytes(out)

    @property
    def temporal(self) -> bool:
        return bool(self.capabilities & CAP_TEMPORAL)


Message = Hello | Batch | TemporalBatch | Ack | Reject | Error | Welcome
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
            raise WireError(f"wire version {version} is not supported: this side speaks version {VERSION} (and "
                            f"accepts version 2) "
                            f"(update the camera's taskcodec runtime or firmware library)")
        tag = r.take(8)
        cam_raw = r.take(r.u8())
        try:
            cam = cam_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("camera id is not utf-8") from exc
        if not cam:
            raise WireError("empty camera id")
        token = r.take(r.u8())
        caps, rtag = 0, b""
        if version >= 3:
            caps = r.varint(MAX_CAPABILITIES)
            if caps & CAP_TEMPORAL:
                rtag = r.take(8)
        return Hello(tag, cam, token, version, caps, rtag)
    if kind in (Batch.TYPE, TemporalBatch.TYPE):
        temporal = kind == TemporalBatch.TYPE
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
            if temporal:
                tagged = r.varint(MAX_FRAME_BYTES << 2 | 3)
                fkind = tagged & 3
                if fkind not in (KEY, COND, SAME) or (fkind == SAME and tagged >> 2):
                    raise WireError(f"frame kind {fkind} with {tagged >> 2} payload bytes (KEY 0, COND 1, SAME 2 "
                                    "with no payload)")
                frames.append(Frame(first + i, ts, r.take(tagged >> 2), fkind))
            else:
                frames.append(Frame(first + i, ts, r.take(r.varint(MAX_FRAME_BYTES))))
        return TemporalBatch(epoch, frames) if temporal else Batch(epoch, frames)
    if kind == Ack.TYPE:
        return Ack(r.varint(MAX_EPOCH), r.varint(MAX_SEQ), r.varint(MAX_FRAMES_PER_BATCH))
    if kind == Reject.TYPE:
        return Reject(r.varint(MAX_EPOCH), r.varint(MAX_SEQ), r.varint(MAX_FRAMES_PER_BATCH), r.u8(), _text(r))
    if kind == Error.TYPE:
        return Error(r.u8(), _text(r))
    if kind == Welcome.TYPE:
        version = r.u8()
        return Welcome(version, r.varint(MAX_CAPABILITIES) if version >= 3 else 0)
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
    if not isinstance(batch, Batch):  # a TemporalBatch is a Batch
        raise WireError(f"an ingest body is HELLO || BATCH, got HELLO || {type(batch).__name__}")
    return hello, batch
