"""The upload baselines of the fleet benchmark: the same camera frames sent as JPEG images or an H.264 stream, one
WebSocket message per frame, to a minimal receiver (bench.fleet_receiver) across the same counted link.

Variants: ``jpeg_roi`` JPEG-encodes what the taskcodec encoder sees (the ROI cropped and resized to the encoder's
28x28 gray input) at the JPEG quality bench/results/classical.json says reaches taskcodec's accuracy (that file
measured accuracy with a CNN retrained on decoded images); ``jpeg_frame`` the whole 640x480 camera frame at the same
quality (what a camera that knows nothing about the task uploads); ``h264`` the 640x480 frames as an x264 stream
(preset veryfast, tune zerolatency, x264's default keyint 250, one access unit per frame) at a CRF chosen by a
linear probe (below).

Accuracy of the baselines is measured by decoding the uploaded bytes, applying the runtime's preprocessing and a
linear probe (ridge classifier on raw 28x28 pixels): it is a *relative* check (does the codec lose what the probe
can see), not the CNN accuracy of classical.json.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from taskcodec.bench.fleet_client import FramePool
from taskcodec.bench.fleet_servers import Network, baseline_receiver
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.bundle import InputSpec

PROBE_INPUT = InputSpec(28, 28, 1, "gray")
DEFAULT_JPEG_QUALITY = 90
H264_CRFS = (23, 30, 36, 42, 48)


# ---------------------------------------------------------------------------------------------------- quality
def jpeg_quality(classical_json: Path, target_accuracy: float | None) -> tuple[int, str]:
    """The lowest JPEG quality in classical.json whose accuracy reaches ``target_accuracy`` (and why)."""
    if not classical_json.is_file():
        return DEFAULT_JPEG_QUALITY, f"{classical_json} not found: q={DEFAULT_JPEG_QUALITY}"
    try:
        rows = [r for r in json.loads(classical_json.read_text())["rows"]
                if r.get("codec") == "jpeg" and r.get("accuracy") is not None and r.get("quality") is not None]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return DEFAULT_JPEG_QUALITY, f"{classical_json} unreadable ({exc}): q={DEFAULT_JPEG_QUALITY}"
    if not rows:
        return DEFAULT_JPEG_QUALITY, f"no JPEG rows in {classical_json}: q={DEFAULT_JPEG_QUALITY}"
    rows.sort(key=lambda r: r["quality"])
    if target_accuracy is None:
        return DEFAULT_JPEG_QUALITY, f"no taskcodec accuracy to match: q={DEFAULT_JPEG_QUALITY}"
    for r in rows:
        if r["accuracy"] >= target_accuracy:
            return int(r["quality"]), (f"lowest quality in {classical_json.name} with CNN accuracy "
                                       f"{r['accuracy']:.4f} >= taskcodec {target_accuracy:.4f}")
    best = rows[-1]
    return int(best["quality"]), (f"no quality in {classical_json.name} reaches {target_accuracy:.4f}; using the best "
                                  f"(q={best['quality']}, accuracy {best['accuracy']:.4f}): accuracy NOT matched")


# ------------------------------------------------------------------------------------------------------ probe
class Probe:
    """Ridge classifier on raw 28x28 pixels: trains in seconds, enough to see what a codec destroys."""

    def __init__(self, n_train: int = 10000, data: str | None = None):
        from sklearn.linear_model import RidgeClassifier

        from taskcodec.data import load_fashion_mnist

        x, y = load_fashion_mnist("train", data)
        self.model = RidgeClassifier(alpha=10.0).fit(x[:n_train].reshape(n_train, -1) / 255.0, y[:n_train])
        self.pre = None

    def accuracy(self, inputs: np.ndarray, labels: np.ndarray) -> float:
        """``inputs``: [N, 28, 28(, 1)] uint8 encoder-sized images."""
        pred = self.model.predict(inputs.reshape(len(inputs), -1) / 255.0)
        return float((pred == labels).mean())


def probe_inputs(frames: list[np.ndarray], roi) -> np.ndarray:
    pre = Preprocessor(PROBE_INPUT, roi)
    return np.concatenate([pre(f) for f in frames], axis=0)


# ---------------------------------------------------------------------------------------------------- encoders
def jpeg_roi(pool: FramePool, quality: int) -> list[bytes]:
    from taskcodec.bench.classical import encode

    small = probe_inputs(pool.images, pool.roi)
    return [encode(img[:, :, 0], "jpeg", quality) for img in small]


def jpeg_frame(pool: FramePool, quality: int) -> list[bytes]:
    from PIL import Image

    out = []
    for img in pool.images:
        buf = io.BytesIO()
        Image.fromarray(img[:, :, ::-1].copy() if img.ndim == 3 else img).save(buf, "JPEG", quality=quality,
                                                                                 optimize=True)
        out.append(buf.getvalue())
    return out


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr[:, :, ::-1].copy()


def h264_stream(frames: list[np.ndarray], fps: float, crf: int) -> list[bytes]:
    """x264 (veryfast, zerolatency: no B-frames, no lookahead, as a live camera streams) -> one packet per frame."""
    import av

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        packets: list[bytes] = []
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            packets.append(b"".join(bytes(p) for p in stream.encode(frame)))
        tail = b"".join(bytes(p) for p in stream.encode(None))
    if tail:  # zerolatency emits each frame at once; anything left belongs to the last frame
        packets[-1] += tail
    return packets


def decode_h264(packets: list[bytes]) -> list[np.ndarray]:
    import av

    codec = av.CodecContext.create("h264", "r")
    out = []
    for p in packets:
        for frame in codec.decode(av.Packet(p)):
            out.append(frame.to_ndarray(format="bgr24"))
    for frame in codec.decode(None):
        out.append(frame.to_ndarray(format="bgr24"))
    return out


def choose_crf(pool: FramePool, probe: Probe, fps: float, frames: int = 120, tolerance: float = 0.01,
               log: Callable[[str], None] = print) -> tuple[int, list[dict[str, Any]]]:
    """The highest CRF (fewest bytes) whose decoded frames keep the probe within ``tolerance`` of raw frames."""
    n = min(frames, len(pool))
    seq = pool.images[:n]
    labels = pool.labels[:n]
    raw = probe.accuracy(probe_inputs(seq, pool.roi), labels)
    tried = []
    best = H264_CRFS[0]
    for crf in H264_CRFS:
        packets = h264_stream(seq, fps, crf)
        decoded = decode_h264(packets)
        acc = probe.accuracy(probe_inputs(decoded, pool.roi), labels[:len(decoded)])
        tried.append({"crf": crf, "bytes_per_frame": sum(map(len, packets)) / n, "probe_accuracy": acc,
                      "probe_accuracy_raw": raw})
        log(f"h264 crf {crf}: {tried[-1]['bytes_per_frame']:.0f} B/frame, probe accuracy {acc:.3f} (raw {raw:.3f})")
        if acc >= raw - tolerance:
            best = crf
    return best, tried


# ------------------------------------------------------------------------------------------------ upload run
async def _upload(url: str, messages: list[list[bytes]], fps: float, counters: Callable, settle: float = 0.3):
    from websockets.asyncio.client import connect

    conns = [await connect(url, compression=None, max_size=1 << 24, proxy=None, ping_interval=None,
                           open_timeout=60) for _ in messages]
    rtts: list[float] = []
    try:
        await asyncio.sleep(settle)
        c0 = counters()
        start = time.monotonic()
        period, n = 1.0 / fps, len(messages)

        async def camera(i: int) -> None:
            ws, sent_at = conns[i], []

            async def reader() -> None:
                for k in range(len(messages[i])):
                    await ws.recv()
                    rtts.append(time.monotonic() - sent_at[k])

            acks = asyncio.create_task(reader())
            for k, msg in enumerate(messages[i]):
                delay = start + (k + i / n) * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent_at.append(time.monotonic())
                await ws.send(msg)
            await asyncio.wait_for(acks, 120)

        await asyncio.gather(*(camera(i) for i in range(n)))
        wall = time.monotonic() - start
        await asyncio.sleep(settle)
        c1 = counters()
    finally:
        for ws in conns:
            await ws.close()
    return c0, c1, wall, rtts


def run_upload(kind: str, network: Network, messages: list[list[bytes]], fps: float,
               log: Callable[[str], None] = print, extra: dict | None = None) -> dict[str, Any]:
    """Send each camera's messages at ``fps`` to a fresh receiver; bytes per frame, receiver CPU, send->ack time."""
    with baseline_receiver(network) as rx:
        url = f"ws://{rx.host}:{rx.port}/"
        cpu0 = rx.cpu_seconds()
        c0, c1, wall, rtts = asyncio.run(_upload(url, messages, fps, network.counters))
        cpu = rx.cpu_seconds() - cpu0
    frames = sum(len(m) for m in messages)
    payload = sum(len(x) for m in messages for x in m)
    rtt = np.array(rtts) * 1000
    out: dict[str, Any] = {"kind": kind, "config": {"cameras": len(messages), "fps": fps,
                                                     "duration": len(messages[0]) / fps},
                           "network": network.mode, "frames": frames,
                           "payload_bytes_per_frame": payload / frames,
                           "app_bytes_per_frame": payload / frames,
                           "receiver_cpu_ms_per_frame": 1000 * cpu / frames,
                           "send_to_ack_ms_p50": float(np.percentile(rtt, 50)),
                           "send_to_ack_ms_p99": float(np.percentile(rtt, 99)), "capture_wall_s": wall,
                           **(extra or {})}
    if c0 is not None:
        d = c1 - c0
        out.update(d.to_dict())
        out["ip_bytes_per_frame"] = (d.ip_up + d.ip_down) / frames
        out["ip_bytes_up_per_frame"] = d.ip_up / frames
        out["ip_bytes_down_per_frame"] = d.ip_down / frames
    log(f"{kind}: {len(messages)} cam x {fps:g} fps, {frames} frames, payload {out['payload_bytes_per_frame']:.0f} "
        f"B/frame" + (f", IP {out['ip_bytes_per_frame']:.0f} B/frame" if "ip_bytes_per_frame" in out else ""))
    return out


def camera_messages(pool: FramePool, encoded: list[bytes], cameras: int, frames: int) -> list[list[bytes]]:
    """Each camera's message sequence, showing the same pooled frames as the taskcodec fleet does."""
    return [[encoded[pool.index(c, k)] for k in range(frames)] for c in range(cameras)]
