"""The minimal receiver of the JPEG and H.264 upload baselines: a WebSocket server that takes one binary message per
frame (or per H.264 access unit) and answers each with a 1-byte ack, counting messages and bytes.

It does only what any upload endpoint must (accept, count, ack), so the baselines are charged the bytes of their
encoding plus the same WebSocket/TCP/IP transport the taskcodec uplink uses, and nothing else. Run it as
``python -m bench.fleet_receiver --host H --port-file F``; GET-free: its counters come back as a text message
``stats`` -> JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

ACK = b"\x03"


async def _main(host: str, port: int, port_file: Path | None) -> None:
    from websockets.asyncio.server import serve

    counts = {"messages": 0, "bytes": 0, "connections": 0}

    async def handler(ws) -> None:
        counts["connections"] += 1
        async for message in ws:
            if isinstance(message, str):
                if message == "stats":
                    await ws.send(json.dumps(counts))
                continue
            counts["messages"] += 1
            counts["bytes"] += len(message)
            await ws.send(ACK)

    async with serve(handler, host, port, compression=None, max_size=16 << 20, ping_interval=None,
                     backlog=2048) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        await asyncio.Future()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path)
    a = p.parse_args()
    try:
        asyncio.run(_main(a.host, a.port, a.port_file))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
