"""Classical codec baselines (JPEG, WebP, PNG, AVIF) measured the way the paper's claim needs them: bytes per image
*at equal accuracy*. For each codec and quality every Fashion-MNIST image is encoded and decoded, the same
supervised CNN (training.supervised) is trained on the decoded training images and tested on the decoded test
images, so the accuracy a codec allows is measured, not assumed.

Sizes: ``bytes_per_image`` is the mean size of the complete file the codec writes (its headers included), over the
test images. ``payload_bytes_per_image`` strips the container: JPEG entropy-coded scan only (no quantisation or
Huffman tables, which a deployment *could* share out of band), WebP VP8/VP8L chunk, PNG IDAT data, AVIF mdat
content. It is an optimistic lower bound for the codec, not something a stock decoder can read.

JPEG, WebP and PNG go through Pillow (JPEG with optimised Huffman tables, WebP method 6: the codecs' best effort);
AVIF goes through OpenCV's libavif, which is ~10x faster here than Pillow's at these sizes."""

from __future__ import annotations

import io
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RAW_BYTES = 28 * 28  # an uncompressed 8-bit Fashion-MNIST image

DEFAULT_QUALITIES: dict[str, tuple[int | None, ...]] = {
    "jpeg": (1, 5, 10, 20, 50, 90),
    "webp": (0, 1, 5, 20, 50, 90),
    "png": (None,),  # lossless
    "avif": (0, 20, 50),
}
CODECS = tuple(DEFAULT_QUALITIES)


class CodecError(ValueError):
    """An unknown codec, a quality out of range, or a codec this build of Pillow/OpenCV cannot write."""


# --------------------------------------------------------------------------------------------- encode / decode
def _pil_encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


def encode(image: np.ndarray, codec: str, quality: int | None) -> bytes:
    """Encode one uint8 grayscale image [H, W] as a complete ``codec`` file."""
    check_quality(codec, quality)
    if codec == "jpeg":
        return _pil_encode(image, "JPEG", quality=quality, optimize=True)
    if codec == "webp":
        return _pil_encode(image, "WEBP", quality=quality, method=6)
    if codec == "png":
        return _pil_encode(image, "PNG", optimize=True)
    import cv2

    ok, buf = cv2.imencode(".avif", image, [cv2.IMWRITE_AVIF_QUALITY, int(quality)])
    if not ok:
        raise CodecError("OpenCV failed to encode AVIF")
    return buf.tobytes()


def decode(data: bytes, codec: str) -> np.ndarray:
    """Decode a ``codec`` file back to a uint8 grayscale image [H, W]."""
    if codec == "avif":
        import cv2

        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise CodecError("OpenCV failed to decode AVIF")
        return image
    return _pil_decode(data)


def check_quality(codec: str, quality: int | None) -> None:
    if codec not in DEFAULT_QUALITIES:
        raise CodecError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if codec == "png":
        if quality is not None:
            raise CodecError("png is lossless: give it no quality (png=lossless)")
        return
    if quality is None or not 0 <= quality <= 100:
        raise CodecError(f"{codec} quality must be an integer 0..100, got {quality!r}")


def available(codec: str) -> bool:
    """Whether this build of Pillow/OpenCV can write ``codec`` (AVIF and WebP are optional in both)."""
    try:
        image = np.zeros((8, 8), np.uint8)
        return decode(encode(image, codec, DEFAULT_QUALITIES[codec][-1]), codec).shape == (8, 8)
    except Exception:
        return False


# ----------------------------------------------------------------------------------- header-stripped payload
def _jpeg_payload(data: bytes) -> int:
    sos = data.find(b"\xff\xda")
    if sos < 0:
        raise CodecError("no JPEG start-of-scan marker")
    (length,) = struct.unpack(">H", data[sos + 2:sos + 4])
    return len(data) - (sos + 2 + length) - 2  # scan data, without its header and the EOI marker


def _riff_payload(data: bytes) -> int:
    pos, total = 12, 0
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if fourcc in (b"VP8 ", b"VP8L", b"ALPH"):
            total += size
        pos += 8 + size + (size & 1)
    return total


def _png_payload(data: bytes) -> int:
    pos, total = 8, 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            total += size
        pos += 12 + size
    return total


