"""Unauthenticated peers that try to push a large message into the ingest server (tests/test_server_limits.py and
`taskcodec bench server-faults`): even peers over WebSocket (a first message of ``nbytes``), odd ones as an HTTP
ingest body behind a HELLO with a wrong token (declared with Content-Length, or chunked so the server must read the
HELLO first). Half come from 127.0.0.1, half from their own loopback address (127.1.x.y), so both the per-address
and the total limits are exercised. The WebSocket peers hold their connections open until every one of them has its
upgrade answer, so they are pending at the same time however fast the server cuts each one off (without that, a fast
server could finish one before the next arrived and the per-address limit would never be reached)."""

from __future__ import annotations

import asyncio

from taskcodec import wire

UPGRADE = (b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class _Rendezvous:
    """Releases everyone once ``parties`` peers have arrived (a peer that fails early still arrives)."""

    def __init__(self, parties: int):
        self.waiting, self.all_here = parties, asyncio.Event()

    def arrive(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_here.set()

    async def arrive_and_wait(self, timeout: float) -> None:
        self.arrive()
        await asyncio.wait_for(self.all_here.wait(), timeout)


async def flood_one(port: int, i: int, nbytes: int, stats: dict, upgraded: _Rendezvous,
                    host: str = "127.0.0.1") -> None:
    source = "127.0.0.1" if i % 4 < 2 else f"127.1.{i // 250}.{i % 250 + 1}"
    sent = 0
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        stats["connect_failed"] += 1
        if i % 2 == 0:
            upgraded.arrive()
        return
    try:
        if i % 2 == 0:
            writer.write(UPGRADE)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            finally:
                await upgraded.arrive_and_wait(30)
            if not head.startswith(b"HTTP/1.1 101"):
                stats["refused_before_upgrade"] += 1
                return
            writer.write(bytes([0x82, 0x80 | 127]) + nbytes.to_bytes(8, "big") + b"mask")
        else:
            hello = wire.Hello(b"\0" * 8, f"flood-{i}", b"not-a-token").encode()
            length = (f"Content-Length: {nbytes}\r\n\r\n" if i % 4 == 1 else
                      f"Transfer-Encoding: chunked\r\n\r\n{nbytes:x}\r\n")
            writer.write(b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         + length.encode() + hello)
        chunk = bytes(256 << 10)
        while sent < nbytes:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 20)
            sent += len(chunk)
        stats["sent_everything"] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        stats["cut_off"] += 1
    finally:
        stats["bytes"] += sent
        writer.close()


async def flood(port: int, peers: int, nbytes: int) -> dict:
    """Run ``peers`` concurrent flooders; returns counts: connect_failed, refused_before_upgrade (HTTP 403 before the
    WebSocket upgrade), cut_off (the server closed on them), sent_everything (should stay 0), bytes (written)."""
    stats = dict(connect_failed=0, refused_before_upgrade=0, sent_everything=0, cut_off=0, bytes=0)
    upgraded = _Rendezvous((peers + 1) // 2)
    await asyncio.gather(*(flood_one(port, i, nbytes, stats, upgraded) for i in range(peers)))
    return stats
