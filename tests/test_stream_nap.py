"""The event loop's nap (server/stream.py LoopNap, in the stream front end and the cluster gateway): while cameras'
messages arrive at NAP_MIN_RATE per second or more, the loop sleeps NAP_S once per iteration that read messages (so
that one epoll_wait then reads many sockets); below that rate it never sleeps (a lone camera's message is not
delayed). And the micro-batch cycle (server/ingest.py, loop callbacks instead of a task) answers messages that arrive
while a micro-batch is in the ingest thread with the next one."""

import asyncio
import time

from taskcodec import wire
from taskcodec.bundle import load_bundle
from taskcodec.server import stream
from taskcodec.server.ingest import IngestService
from taskcodec.server.storage import SQLiteStorage


async def _messages(nap: stream.LoopNap, rate: float, seconds: float) -> tuple[int, int]:
    """Messages at ``rate`` per second, one per loop iteration (as on_ws_frame counts them); (messages, naps)."""
    naps = 0
    real_sleep = stream.time.sleep

    def counting_sleep(s: float) -> None:
        nonlocal naps
        naps += 1
        real_sleep(s)

    stream.time.sleep = counting_sleep
    try:
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            nap.count += 1
            if not nap.armed:
                nap.arm()
            n += 1
            await asyncio.sleep(1.0 / rate)
    finally:
        stream.time.sleep = real_sleep
    return n, naps


def test_the_loop_naps_under_load_only():
    async def main():
        slow = await _messages(stream.LoopNap(), 50.0, 0.6)    # 50 messages/s: below NAP_MIN_RATE
        fast = await _messages(stream.LoopNap(), 5000.0, 0.6)  # 5000/s (as many as one iteration per message allows)
        return slow, fast

    (slow_n, slow_naps), (fast_n, fast_naps) = asyncio.run(main())
    assert slow_n >= 20 and slow_naps == 0
    assert fast_naps >= 10  # it naps once it has seen the rate (from its second 0.1 s window on)
    assert fast_naps <= fast_n  # at most once per loop iteration that read a message


def test_messages_arriving_during_a_micro_batch_are_answered_by_the_next(tmp_path):
    from taskcodec.bench.server_cpu import _frames

    async def main():
        service = IngestService(load_bundle(None), SQLiteStorage(tmp_path / "s.db"), linger_s=0.02, linger_frames=64)
        payload = _frames(service.bundle, 1)[0]
        try:
            first = [service.submit(f"cam-{i}", wire.Batch(1, [wire.Frame(0, 1000, payload)])) for i in range(3)]
            tasks = [asyncio.ensure_future(f) for f in first]
            await asyncio.sleep(0)  # the first micro-batch is lingering or in the ingest thread
            later = [asyncio.ensure_future(service.submit(f"cam-{i}", wire.Batch(1, [wire.Frame(1, 2000, payload)])))
                     for i in range(3)]
            replies = await asyncio.wait_for(asyncio.gather(*tasks, *later), 30)
        finally:
            await service.aclose()
        return replies, service.metrics.frames_stored.value

    replies, stored = asyncio.run(main())
    assert [type(r[0]) for r in replies] == [wire.Ack] * 6, replies
    assert [r[0].first_seq for r in replies] == [0, 0, 0, 1, 1, 1]
    assert stored == 6
