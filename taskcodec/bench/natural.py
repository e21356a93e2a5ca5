"""Natural images that ship with the installed packages, as an operator's image folder: each class is one scene
(scikit-image's astronaut, chelsea, coffee and rocket; scikit-learn's china and flower) seen through random camera
crops (35-85 % of the shorter side, anywhere in the photo), left-right flips, small rotations, brightness/contrast
jitter and sensor noise, saved as JPEG files in torchvision's ImageFolder layout (ROOT/<class>/<n>.jpg). The task is
"which scene is the camera looking at"; other photos (Hubble deep field, a histology slide, a retina, gray textures
and scenes) are out of its domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

IN_SCENES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
OUT_SCENES = ("hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon", "page", "text",
              "brick", "grass", "gravel", "clock", "cell")


def photo(name: str) -> np.ndarray:
    """One photo as uint8 RGB [H, W, 3] (gray photos are repeated into three channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def camera_crops(img: np.ndarray, n: int, size: int, rng: np.random.Generator, scale=(0.35, 0.85)) -> np.ndarray:
    """n augmented square crops of an RGB photo -> uint8 [n, size, size, 3]."""
    import cv2

    h, w = img.shape[:2]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        side = int(rng.uniform(*scale) * min(h, w))
        cy, cx = rng.uniform(side / 2, h - side / 2), rng.uniform(side / 2, w - side / 2)
        m = cv2.getRotationMatrix2D((cx, cy), float(rng.uniform(-12, 12)), size / side)
        m[:, 2] += (size / 2 - cx, size / 2 - cy)
        crop = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = crop.astype(np.float32) * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20)
        x = (x - x.mean()) * rng.uniform(0.8, 1.2) + x.mean() + rng.normal(0, rng.uniform(0, 6), x.shape)
        out[i] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def make_image_folder(root: str | Path, per_class: int = 60, size: int = 96, scenes=IN_SCENES, seed: int = 0,
                      quality: int = 92) -> Path:
    """Write ROOT/<scene>/<n>.jpg: ``per_class`` camera crops of each scene; returns ROOT."""
    import cv2

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in scenes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(camera_crops(photo(name), per_class, size, rng)):
            if not cv2.imwrite(str(folder / f"{i:04d}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise OSError(f"cannot write {folder / f'{i:04d}.jpg'}")
    return root


def out_of_domain_crops(n_per_scene: int = 20, size: int = 96, scenes=OUT_SCENES, seed: int = 1,
                        gray: bool = False) -> np.ndarray:
    """Camera crops of photos outside the example's scenes: uint8 RGB [N, size, size, 3] (or gray [N, size, size])."""
    import cv2

    rng = np.random.default_rng(seed)
    crops = np.concatenate([camera_crops(photo(s), n_per_scene, size, rng) for s in scenes])
    return np.stack([cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) for c in crops]) if gray else crops


PHOTO_LOADERS: dict[str, Callable[[], np.ndarray]] = {s: (lambda s=s: photo(s)) for s in IN_SCENES + OUT_SCENES}
