"""Wire format: round trips, and every malformed input raises WireError (never anything else)."""

import numpy as np
import pytest

from taskcodec import wire


def test_messages_round_trip():
    msgs = [
        wire.Hello(b"\x01" * 8, "cam-7", b"secret"),
        wire.Batch(5, [wire.Frame(100 + i, 1_700_000_000_000 + 200 * i, bytes([i]) * (i + 6)) for i in range(50)]),
        wire.Ack(5, 100, 50),
        wire.Reject(5, 100, 1, wire.Code.BAD_PAYLOAD, "stream check failed"),
        wire.Error(wire.Code.UNKNOWN_MODEL, "expected model 00ff"),
        wire.Welcome(),
    ]
    for m in msgs:
        assert wire.decode(m.encode()) == m


def test_batch_framing_overhead_is_small():
    frames = [wire.Frame(i, 1000 + 200 * i, b"x" * 6) for i in range(50)]
    encoded = wire.Batch(1, frames).encode()
    assert (len(encoded) - 50 * 6) / 50 <= 4


def test_malformed_messages_raise_wire_error_only():
    rng = np.random.default_rng(0)
    good = wire.Batch(5, [wire.Frame(i, 1000 + i, b"abcdef") for i in range(4)]).encode()
    for _ in range(5000):
        data = bytearray(good if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 60))))
        for _ in range(int(rng.integers(1, 4))):
            if data and rng.random() < 0.7:
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            elif data:
                del data[int(rng.integers(0, len(data))):]
        try:
            wire.decode(bytes(data))
        except wire.WireError:
            pass
    with pytest.raises(wire.WireError, match="trailing"):
        wire.decode(good + b"\0")
    with pytest.raises(wire.WireError, match="unknown"):
        wire.decode(b"\x7f")


YEAR_MS = 365 * 86_400_000


def test_clock_steps_of_years_inside_a_batch_keep_every_frame_time():
    times = [5_000, 5_000 + YEAR_MS, 5_000 + YEAR_MS - 1, 5_000, -YEAR_MS, 1_700_000_000_000, 1_700_000_000_000 - YEAR_MS,
             wire.MAX_ABS_TS_MS, -wire.MAX_ABS_TS_MS]
    batch = wire.Batch(2**63 - 1, [wire.Frame(2**63 - len(times) + i, t, b"x") for i, t in enumerate(times)])
    assert [f.ts_ms for f in wire.decode(batch.encode()).frames] == times


def test_limits_are_refused_by_encoder_and_decoder():
    with pytest.raises(ValueError):
        wire.Batch(2**63, [wire.Frame(0, 0, b"")]).encode()
    with pytest.raises(ValueError):
        wire.Batch(1, [wire.Frame(2**63 - 1, 0, b""), wire.Frame(2**63, 0, b"")]).encode()
    with pytest.raises(ValueError):
        wire.Batch(1, [wire.Frame(0, wire.MAX_ABS_TS_MS + 1, b"")]).encode()
    # hand-built: a capture time that leaves the range through a delta, and a sequence range beyond 2^63-1
    out = bytearray([wire.Batch.TYPE])
    for v in (1, 0, 2):
        wire.put_varint(out, v)
    wire.put_svarint(out, wire.MAX_ABS_TS_MS)
    out += b"\x00\x00"
    wire.put_svarint(out, 1)
    out += b"\x00"
    with pytest.raises(wire.WireError, match="capture time"):
        wire.decode(bytes(out))
    out = bytearray([wire.Batch.TYPE])
    for v in (1, 2**63 - 1, 2, 0):
        wire.put_varint(out, v)
    with pytest.raises(wire.WireError, match="sequence"):
        wire.decode(bytes(out) + b"\x00\x00\x00\x00")
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(wire.Ack(1, 0, 1).encode()[:1] + b"\x80" * 9 + b"\x01\x00\x01")  # epoch 2^63


