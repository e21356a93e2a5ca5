"""The runtime's area resize (taskcodec/runtime/preprocess.py): the exact integer area step equals OpenCV's INTER_AREA,
a near-integer factor is one exact block mean, the two-step path stays within rounding of the direct resize, colour
handling matches the plain OpenCV pipeline, and the cheap path is actually cheaper (CPU time, not a wall-clock
timing)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from taskcodec.bundle import InputSpec
from taskcodec.runtime.preprocess import Preprocessor, area_resize, exact_area
from taskcodec.runtime.sources import open_source


def _spec(order: str, size: int = 28) -> InputSpec:
    return InputSpec(height=size, width=size, channels=1 if order == "gray" else 3, color_order=order)


@pytest.mark.parametrize("shape,size", [((120, 120), (28, 28)), ((37, 91), (28, 28)), ((480, 640, 3), (28, 28)),
                                        ((255, 257), (28, 28)), ((300, 200, 3), (17, 23)), ((1000, 999), (28, 28))])
def test_exact_area_equals_opencv_inter_area(shape, size):
    rng = np.random.default_rng(sum(shape))
    for image in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8)):
        ours = exact_area(image, *size)
        theirs = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs)
    # black/white pixels make exact .5 ties, where OpenCV's float sums fall on either side of the tie
    ties = (rng.random(shape) < 0.5).astype(np.uint8) * 255
    diff = exact_area(ties, *size).astype(int) - cv2.resize(ties, size, interpolation=cv2.INTER_AREA)
    assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.99


def test_near_integer_factor_is_one_exact_block_mean():
    """480 -> 28 (17 x 28 + 4): one integer-factor step over the centred 476 x 476, each output the exactly rounded
    mean of its 17 x 17 block (the same bytes on every CPU), for camera frames and random images of such sizes."""
    frames = [f.image for f in open_source("virtual://fashion-mnist?size=640x480&channels=3&count=30")]
    images = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[0:480, 80:560] for f in frames]
    rng = np.random.default_rng(7)
    images += [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(480, 480), (450, 452), (113, 112)] * 3]
    for image in images:
        h, w = image.shape
        fy, fx = h // 28, w // 28
        assert 4 * (h - 28 * fy) <= fy and 4 * (w - 28 * fx) <= fx
        oy, ox = (h - 28 * fy) // 2, (w - 28 * fx) // 2
        blocks = image[oy:oy + 28 * fy, ox:ox + 28 * fx].astype(np.int64).reshape(28, fy, 28, fx).sum(axis=(1, 3))
        area = fx * fy
        q, r = np.divmod(blocks, area)
        want = q + ((2 * r > area) | ((2 * r == area) & (q % 2 == 1)))
        assert np.array_equal(area_resize(image, 28, 28), want)


def test_two_step_area_resize_is_within_rounding_of_the_direct_one():
    """472 -> 28 is far from a multiple of 28: integer step 472 -> 118, then the exact non-integer area step."""
    frames = [f.image for f in open_source("virtual://fashion-mnist?size=640x480&channels=3&count=30")]
    diffs = []
    for frame in frames:
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[4:476, 84:556]
        ours = area_resize(gray, 28, 28).astype(int)
        direct = cv2.resize(gray, (28, 28), interpolation=cv2.INTER_AREA).astype(int)
        diffs.append(np.abs(ours - direct))
    diffs = np.stack(diffs)
    assert diffs.max() <= 8 and diffs.mean() < 0.5, (diffs.max(), diffs.mean())


@pytest.mark.parametrize("order", ["gray", "rgb", "bgr"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_colour_paths_match_plain_opencv(order, channels):
    rng = np.random.default_rng(channels)
    frame = rng.integers(0, 256, (96, 128, channels) if channels > 1 else (96, 128), dtype=np.uint8)
    roi = (8, 4, 84, 84)  # 84 -> 28: an integer factor, so the reference is plain OpenCV too
    got = Preprocessor(_spec(order), roi)(frame)[0]
    crop = frame[4:88, 8:92]
    if crop.ndim == 2:
        ref = cv2.resize(crop, (28, 28), interpolation=cv2.INTER_AREA)
        ref = ref if order == "gray" else cv2.cvtColor(ref, cv2.COLOR_GRAY2BGR)
    else:
        bgr = cv2.cvtColor(crop, cv2.COLOR_BGRA2BGR) if channels == 4 else crop
        code = {"gray": cv2.COLOR_BGR2GRAY, "rgb": cv2.COLOR_BGR2RGB, "bgr": None}[order]
        ref = bgr if code is None else cv2.cvtColor(bgr, code)
        ref = cv2.resize(ref, (28, 28), interpolation=cv2.INTER_AREA)
    ref = ref.reshape(28, 28, -1)
    if order == "gray" and channels > 1:  # gray of the average vs average of the gray: rounding only
        assert np.abs(got.astype(int) - ref).max() <= 1
    else:
        assert np.array_equal(got, ref)


def test_camera_preprocessing_is_cheaper_than_the_direct_resize():
    frames = [f.image for f in open_source("virtual://fashion-mnist?size=640x480&channels=3&count=40")]
    pre = Preprocessor(_spec("gray"), (80, 0, 480, 480))

    def direct(frame):
        return cv2.resize(cv2.cvtColor(frame[0:480, 80:560], cv2.COLOR_BGR2GRAY), (28, 28),
                          interpolation=cv2.INTER_AREA)

    def cpu(fn) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for f in frames:
                fn(f)
            best = min(best, time.thread_time() - t)
        return best

    assert cpu(pre) < 0.8 * cpu(direct)
