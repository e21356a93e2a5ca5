"""Camera frame -> the encoder's input (uint8 NHWC) as the bundle's input spec says: ROI crop, colour, resize.

INTER_AREA is used because cameras deliver far more pixels than the encoder wants, and area averaging is the
downscaler that does not alias (the same one the training data pipeline assumes for real frames).
"""

from __future__ import annotations

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

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One frame (HxW gray, HxWx1, HxWx3 BGR or HxWx4 BGRA) -> [1, H, W, C] uint8."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise PreprocessError(f"expected an 8-bit gray/BGR/BGRA image, got {image.dtype} {image.shape}")
        if self.roi is not None:
            x, y, w, h = self.roi
            if x + w > image.shape[1] or y + h > image.shape[0]:
                raise PreprocessError(f"ROI {x},{y},{w},{h} lies outside the {image.shape[1]}x{image.shape[0]} frame")
            image = image[y:y + h, x:x + w]
        image = self._colour(image)
        spec = self.spec
        if image.shape[:2] != (spec.height, spec.width):
            image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image.reshape(1, spec.height, spec.width, spec.channels))

    def batch(self, images) -> np.ndarray:
        return np.concatenate([self(i) for i in images], axis=0)

    def _colour(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        order = self.spec.color_order
        if image.ndim == 2:
            return image if order == "gray" else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # gray->3ch is order-free
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if order == "gray":
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if order == "rgb":
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return image
