"""The runtime's wall clock (capture times), with a fake for fault tests.

``TASKCODEC_FAKE_CLOCK`` (tests and ``taskcodec bench faults`` only; a deployed camera never sets it) replaces the
system clock: ``START_MS[,AFTER:STEP_MS]...`` — the clock reads START_MS at the first reading (0 is 1970-01-01, a
camera without a real-time clock), advances with the monotonic clock, and jumps by STEP_MS (negative: backwards)
after its AFTER-th reading. The capture loop reads it once per frame, so ``0,20:31536000000`` is "booted in 1970,
NTP set the clock one year later after frame 20". Frame identity never depends on this clock (see spool.py).
"""

from __future__ import annotations

import os
import threading
import time

ENV = "TASKCODEC_FAKE_CLOCK"


class FakeClock:
    def __init__(self, spec: str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"{ENV} is empty")
        try:
            self.start = int(parts[0])
            self.steps = sorted((int(a), int(b)) for a, b in (p.split(":") for p in parts[1:]))
        except ValueError:
            raise ValueError(f"{ENV} must be START_MS[,AFTER:STEP_MS]..., got {spec!r}") from None
        self.readings = 0
        self._t0: float | None = None
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            if self._t0 is None:
                self._t0 = time.monotonic()
            offset = sum(step for after, step in self.steps if self.readings >= after)
            self.readings += 1
            return self.start + int((time.monotonic() - self._t0) * 1000) + offset


_fake = FakeClock(os.environ[ENV]) if os.environ.get(ENV) else None


def now_ms() -> int:
    """Milliseconds since the Unix epoch (what the camera believes)."""
    return _fake.now_ms() if _fake is not None else int(time.time() * 1000)