def test_version_1_hello_is_refused_with_a_clear_reason():
    v1 = bytearray(wire.Hello(b"\x01" * 8, "cam-7", b"secret").encode())
    v1[1] = 1
    with pytest.raises(wire.WireError, match="wire version 1 is not supported.*version 2"):
        wire.decode(bytes(v1))
    assert wire.decode(wire.Welcome(2).encode()) == wire.Welcome(2)


def test_ingest_body_and_reply_framing():
    hello = wire.Hello(b"\x02" * 8, "cam-é", b"t" * 43)
    batch = wire.Batch(12345678901234, [wire.Frame(0, -5, b"ab"), wire.Frame(1, YEAR_MS, b"")])
    body = wire.encode_ingest_body(hello, batch)
    assert wire.decode_ingest_body(body) == (hello, batch)
    h, rest = wire.split_ingest_body(body)
    assert h == hello and wire.decode(rest) == batch
    for bad in (b"", b"\x02", body[:5], wire.Ack(1, 2, 3).encode() + batch.encode()):
        with pytest.raises(wire.WireError):
            wire.split_ingest_body(bad)
    with pytest.raises(wire.WireError, match="HELLO \\|\\| Ack"):
        wire.decode_ingest_body(hello.encode() + wire.Ack(1, 2, 3).encode())
    replies = [wire.Ack(2**63 - 1, 5, 3), wire.Reject(7, 8, 1, wire.Code.CONFLICT, "other payload"),
               wire.Error(wire.Code.BUSY, "disk full")]
    assert wire.decode_replies(wire.encode_replies(replies)) == replies
    assert wire.decode_replies(b"") == []
    with pytest.raises(wire.WireError):
        wire.decode_replies(wire.encode_replies(replies)[:-1])
    with pytest.raises(wire.WireError, match="unexpected"):
        wire.decode_replies(wire.Welcome().encode())
    assert len(wire.Hello(b"\x00" * 8, "c" * 255, b"t" * 255, capabilities=wire.MAX_CAPABILITIES,
                          residual_tag=b"r" * 8).encode()) == wire.MAX_HELLO_BYTES


def test_concatenated_garbage_raises_wire_error_only():
    rng = np.random.default_rng(1)
    good = wire.encode_ingest_body(wire.Hello(b"\x01" * 8, "c", b""), wire.Batch(9, [wire.Frame(0, -1, b"abc")]))
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        for fn in (wire.decode_all, wire.decode_replies, wire.split_ingest_body, wire.decode_ingest_body):
            try:
                fn(bytes(data))
            except wire.WireError:
                pass


def test_expect_returns_the_kind_or_says_what_was_wrong():
    batch = wire.Batch(9, [wire.Frame(0, 5, b"abc")])
    assert wire.expect(batch.encode(), wire.Batch) == batch
    with pytest.raises(wire.WireError, match=r"^expected a binary HELLO, got BATCH$"):
        wire.expect(batch.encode(), wire.Hello)
    with pytest.raises(wire.WireError, match=r"^expected a binary BATCH, got a text message$"):
        wire.expect(None, wire.Batch)
    with pytest.raises(wire.WireError, match=r"^malformed BATCH: "):
        wire.expect(batch.encode()[:-1], wire.Batch)


def test_uplinks_refuse_an_identity_no_hello_can_carry():
    from taskcodec.runtime.mqtt_uplink import MqttUplinkConfig
    from taskcodec.runtime.uplink import UplinkConfig

    assert wire.check_identity("cam-1", "secret") == b"secret"
    assert wire.check_identity("é" * 127, b"t" * 255) == b"t" * 255      # 254 bytes of UTF-8, 255-byte token
    for camera_id, token in (("", b"t"), ("é" * 128, b"t"), ("cam", b"t" * 256)):
        with pytest.raises(ValueError, match="camera id|token"):
            wire.check_identity(camera_id, token)
        with pytest.raises(ValueError, match="camera id|token"):
            UplinkConfig("ws://127.0.0.1:8000", camera_id, token)
        with pytest.raises(ValueError, match="camera id|token"):
            MqttUplinkConfig("mqtt://127.0.0.1:1883", camera_id, token)
    assert UplinkConfig("ws://127.0.0.1:8000", "cam", "tok").token == b"tok"
