"""Camera frame -> the encoder's input (uint8 NHWC) as the bundle's input spec says: ROI crop, colour, resize.

INTER_AREA is used because cameras deliver far more pixels than the encoder wants, and area averaging is the
downscaler that does not alias (the same one the training data pipeline assumes for real frames).

Cost (a 640x480 BGR camera, ROI 480x480, 28x28 gray encoder input): OpenCV's INTER_AREA by a non-integer factor
(480 -> 28 = 17.14) takes a generic per-pixel weighted path (~0.3 ms), and a colour conversion of a non-contiguous
crop is ~3x slower than of a whole contiguous frame. So the area average is done with integer factors: when the ROI
is within a quarter of an output pixel of a multiple of the target size (480 = 17 x 28 + 4), one integer-factor
INTER_AREA of the centred multiple (476 -> 28: the exact rounded mean of each 17x17 block, leaving out 2 border
pixels on each side, less than a quarter of an output pixel); otherwise two steps: an integer-factor INTER_AREA
(OpenCV's block-mean path) to at least 4x the target size, then the small non-integer area step (e.g. 500 -> 125 ->
28), which differs from the direct resize only by the rounding of the intermediate image. `taskcodec bench runtime
--preprocess-check` compares the result with the direct resize (accuracy, symbols, pixels) and reports the cost. Colour is converted where it is cheapest: gray on the whole frame
when the ROI covers at least a third of it; channel reorders (BGR -> RGB, gray -> 3 channels) after the resize, where
they are exact and touch 784 pixels.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from taskcodec.bundle import InputSpec


class PreprocessError(ValueError):
    """A frame or ROI that cannot be turned into the encoder's input."""


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    """'x,y,w,h' -> (x, y, w, h)."""
    if text is None or text == "":
        return None
    try:
        x, y, w, h = (int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"ROI must be x,y,w,h in pixels like 80,0,480,480, got {text!r}") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"ROI needs x,y >= 0 and w,h > 0, got {text!r}")
    return x, y, w, h