def _isobmff_payload(data: bytes) -> int:
    pos, total = 0, 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = len(data) - pos
        if kind == b"mdat":
            total += size - header
        if size < header:
            break
        pos += size
    return total


_PAYLOAD: dict[str, Callable[[bytes], int]] = {
    "jpeg": _jpeg_payload, "webp": _riff_payload, "png": _png_payload, "avif": _isobmff_payload}


def payload_size(data: bytes, codec: str) -> int:
    """Bytes of the coded image data inside a ``codec`` file, container and headers stripped (see module doc)."""
    return _PAYLOAD[codec](data)


@dataclass
class RoundTrip:
    decoded: np.ndarray        # uint8 [N, H, W]
    file_bytes: np.ndarray     # int [N], complete file sizes
    payload_bytes: np.ndarray  # int [N], header-stripped sizes
    encode_seconds: float


def round_trip(images: np.ndarray, codec: str, quality: int | None, progress: bool = False,
               desc: str | None = None) -> RoundTrip:
    """Encode and decode every image; sizes per image and total encode time."""
    check_quality(codec, quality)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    decoded = np.empty_like(images)
    sizes = np.empty(len(images), np.int64)
    payload = np.empty(len(images), np.int64)
    it: Iterable[int] = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc or f"{codec} q={quality}", unit="img", leave=False, mininterval=1.0)
    spent = 0.0
    for i in it:
        t0 = time.perf_counter()
        data = encode(images[i], codec, quality)
        spent += time.perf_counter() - t0
        out = decode(data, codec)
        if out.shape != images.shape[1:]:
            raise CodecError(f"{codec} decoded shape {out.shape}, expected {images.shape[1:]}")
        decoded[i] = out
        sizes[i] = len(data)
        payload[i] = payload_size(data, codec)
    return RoundTrip(decoded, sizes, payload, spent)


