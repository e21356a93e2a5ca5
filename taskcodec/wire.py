"""The uplink wire format (version 4), shared by runtime/, server/ and firmware_bridge/; see docs/wire-format.md.

Every message starts with a one-byte type. Integers are unsigned LEB128 varints unless noted (``svarint``: a signed
integer zig-zag mapped to an unsigned varint: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), which keeps per-frame framing to
about 3 bytes (hand-written: a dozen lines, and protobuf would cost more bytes and a schema compiler).

    HELLO  0x01  version:u8  model_tag:8 bytes  camera_id:(u8 len, utf-8)  token:(u8 len, bytes)
                 [v3: capabilities:varint  and, if bit 0 (temporal), residual_tag:8 bytes]
    BATCH  0x02  epoch  first_seq  count  base_ts_ms:svarint  then per frame: ts_delta_ms:svarint  length  payload
    TBATCH 0x07  (v3) as BATCH, but per frame: ts_delta_ms:svarint  (length << 2 | kind)  payload
                 kind 0 KEY, 1 COND, 2 SAME (length 0), 3 refused; only in a session whose WELCOME granted temporal
    CBATCH 0x08  (v4) compact TBATCH: flags:u8  [epoch] [first_seq] [base_ts_ms:svarint] [interval_ms]  count
                 then items (head varint, low 2 bits): KEY/COND (length << 2 | kind, payload), SAME run
                 ((run - 1) << 2 | 2), TIME (a deviation from the nominal interval, for the next frame or with the
                 SAME frame it is, or an absolute time); absent header fields continue the connection's previous
                 CBATCH (``Link``)
    ACK    0x03  epoch  first_seq  count                       (frames durably stored, duplicates included)
    REJECT 0x04  epoch  first_seq  count  code:u8  reason      (frames that will never be accepted)
    ERROR  0x05  code:u8  reason                               (the connection is refused; the server closes it)
    WELCOME 0x06 version:u8  [v3: granted capabilities:varint] (HELLO accepted)

Frames in a BATCH have consecutive sequence numbers ``first_seq + i`` within one ``epoch``: a random 63-bit id the
camera draws once when its spool is created (never derived from its clock). A frame's capture time is
``base_ts_ms`` plus the running sum of the signed deltas, so any clock step (forwards or backwards, by years) inside
a batch encodes the true per-frame times. ``reason`` is a varint length plus utf-8.

Version 2 changed from version 1: epoch limit 2^63-1 (was 2^32), signed zig-zag base time and deltas
(were unsigned, deltas capped at 2^32 and clamped at 0 for a clock going backwards), first_seq limit 2^63-1, reply
code 6 CONFLICT. A HELLO of version 1 is refused (``decode`` raises WireError naming both versions).

Version 3 adds temporal coding as a per-connection capability: HELLO v3 ends with a capabilities varint
(bit 0 CAP_TEMPORAL, followed by the 8-byte residual tag of the camera's residual tables); WELCOME v3 ends with the
capabilities the server grants; TBATCH (0x07) carries each frame's kind in the low 2 bits of its length; ERROR code 7
RESYNC ("I lost this connection's reference: reconnect, starting with a key frame"). Version 2 HELLOs are still
accepted (answered with a version-2 WELCOME; such a session is plain BATCHes only).

Version 4 (this one) adds CBATCH (0x08), the compact form of TBATCH for temporally coded frames: header fields that
continue the connection's previous CBATCH are left out (epoch, first_seq = previous last + 1, times from the previous
frame plus a nominal interval), a frame's capture time is implied unless a TIME item gives its deviation, and a run
of SAME frames is one item. Decoding a CBATCH that leaves fields out needs the connection's context
(``Connection.decode``; ``decode`` alone refuses it by name). HELLO and WELCOME keep their v3 layout; v3 HELLOs (and
their TBATCHes) and v2 HELLOs are still accepted, each answered with a WELCOME of its own version.

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

VERSION = 4
SUPPORTED_VERSIONS = (2, 3, 4)
CAP_TEMPORAL = 1                # HELLO/WELCOME capability bit: TBATCH frames (KEY / COND / SAME) on this connection
MAX_CAPABILITIES = (1 << 32) - 1
KEY, COND, SAME = 0, 1, 2       # TBATCH frame kinds (taskcodec.coding.temporal uses the same numbers)
MAX_FRAMES_PER_BATCH = 4096
MAX_FRAME_BYTES = 65536
MAX_EPOCH = (1 << 63) - 1       # epochs and sequence numbers fit a signed 64-bit database column
MAX_SEQ = (1 << 63) - 1
MAX_ABS_TS_MS = (1 << 62) - 1   # |capture time| in ms; any two such times differ by less than 2^63
MAX_REASON_BYTES = 1024
MAX_INTERVAL_MS = (1 << 32) - 1  # CBATCH nominal frame interval
MAX_DEVIATION_MS = 1 << 59      # CBATCH TIME item: larger deviations (clock steps) are sent as absolute times
MAX_RUN_ITEM = 32               # CBATCH: frames per SAME-run item (its head stays one byte)
CB_EPOCH, CB_SEQ, CB_TIME, CB_INTERVAL = 1, 2, 4, 8   # CBATCH header flags: the field follows
TIME_ITEM = 3                   # CBATCH item kind 3
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


def check_identity(camera_id: str, token: "bytes | str") -> bytes:
    """A camera's id and token as a HELLO can carry them (id 1..255 bytes of UTF-8, token at most 255 bytes); the
    token as bytes. Uplinks call it when configured, so a bad id or token is refused before anything is captured."""
    token = token.encode() if isinstance(token, str) else token
    if not 0 < len(camera_id.encode()) < 256:
        raise ValueError("camera id must be 1..255 bytes of utf-8")
    if len(token) > 255:
        raise ValueError("token must be at most 255 bytes")
    return token


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
class Link:
    """What a CBATCH leaves for the next CBATCH on its connection: its epoch, last sequence number, last capture time
    and nominal frame interval."""
    epoch: int
    last_seq: int
    last_ts: int
    interval_ms: int


_NO_LINK = Link(0, -1, 0, 0)  # stands in for the connection's link while a dependent CBATCH is parsed without it


@dataclass(frozen=True)
class CompactBatch(TemporalBatch):
    """CBATCH (v4): the frames of a TBATCH (kinds KEY / COND / SAME), coded compactly. ``interval_ms`` is the
    nominal frame interval: a frame captured ``interval_ms`` after the previous one carries no time at all; other
    frames carry their deviation (a TIME item). Consecutive SAME frames at the nominal interval are one SAME-run item.
    ``after`` is the connection's previous CBATCH (``Link``): header fields that continue it are left out (the
    epoch, first_seq = its last seq + 1, the interval, and the base time: frame 0 is expected ``interval_ms`` after
    its last frame). ``after=None`` makes a self-contained CBATCH (every field present; the first on a connection,
    and the only form over HTTP).

    ``decode`` (no connection) parses a CBATCH that leaves fields out as far as it can without them (so malformed
    bytes are refused at once) and returns it *pending*: ``pending`` holds its bytes, its epoch, sequence numbers
    and times are placeholders until ``Connection.resolve`` completes it in place with the connection's link (the
    server does that in arrival order, where it also decodes the frames against the connection's reference:
    taskcodec/server/temporal.py)."""
    interval_ms: int = 0
    after: Link | None = None
    pending: bytes = field(default=b"", compare=False, repr=False)
    TYPE = 0x08

    def link(self) -> Link:
        return Link(self.epoch, self.frames[-1].seq, self.frames[-1].ts_ms, self.interval_ms)

    def encode(self) -> bytes:
        frames, a = self.frames, self.after
        if not frames or len(frames) > MAX_FRAMES_PER_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_FRAMES_PER_BATCH} frames")
        first = frames[0]
        if not 0 <= self.epoch <= MAX_EPOCH or not 0 <= first.seq or first.seq + len(frames) - 1 > MAX_SEQ:
            raise ValueError(f"epoch and sequence numbers are 0..{MAX_EPOCH}")
        if not 0 <= self.interval_ms <= MAX_INTERVAL_MS:
            raise ValueError(f"the nominal interval is 0..{MAX_INTERVAL_MS} ms")
        flags = 0
        if a is None or a.epoch != self.epoch:
            flags |= CB_EPOCH
        if a is None or a.last_seq + 1 != first.seq:
            flags |= CB_SEQ
        if a is None:
            flags |= CB_TIME
        if a is None or a.interval_ms != self.interval_ms:
            flags |= CB_INTERVAL
        out = bytearray([self.TYPE, flags])
        if flags & CB_EPOCH:
            put_varint(out, self.epoch)
        if flags & CB_SEQ:
            put_varint(out, first.seq)
        if flags & CB_TIME:
            if not -MAX_ABS_TS_MS <= first.ts_ms <= MAX_ABS_TS_MS:
                raise ValueError(f"capture time {first.ts_ms} ms is outside ±{MAX_ABS_TS_MS}")
            put_svarint(out, first.ts_ms)
        if flags & CB_INTERVAL:
            put_varint(out, self.interval_ms)
        put_varint(out, len(frames))
        run_at, run = -1, 0          # the open SAME-run item (its head byte) and its length
        prev = None
        for i, f in enumerate(frames):
            if f.seq != first.seq + i:
                raise ValueError("frames in a batch need consecutive sequence numbers")
            if not -MAX_ABS_TS_MS <= f.ts_ms <= MAX_ABS_TS_MS:
                raise ValueError(f"capture time {f.ts_ms} ms is outside ±{MAX_ABS_TS_MS}")
            if f.kind not in (KEY, COND, SAME) or (f.kind == SAME and f.payload):
                raise ValueError(f"frame kind {f.kind}: KEY, COND or SAME (SAME has no payload)")
            if len(f.payload) > MAX_FRAME_BYTES:
                raise ValueError(f"a payload is at most {MAX_FRAME_BYTES} bytes")
            if i == 0:
                expected = f.ts_ms if a is None else a.last_ts + self.interval_ms
            else:
                expected = prev + self.interval_ms
            prev = f.ts_ms
            dev = f.ts_ms - expected
            if dev:
                run_at = -1
                if abs(dev) <= MAX_DEVIATION_MS:
                    same = f.kind == SAME  # a SAME frame off the interval is one item: its deviation
                    put_varint(out, ((zigzag(dev) << 1 | same) + 1) << 2 | TIME_ITEM)
                    if same:
                        continue
                else:  # a clock step: the absolute time
                    put_varint(out, TIME_ITEM)
                    put_svarint(out, f.ts_ms)
            if f.kind == SAME:
                if run_at >= 0 and run < MAX_RUN_ITEM:
                    run += 1
                    out[run_at] = (run - 1) << 2 | SAME
                else:
                    run_at, run = len(out), 1
                    out.append(SAME)
            else:
                run_at = -1
                put_varint(out, len(f.payload) << 2 | f.kind)
                out += f.payload
        return bytes(out)


class Connection:
    """One connection's CBATCH context, kept alike by both ends: the ``Link`` of the last CBATCH on it (None: none
    yet, or forgotten). The camera makes its batches with ``batch`` (in the order it sends them); the server decodes
    every message of the connection with ``decode`` (in the order it receives them). ``version`` is the connection's
    HELLO version: a CBATCH on a version-2/3 connection is refused."""

    def __init__(self, version: int = VERSION):
        self.version = version
        self.link: Link | None = None

    def reset(self) -> None:
        """The next CBATCH is self-contained (nothing sent since, or a batch that was made was not sent)."""
        self.link = None

    def batch(self, epoch: int, frames: list[Frame], interval_ms: int) -> CompactBatch:
        b = CompactBatch(epoch, frames, interval_ms, self.link)
        self.link = b.link()
        return b

    def decode(self, data: bytes) -> Message:
        r = Reader(data)
        msg = _read_message(r, self)
        r.end()
        if isinstance(msg, CompactBatch):
            self.link = msg.link()
        return msg

    def resolve(self, batch: CompactBatch) -> CompactBatch:
        """The next CBATCH received on this connection (decoded by ``decode`` without it): a pending one is completed
        in place from the connection's link (WireError if it cannot be: no previous CBATCH, or its values leave
        the limits); the link moves on to it."""
        if batch.pending:
            r = Reader(batch.pending)
            full = _read_message(r, self)
            r.end()
            for name in ("epoch", "frames", "interval_ms", "after"):
                object.__setattr__(batch, name, getattr(full, name))  # noqa: PLC2801 (completed once, in place)
            object.__setattr__(batch, "pending", b"")
        elif self.version < 4:
            raise WireError(f"CBATCH (0x08) on a version-{self.version} connection (version 4 HELLO first)")
        self.link = batch.link()
        return batch


def _read_compact(r: Reader, conn: Connection | None, start: int) -> CompactBatch:
    a = conn.link if conn is not None else None
    if conn is not None and conn.version < 4:
        raise WireError(f"CBATCH (0x08) on a version-{conn.version} connection (version 4 HELLO first)")
    flags = r.u8()
    if flags & ~(CB_EPOCH | CB_SEQ | CB_TIME | CB_INTERVAL):
        raise WireError(f"CBATCH flags 0x{flags:02x}: unknown bits")
    missing = [name for bit, name in ((CB_EPOCH, "epoch"), (CB_SEQ, "first_seq"), (CB_TIME, "base time"),
                                      (CB_INTERVAL, "interval")) if not flags & bit]
    pending = bool(missing) and conn is None
    if pending:
        a = _NO_LINK
    elif missing and a is None:
        raise WireError(f"CBATCH leaves out {', '.join(missing)} but there is no previous CBATCH on this connection "
                        "(a connection's first CBATCH carries every field)")
    epoch = r.varint(MAX_EPOCH) if flags & CB_EPOCH else a.epoch
    first = r.varint(MAX_SEQ) if flags & CB_SEQ else a.last_seq + 1
    base = r.svarint(MAX_ABS_TS_MS) if flags & CB_TIME else None
    interval = r.varint(MAX_INTERVAL_MS) if flags & CB_INTERVAL else a.interval_ms
    count = r.varint(MAX_FRAMES_PER_BATCH)
    if count == 0:
        raise WireError("empty batch")
    if first + count - 1 > MAX_SEQ:
        raise WireError(f"sequence numbers beyond {MAX_SEQ}")
    frames: list[Frame] = []
    prev = None
    time_set: int | None = None   # a TIME item's time for the next frame
    while len(frames) < count:
        head = r.varint(_U64)
        kind, value = head & 3, head >> 2
        if kind == TIME_ITEM:
            if time_set is not None:
                raise WireError("two TIME items in a row")
            if value == 0:
                time_set = r.svarint(MAX_ABS_TS_MS)
                continue
            dev = unzigzag((value - 1) >> 1)
            if abs(dev) > MAX_DEVIATION_MS:
                raise WireError(f"time deviation {dev} ms outside ±{MAX_DEVIATION_MS}")
            ts = _expected(prev, base, a, interval) + dev
            if abs(ts) > MAX_ABS_TS_MS:
                raise WireError(f"capture time {ts} ms outside ±{MAX_ABS_TS_MS}")
            if not (value - 1) & 1:
                time_set = ts  # for the next frame item
                continue
            frames.append(Frame(first + len(frames), ts, b"", SAME))  # a SAME frame off the interval
            prev = ts
            continue
        if kind == SAME:
            n, payload = value + 1, b""
            if n > count - len(frames):
                raise WireError(f"a SAME run of {n} frames passes the batch's count {count}")
        else:
            if value > MAX_FRAME_BYTES:
                raise WireError(f"value {value} exceeds {MAX_FRAME_BYTES}")
            n, payload = 1, r.take(value)
        for _ in range(n):
            ts = time_set if time_set is not None else _expected(prev, base, a, interval)
            if abs(ts) > MAX_ABS_TS_MS:
                raise WireError(f"capture time {ts} ms outside ±{MAX_ABS_TS_MS}")
            time_set = None
            frames.append(Frame(first + len(frames), ts, payload, kind))
            prev = ts
    if pending:
        return CompactBatch(-1, frames, interval, None, bytes(r.data[start:r.pos]))
    return CompactBatch(epoch, frames, interval, a)


def _expected(prev: int | None, base: int | None, a: Link | None, interval: int) -> int:
    """The capture time a CBATCH frame has without a TIME item."""
    if prev is not None:
        return prev + interval
    return base if base is not None else a.last_ts + interval


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


Message = Hello | Batch | TemporalBatch | CompactBatch | Ack | Reject | Error | Welcome
REPLY_TYPES = (Ack, Reject, Error, Welcome)


def _put_text(out: bytearray, text: str) -> None:
    raw = text.encode()[:MAX_REASON_BYTES]
    put_varint(out, len(raw))
    out += raw


def _text(r: Reader) -> str:
    return r.take(r.varint(MAX_REASON_BYTES)).decode("utf-8", errors="replace")


def _read_message(r: Reader, conn: Connection | None = None) -> Message:
    """Parse one message at the reader's position (the reader ends just after it); ``conn``: the connection's CBATCH
    context (None: a CBATCH must be self-contained)."""
    start = r.pos
    kind = r.u8()
    if kind == CompactBatch.TYPE:
        return _read_compact(r, conn, start)
    if kind == Hello.TYPE:
        version = r.u8()
        if version not in SUPPORTED_VERSIONS:
            raise WireError(f"wire version {version} is not supported: this side speaks version {VERSION} (and "
                            f"accepts version 2 and version 3) "
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


def expect(data: bytes | None, kind: type) -> Message:
    """The message in ``data`` if it is a ``kind`` (``None`` stands for a text WebSocket message); raises WireError
    with the reason a peer is told otherwise ("malformed HELLO: ...", "expected a binary BATCH, got ACK")."""
    name = kind.__name__.upper()
    try:
        message = decode(data) if data is not None else None
    except WireError as exc:
        raise WireError(f"malformed {name}: {exc}") from None
    if not isinstance(message, kind):
        what = type(message).__name__.upper() if message is not None else "a text message"
        raise WireError(f"expected a binary {name}, got {what}")
    return message


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