class Preprocessor:
    def __init__(self, spec: InputSpec, roi: tuple[int, int, int, int] | None = None):
        if spec.color_order not in ("gray", "rgb", "bgr"):
            raise PreprocessError(f"unsupported colour order {spec.color_order!r} in the bundle (gray, rgb or bgr)")
        if spec.channels != (1 if spec.color_order == "gray" else 3):
            raise PreprocessError(f"colour order {spec.color_order} does not fit {spec.channels} channels")
        self.spec = spec
        self.roi = roi
        # One small resize per frame: OpenCV's worker pool (its threads spin between jobs) cost 0.5 ms of process CPU
        # per frame at 30 fps on a 2-core machine for nothing (`taskcodec bench runtime`, runtime_cpu.md).
        cv2.setNumThreads(1)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One frame (HxW gray, HxWx1, HxWx3 BGR or HxWx4 BGRA) -> [1, H, W, C] uint8."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise PreprocessError(f"expected an 8-bit gray/BGR/BGRA image, got {image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        frame_h, frame_w = image.shape[:2]
        x, y, w, h = 0, 0, frame_w, frame_h
        if self.roi is not None:
            x, y, w, h = self.roi
            if x + w > frame_w or y + h > frame_h:
                raise PreprocessError(f"ROI {x},{y},{w},{h} lies outside the {frame_w}x{frame_h} frame")
        spec = self.spec
        if spec.color_order == "gray" and image.ndim == 3:
            code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            if 3 * w * h >= frame_w * frame_h:  # a contiguous whole frame converts ~3x faster per pixel than a crop
                image = cv2.cvtColor(image, code)[y:y + h, x:x + w]
            else:
                image = cv2.cvtColor(np.ascontiguousarray(image[y:y + h, x:x + w]), code)
        else:
            image = image[y:y + h, x:x + w]
            if image.ndim == 3 and image.shape[2] == 4:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        image = area_resize(image, spec.width, spec.height)
        if spec.color_order != "gray":  # exact per-pixel reorders, done on the small image
            if image.ndim == 2:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # gray->3ch is order-free
            elif spec.color_order == "rgb":
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(image.reshape(1, spec.height, spec.width, spec.channels))

    def batch(self, images) -> np.ndarray:
        return np.concatenate([self(i) for i in images], axis=0)


STAGE_MARGIN = 4  # the integer step stops at >= 4x the target size, so the non-integer step works on a small image


def area_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA to width x height: one integer-factor INTER_AREA when the size is within a quarter output pixel of
    an integer multiple, else an integer-factor INTER_AREA first when the image is >= 8x larger, then
    :func:`exact_area` (see the module docstring)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    if w < width or h < height:  # upscaling: not a camera's case; OpenCV's INTER_AREA (bilinear there)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    fx, fy = w // width, h // height
    if fx >= 2 and fy >= 2 and 4 * (w - fx * width) <= fx and 4 * (h - fy * height) <= fy:
        # one integer-factor step (480 -> 28: 17x17 blocks of the centred 476x476): leaves out at most a quarter of an
        # output pixel's width of border pixels, and OpenCV's block mean is then the exact rounded mean (no .5 ties
        # for an odd block area; float error far below the distance to one otherwise), the same bytes on every CPU
        cw, ch = fx * width, fy * height
        ox, oy = (w - cw) // 2, (h - ch) // 2
        return cv2.resize(image[oy:oy + ch, ox:ox + cw], (width, height), interpolation=cv2.INTER_AREA)
    fx, fy = w // (STAGE_MARGIN * width), h // (STAGE_MARGIN * height)
    if fx >= 2 or fy >= 2:
        fx, fy = max(fx, 1), max(fy, 1)
        cw, ch = w - w % fx, h - h % fy
        ox, oy = (w - cw) // 2, (h - ch) // 2
        image = cv2.resize(image[oy:oy + ch, ox:ox + cw], (cw // fx, ch // fy), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    if w % width == 0 and h % height == 0:  # integer factor: OpenCV's block mean (integer arithmetic, exact)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return exact_area(image, width, height)


@functools.lru_cache(maxsize=16)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] integer overlaps: input pixel j covers [j*n_out, (j+1)*n_out) and output pixel i covers
    [i*n_in, (i+1)*n_in) in units of 1/n_out input pixels; each row sums to n_in."""
    edges_in = np.arange(n_in + 1) * n_out
    edges_out = np.arange(n_out + 1) * n_in
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    weights = np.clip(hi - lo, 0, None).astype(np.float64)
    weights.setflags(write=False)
    return weights


def exact_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area average to width x height (downscaling) in exact integer arithmetic, so every CPU gives the same bytes:
    OpenCV's non-integer INTER_AREA accumulates in float and rounds differently on x86 and aarch64 (+-1 on a few
    pixels: scripts/check-aarch64.sh). The weighted sums are integers that the float type holds exactly (below 2**24
    in float32 for images up to 256x256, else float64), so the matrix products are exact whatever their summation
    order; the result is rounded to nearest, ties to even, as OpenCV rounds (equal outputs on random images; on exact
    ties OpenCV's float sums may land on either side)."""
    h, w = image.shape[:2]
    wy, wx = _area_weights(h, height), _area_weights(w, width)
    # float32 holds every integer below 2**24 exactly: enough when 255 * h * w is below it (a 256x256 image)
    exact32 = 255 * h * w < 1 << 24
    x = image.astype(np.float32 if exact32 else np.float64)
    if exact32:
        wy, wx = wy.astype(np.float32), wx.astype(np.float32)
    if image.ndim == 2:
        total = wy @ x @ wx.T
    else:
        total = np.einsum("ih,hwc,jw->ijc", wy, x, wx, optimize=True)
    quotient, remainder = np.divmod(total.astype(np.int64), h * w)
    twice = 2 * remainder
    up = (twice > h * w) | ((twice == h * w) & (quotient % 2 == 1))  # to nearest, ties to even (like cvRound)
    return (quotient + up).astype(np.uint8)