# ------------------------------------------------------------------------------------------------ benchmark
def evaluate(codec: str, quality: int | None, train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], epochs: int, seed: int = 0, threads: int = 1,
             progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One result row: round-trip train and test images through the codec, train the CNN on the decoded train
    images, measure accuracy on the decoded test images. ``codec="raw"`` skips the codec (the reference)."""
    from taskcodec.training.supervised import accuracy, train_cnn

    (x_train, y_train), (x_test, y_test) = train, test
    row: dict[str, Any] = {"codec": codec, "quality": quality}
    if codec == "raw":
        train_dec, test_dec = x_train, x_test
        row.update(bytes_per_image=float(RAW_BYTES), payload_bytes_per_image=float(RAW_BYTES),
                   train_bytes_per_image=float(RAW_BYTES), encode_us_per_image=0.0)
    else:
        tr = round_trip(x_train, codec, quality, progress, desc=f"{codec} q={quality} train")
        te = round_trip(x_test, codec, quality, progress, desc=f"{codec} q={quality} test")
        train_dec, test_dec = tr.decoded, te.decoded
        row.update(bytes_per_image=float(te.file_bytes.mean()),
                   payload_bytes_per_image=float(te.payload_bytes.mean()),
                   train_bytes_per_image=float(tr.file_bytes.mean()),
                   encode_us_per_image=1e6 * (tr.encode_seconds + te.encode_seconds) / (len(x_train) + len(x_test)),
                   pixel_mae=float(np.abs(test_dec.astype(np.int16) - x_test).mean()))
    t0 = time.perf_counter()
    model = train_cnn(train_dec, y_train, epochs=epochs, seed=seed, threads=threads, progress=progress)
    row["train_seconds"] = time.perf_counter() - t0
    row["accuracy"] = accuracy(model, test_dec, y_test)
    row.update(epochs=epochs, seed=seed, n_train=len(x_train), n_test=len(x_test))
    if log is not None:
        log(f"{codec:5s} q={quality!s:>4}: {row['bytes_per_image']:7.1f} B/img "
            f"(payload {row['payload_bytes_per_image']:.1f}), accuracy {row['accuracy']:.4f}, "
            f"CNN {row['train_seconds']:.0f} s")
    return row


def _key(row: dict[str, Any]) -> tuple:
    return (row["codec"], row["quality"], row["epochs"], row["seed"], row["n_train"], row["n_test"])


def run_benchmark(qualities: dict[str, Sequence[int | None]] | None = None, epochs: int = 3,
                  baseline_epochs: int = 0, seed: int = 0, threads: int = 1, train_limit: int | None = None,
                  test_limit: int | None = None, baseline_train_limit: int | None = None, data: str | Path | None = None, out: str | Path | None = None,
                  resume: bool = True, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every codec/quality (plus the raw CNN at the same epochs and training subset, and optionally the raw
    baseline at ``baseline_epochs`` on ``baseline_train_limit`` images, default all: the fully trained reference).

    ``train_limit`` (codec rows only) trades a little absolute accuracy for time on a shared CPU; every codec row
    and the ``raw`` row use the same subset and epochs, so they stay comparable.

    With ``out`` the results are rewritten after every row (JSON, markdown, PNG), so a long run that is interrupted
    keeps what it measured; with ``resume`` rows already in ``out``/classical.json measured with the same
    epochs/seed/subset are reused instead of recomputed."""
    from taskcodec.report import machine_info, utc_now
    from taskcodec.data import load_frames, parse_data

    qualities = dict(DEFAULT_QUALITIES if qualities is None else qualities)
    for codec, qs in qualities.items():
        for q in qs:
            check_quality(codec, q)
    missing = [c for c in qualities if not available(c)]
    if missing:
        raise CodecError(f"this Pillow/OpenCV build cannot write {', '.join(missing)}; leave it out")
    spec = parse_data(data)
    train_set, test_set = load_frames(spec, "train"), load_frames(spec, "test")
    full_x_train, full_y_train = train_set.frames[..., 0], train_set.labels
    x_test, y_test = test_set.frames[..., 0], test_set.labels
    x_train, y_train = full_x_train[:train_limit], full_y_train[:train_limit]
    xb_train, yb_train = full_x_train[:baseline_train_limit], full_y_train[:baseline_train_limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]

    previous: dict[tuple, dict[str, Any]] = {}
    json_path = Path(out) / "classical.json" if out is not None else None
    if resume and json_path is not None and json_path.is_file():
        import json

        try:
            old = json.loads(json_path.read_text())
            for row in old.get("rows", []) + ([old["baseline"]] if old.get("baseline") else []):
                previous[_key(row)] = row
        except (ValueError, KeyError, TypeError) as exc:
            if log is not None:
                log(f"ignoring unreadable {json_path} ({exc}); measuring everything")

    results: dict[str, Any] = {
        "benchmark": "classical",
        "dataset": str(spec) if spec.path is None else spec.kind,
        "protocol": ("per codec+quality: encode/decode all train and test images, train the same SmallVGG CNN "
                     "(training/supervised.py) on decoded train images, accuracy on decoded test images"),
        "bytes_definition": ("bytes_per_image = mean complete file size over the test images, codec headers "
                             "included; payload_bytes_per_image = header-stripped coded data (JPEG scan without "
                             "tables, WebP VP8 chunk, PNG IDAT, AVIF mdat), an optimistic lower bound"),
        "machine": machine_info(),
        "settings": {"epochs": epochs, "baseline_epochs": baseline_epochs, "seed": seed, "threads": threads,
                     "n_train": len(x_train), "n_test": len(x_test), "baseline_n_train": len(xb_train),
                     "qualities": {c: list(q) for c, q in qualities.items()}},
        "started": utc_now(),
        "rows": [],
        "baseline": None,
    }

    def measure(codec: str, quality: int | None, n_epochs: int, train=(x_train, y_train)) -> dict[str, Any]:
        key = (codec, quality, n_epochs, seed, len(train[0]), len(x_test))
        if key in previous:
            if log is not None:
                log(f"{codec} q={quality} ({n_epochs} epochs, {len(train[0])} train): reusing the row in {json_path}")
            return previous[key]
        return evaluate(codec, quality, train, (x_test, y_test), n_epochs, seed, threads, progress, log)

    results["rows"].append(measure("raw", None, epochs))
    if baseline_epochs:  # early: it is the number the other rows are judged against
        same = baseline_epochs == epochs and len(xb_train) == len(x_train)
        results["baseline"] = results["rows"][0] if same else measure("raw", None, baseline_epochs,
                                                                      (xb_train, yb_train))
    for codec, qs in qualities.items():
        for quality in qs:
            if out is not None:
                write_results(results, out)
            results["rows"].append(measure(codec, quality, epochs))
    results["finished"] = utc_now()
    if out is not None:
        write_results(results, out)
    return results


