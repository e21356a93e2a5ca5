"""A virtual camera that behaves like a real one watching a scene: objects (Fashion-MNIST items) enter, dwell a few
seconds while moving a little, and leave; between them the frame is empty. Sensor noise and a slow lighting drift
touch every frame. Consecutive frames are therefore highly redundant, which is what temporal coding exploits.

    virtual://dwell?size=112x112&rate=5&dwell=1-5&gap=0-2&noise=3&drift=0.1&seed=0&count=600

``rate`` is the scene's frame rate (frames per second of scene time), ``dwell`` and ``gap`` the ranges (seconds) of
an object's stay and of the empty time between objects, ``noise`` the sensor noise std (grey levels), ``drift`` the
relative amplitude of the lighting drift (period 20 s). An object is labelled while it dwells; entering, leaving and
empty frames carry no label (None).

Capture times: ``clock=wall`` (default) stamps each frame with the wall clock when it is delivered, like any source;
``clock=scene`` stamps frame k with the scene time, the first frame's wall-clock time plus k / rate (what a camera's
sensor timestamps at a fixed frame rate look like, however fast the frames are processed), and ``jitter=J`` adds a
deterministic integer error of -J..J ms to each scene time (a sensor clock read with scheduling noise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from taskcodec.runtime.source import Source, SourceError

KNOWN = {"size", "rate", "dwell", "gap", "noise", "drift", "seed", "count", "split", "channels", "data", "item",
         "clock", "jitter"}


def _range(text: str, name: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.partition("-")
        lo_f, hi_f = float(lo), float(hi or lo)
    except ValueError:
        raise SourceError(f"{name} must be a number or a range like 1-5, got {text!r}") from None
    if not 0 <= lo_f <= hi_f:
        raise SourceError(f"{name} must be a non-negative range, got {text!r}")
    return lo_f, hi_f


@dataclass(frozen=True)
class Visit:
    start: int        # first frame in which the object is (partly) in view
    frames: int       # frames from entering to having left
    image: int        # index into the item images
    label: int
    side: int         # -1: enters from the left, +1: from the right
    drift: tuple[float, float]  # slow movement while dwelling, pixels per frame (x, y)


class DwellCamera(Source):
    live = False

    def __init__(self, query: dict[str, str], **options):
        from taskcodec.data import load_fashion_mnist
        from taskcodec.runtime.source import parse_size

        unknown = set(query) - KNOWN
        if unknown:
            raise SourceError(f"virtual://dwell does not know {', '.join(sorted(unknown))} "
                              f"(options: {', '.join(sorted(KNOWN))})")
        try:
            self.canvas = parse_size(query.get("size")) or options.get("size") or (112, 112)
            self.rate = float(query.get("rate", 5))
            self.noise = float(query.get("noise", 3))
            self.drift_amp = float(query.get("drift", 0.1))
            self.seed = int(query.get("seed", 0))
            self.count = int(query.get("count", 600))
            self.channels = int(query.get("channels", 1))
            self.item = int(query.get("item", min(self.canvas)))
            self.clock = query.get("clock", "wall")
            self.jitter = int(query.get("jitter", 0))
        except ValueError as exc:
            raise SourceError(f"bad virtual://dwell option: {exc}") from None
        dwell, gap = _range(query.get("dwell", "1-5"), "dwell"), _range(query.get("gap", "0-2"), "gap")
        if self.rate <= 0 or self.count < 1 or self.channels not in (1, 3) or not 0 < self.item <= min(self.canvas):
            raise SourceError("rate and count must be positive, channels 1 or 3, item at most the canvas")
        if self.clock not in ("wall", "scene") or self.jitter < 0:
            raise SourceError(f"clock is wall or scene and jitter a number of ms >= 0, got clock={self.clock!r} "
                              f"jitter={self.jitter}")
        options["size"] = self.canvas
        super().__init__(**options)
        self.images, self.labels = load_fashion_mnist(query.get("split", "test"), query.get("data"))
        self.visits = self._timeline(dwell, gap)
        self.description = f"virtual dwell camera {self.canvas[0]}x{self.canvas[1]} at {self.rate:g} fps, seed {self.seed}"
        self.pos = 0

    def _timeline(self, dwell: tuple[float, float], gap: tuple[float, float]) -> list[Visit]:
        rng = np.random.default_rng(self.seed)
        enter = max(1, int(round(0.4 * self.rate)))  # frames to slide in (and out)
        visits, t = [], int(round(rng.uniform(*gap) * self.rate))
        while t < self.count:
            stay = max(1, int(round(rng.uniform(*dwell) * self.rate)))
            idx = int(rng.integers(len(self.images)))
            visits.append(Visit(t, stay + 2 * enter, idx, int(self.labels[idx]), int(rng.choice([-1, 1])),
                                tuple(rng.uniform(-0.4, 0.4, 2))))
            t += stay + 2 * enter + int(round(rng.uniform(*gap) * self.rate))
        self.enter = enter
        return visits

    def _visit_at(self, k: int) -> Visit | None:
        for v in self.visits:
            if v.start <= k < v.start + v.frames:
                return v
        return None

    def render(self, k: int) -> tuple[np.ndarray, int | None]:
        """Frame ``k`` (deterministic given the seed) and the label of a fully visible object, else None."""
        w, h = self.canvas
        rng = np.random.default_rng((self.seed, k))
        gain = 1.0 + self.drift_amp * np.sin(2 * np.pi * k / (20 * self.rate))
        frame = np.full((h, w), 8.0 * gain, np.float32)
        label = None
        v = self._visit_at(k)
        if v is not None:
            item = self.images[v.image]
            if self.item != 28:
                item = cv2.resize(item, (self.item, self.item), interpolation=cv2.INTER_CUBIC)
            i = k - v.start
            cx, cy = (w - self.item) / 2, (h - self.item) / 2
            travel = (w + self.item) / 2
            if i < self.enter:                        # sliding in
                x = cx + v.side * travel * (1 - (i + 1) / (self.enter + 1))
            elif i >= v.frames - self.enter:          # sliding out
                x = cx + v.side * travel * ((i - (v.frames - self.enter) + 1) / (self.enter + 1))
            else:                                     # dwelling, moving a little (at most a tenth of its size)
                x = cx + np.clip(v.drift[0] * (i - self.enter), -self.item / 10, self.item / 10)
            dwelling = self.enter <= i < v.frames - self.enter
            y = cy + (np.clip(v.drift[1] * (i - self.enter), -self.item / 10, self.item / 10) if dwelling else 0.0)
            m = np.float32([[1, 0, x], [0, 1, y]])
            layer = cv2.warpAffine(item.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR)
            frame = np.maximum(frame, layer * gain)
            if dwelling:  # the item's own dark border absorbs the small movement: it stays recognisable
                label = v.label
        if self.noise:
            frame += rng.normal(0, self.noise, frame.shape).astype(np.float32)
        frame = np.clip(frame, 0, 255).astype(np.uint8)
        if self.channels == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return frame, label

    def scene_ms(self, k: int) -> int:
        """Frame k's capture time relative to frame 0 with ``clock=scene`` (jitter included)."""
        t = int(round(1000.0 * k / self.rate))
        if self.jitter:
            t += int(np.random.default_rng((self.seed, k, 7)).integers(-self.jitter, self.jitter + 1))
        return t

    def __iter__(self):
        if self.clock == "wall":
            yield from super().__iter__()
            return
        t0 = None
        for f in super().__iter__():
            if t0 is None:
                t0 = f.ts_ms
            yield replace(f, ts_ms=t0 + self.scene_ms(f.index))  # scene time goes on across loops

    def _read(self):
        if self.pos >= self.count:
            return None
        self.pos += 1
        return self.render(self.pos - 1)

    def _rewind(self) -> bool:
        self.pos = 0
        return True