# ------------------------------------------------------------------------------------------ bytes at accuracy
def _rows(results: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(results["rows"] if isinstance(results, dict) else results)


def bytes_at_accuracy(results: dict[str, Any] | Sequence[dict[str, Any]], codec: str, target_accuracy: float,
                      key: str = "bytes_per_image") -> tuple[float | None, bool]:
    """Bytes per image ``codec`` needs to reach ``target_accuracy``: (bytes, is_upper_bound).

    Points are taken in order of increasing bytes; between the last point below the target and the first at or
    above it, bytes are interpolated linearly in log-bytes. If even the smallest point reaches the target, its bytes
    are returned with ``is_upper_bound=True``: the codec might need fewer, so a ratio "codec bytes / taskcodec
    bytes" built on it is a lower bound. ``(None, False)`` if no quality reaches the target."""
    points = sorted((float(r[key]), float(r["accuracy"])) for r in _rows(results) if r["codec"] == codec)
    if not points:
        raise KeyError(f"no rows for codec {codec!r}")
    for i, (b, acc) in enumerate(points):
        if acc >= target_accuracy:
            if i == 0:
                return b, True
            b0, a0 = points[i - 1]
            # a0 < target <= acc: interpolate log-bytes on accuracy
            t = (target_accuracy - a0) / (acc - a0)
            if t >= 1.0:
                return b, False
            return math.exp(math.log(b0) + t * (math.log(b) - math.log(b0))), False
    return None, False


# -------------------------------------------------------------------------------------------------- outputs
_COLUMNS = [("codec", "codec"), ("quality", "quality"), ("bytes_per_image", "bytes/image (file)"),
            ("payload_bytes_per_image", "bytes/image (header-stripped)"), ("accuracy", "accuracy"),
            ("pixel_mae", "pixel MAE"), ("epochs", "CNN epochs"), ("train_seconds", "CNN train s")]
_FORMATS = {"bytes_per_image": ".1f", "payload_bytes_per_image": ".1f", "accuracy": ".4f", "pixel_mae": ".2f",
            "train_seconds": ".0f"}


def _dataset_title(results: dict[str, Any]) -> str:
    return "placed Fashion-MNIST" if results.get("dataset") == "fashion-mnist-placed" else "Fashion-MNIST"


def markdown(results: dict[str, Any]) -> str:
    from taskcodec.report import machine_line, markdown_table

    s = results["settings"]
    rows = [dict(r, quality="lossless" if r["codec"] == "png" else r["quality"]) for r in results["rows"]]
    text = [
        f"# Classical codec baselines on {_dataset_title(results)}\n",
        machine_line(results["machine"]) + "\n",
        f"CNN: training/supervised.py SmallVGG, {s['epochs']} epochs per codec/quality, seed {s['seed']}, "
        f"{s['threads']} torch thread(s); trained on the first {s['n_train']} train images (of 60000; fewer epochs "
        f"and images than the baseline below, to fit a shared 2-core CPU), tested on {s['n_test']} test images.\n",
        "Protocol: each codec/quality encodes and decodes every train and test image; the CNN is trained on the "
        "decoded train images and tested on the decoded test images (accuracy measured, not assumed). `raw` is the "
        f"same CNN on uncompressed pixels ({RAW_BYTES} bytes) at the same epochs.\n",
        "Encoders: JPEG via Pillow (optimised Huffman tables), WebP via Pillow (method 6), PNG via Pillow "
        "(optimize), AVIF via OpenCV's libavif (both Pillow and OpenCV here support AVIF; OpenCV is ~10x faster "
        "at 28x28). Images are 28x28 8-bit grayscale.\n",
        "bytes/image (file) = mean size of the complete file the codec writes, over the test images, headers "
        "included. bytes/image (header-stripped) = coded data only (JPEG entropy-coded scan without quantisation/"
        "Huffman tables, WebP VP8 chunk, PNG IDAT, AVIF mdat): an optimistic estimate that no stock decoder can "
        "read.\n",
        markdown_table(rows, _COLUMNS, _FORMATS),
    ]
    text.append(bytes_at_accuracy_table(results))
    if results.get("baseline"):
        b = results["baseline"]
        text.append(f"\nRaw-pixel CNN baseline (fully trained reference): {b['epochs']} epochs on {b['n_train']} "
                    f"train images, accuracy **{b['accuracy']:.4f}** on {b['n_test']} test images (trained in "
                    f"{b['train_seconds']:.0f} s on this shared CPU).\n")
    return "\n".join(text)


def bytes_at_accuracy_table(results: dict[str, Any]) -> str:
    """Markdown: bytes/image each codec needs for a few target accuracies (same CNN epochs and images as ``raw``)."""
    from taskcodec.report import markdown_table

    raw = [r for r in results["rows"] if r["codec"] == "raw"]
    targets = [0.80, 0.85] + ([round(raw[0]["accuracy"] - 0.01, 4)] if raw else [])
    codecs = [c for c in CODECS if any(r["codec"] == c for r in results["rows"])]
    rows = []
    for codec in codecs:
        row: dict[str, Any] = {"codec": codec}
        for t in targets:
            for key, label in (("bytes_per_image", "file"), ("payload_bytes_per_image", "stripped")):
                b, upper = bytes_at_accuracy(results, codec, t, key)
                row[f"{t}-{label}"] = "not reached" if b is None else (f"≤ {b:.1f}" if upper else f"{b:.1f}")
        rows.append(row)
    columns = [("codec", "codec")] + [(f"{t}-{label}", f"{label} B @ acc {t:.4g}") for t in targets
                                      for label in ("file", "stripped")]
    note = ("\nBytes per image at equal accuracy (bench.classical.bytes_at_accuracy: log-bytes interpolation "
            "between neighbouring qualities; \"≤\" = even the lowest quality tried beats the target, so the codec "
            f"needs at most this much and a ratio to taskcodec built on it is a lower bound). Last target = raw-pixel "
            f"CNN accuracy at the same epochs minus one point.\n\n")
    return note + markdown_table(rows, columns) if rows else ""


def load_results(out: str | Path) -> dict[str, Any]:
    """Read ``out``/classical.json written by run_benchmark."""
    import json

    path = Path(out) / "classical.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `taskcodec bench classical --out {out}` first")
    return json.loads(path.read_text())


def plot(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["rows"]
    for codec in CODECS:
        pts = sorted((r["bytes_per_image"], r["accuracy"]) for r in rows if r["codec"] == codec)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=codec)
    raw = [r for r in rows if r["codec"] == "raw"]
    if raw:
        ax.axhline(raw[0]["accuracy"], color="gray", ls="--", lw=1,
                   label=f"raw pixels ({RAW_BYTES} B), same epochs")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (complete file, mean over test set)")
    ax.set_ylabel("test accuracy (CNN retrained on decoded images)")
    s = results["settings"]
    m = results["machine"]
    ax.set_title(f"{_dataset_title(results)}: CNN {s['epochs']} epochs on {s['n_train']} decoded train images, "
                 f"{s['n_test']} test; {m['usable_cores']}-core CPU", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write classical.json, classical.md and classical.png into ``out``."""
    from taskcodec.report import write_json, write_text

    out = Path(out)
    return [write_json(out / "classical.json", results), write_text(out / "classical.md", markdown(results)),
            plot(results, out / "classical.png")]


def parse_qualities(specs: Sequence[str]) -> dict[str, tuple[int | None, ...]]:
    """Parse CLI specs like ``jpeg=1,5,10`` / ``png=lossless`` / ``webp`` (its default qualities)."""
    parsed: dict[str, tuple[int | None, ...]] = {}
    for spec in specs:
        codec, _, values = spec.partition("=")
        codec = codec.strip().lower()
        if codec not in DEFAULT_QUALITIES:
            raise CodecError(f"unknown codec {codec!r} in {spec!r}; choose from {', '.join(CODECS)}")
        if not values:
            parsed[codec] = DEFAULT_QUALITIES[codec]
            continue
        qs: list[int | None] = []
        for v in values.split(","):
            v = v.strip().lower()
            if v in ("lossless", "none", ""):
                qs.append(None)
            else:
                try:
                    qs.append(int(v))
                except ValueError:
                    raise CodecError(f"quality {v!r} in {spec!r} is not an integer") from None
        for q in qs:
            check_quality(codec, q)
        parsed[codec] = tuple(qs)
    return parsed
