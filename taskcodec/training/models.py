"""The compressor: conv encoder -> z -> per-dimension affine -> y -> entropy bottleneck, plus the objective heads.

Only the encoder, the affine and the bottleneck ship (as :class:`SymbolEncoder` in ONNX and as frozen tables); the
projection head (BINCE critic) and the decoder (VIC/VC) exist only to train them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from taskcodec.training.entropy_bottleneck import EntropyBottleneck

OBJECTIVES = ("bince", "vic", "vc")


@dataclass
class CompressorConfig:
    latent_dim: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    objective: str = "bince"
    beta: float = 0.01
    augmentations: str = "fashion+label"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    seed: int = 0
    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W
    mean: float = 0.2860  # Fashion-MNIST pixel mean / std on [0, 1]
    std: float = 0.3530
    head_dim: int = 128
    threads: int = 1
    train_subset: int | None = None  # use only the first N training images (quick runs, tests)
    test_subset: int | None = None   # evaluate on the first N test images (None: the full 10k)
    probe_epochs: int = 30
    probe_hidden: int = 512
    quantile_steps: int = 3000
    beta_warmup: float = 0.0  # fraction of the steps over which the rate weight ramps linearly from 0 to beta
    head_layers: int = 2      # BINCE projection head: 2 = MLP D->256->head_dim, 0 = InfoNCE on the bottleneck itself
    probe_full_train: bool = False  # fit the probes on all 60k training images even when train_subset is set
    conv_depth: int = 1       # 3x3 convs per encoder stage: the stride-2 one, then conv_depth - 1 at stride 1
    views: int = 2            # BINCE: augmented views per image in a batch (all of one image are positives)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.beta_warmup <= 1.0 or self.head_layers not in (0, 2) or self.conv_depth < 1 \
                or self.views < 2:
            raise ValueError("beta_warmup must be in [0, 1], head_layers 0 or 2, conv_depth >= 1 and views >= 2")
        if self.beta < 0 or self.epochs < 0 or self.batch_size < 2 or self.latent_dim < 1:
            raise ValueError("beta >= 0, epochs >= 0, batch_size >= 2 and latent_dim >= 1 are required")
        from taskcodec.training.augmentations import get_augmentation

        get_augmentation(self.augmentations)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


MAX_FINAL_SIDE = 5  # the last feature map is at most 5x5 whatever the input size


def stage_channels(cfg: CompressorConfig) -> list[int]:
    """Output channels of the stride-2 stages for this input size: ``cfg.channels``, preceded by as many extra
    ``channels[0]``-wide stem stages as it takes to bring the longer side down to <= MAX_FINAL_SIDE
    (28 -> 14 -> 7 -> 4 keeps the original three; 64 px: four stages, 96-160 px: five)."""
    side = max(cfg.image_shape[1:])
    stages = 0
    while side > MAX_FINAL_SIDE:
        side = (side + 1) // 2
        stages += 1
    extra = max(0, stages - len(cfg.channels))
    return [cfg.channels[0]] * extra + list(cfg.channels)


class Encoder(nn.Module):
    """Conv stack, each 3x3 stride 2 + BatchNorm + ReLU (28 -> 14 -> 7 -> 4: cheap on a 2-core CPU) -> linear to D.
    Larger (camera-like) inputs get extra stride-2 stem stages first (:func:`stage_channels`), gray or RGB."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        c, h, w = cfg.image_shape
        layers: list[nn.Module] = []
        for i, cout in enumerate(stage_channels(cfg)):
            layers += _conv(c, cout, 2)
            for _ in range(cfg.conv_depth - 1):
                layers += _conv(cout, cout, 1)
            c = cout
            h, w = (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * h * w, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Decoder(nn.Module):
    """y [N, D] -> image logits [N, C, H, W] for VIC/VC (H, W divisible by 4)."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        c, h, w = cfg.image_shape
        self.shape = (64, h // 4, w // 4)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, 64 * (h // 4) * (w // 4)), nn.ReLU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(y).view(-1, *self.shape))


class Compressor(nn.Module):
    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        # Learned per-dimension affine: lets each dimension choose its own quantisation step independently of the
        # encoder's weight decay; symbols are round(z * exp(log_scale) + shift).
        self.log_scale = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.shift = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.bottleneck = EntropyBottleneck(cfg.latent_dim)
        if cfg.objective == "bince":
            self.head = (nn.Sequential(nn.Linear(cfg.latent_dim, 256), nn.ReLU(), nn.Linear(256, cfg.head_dim))
                         if cfg.head_layers else nn.Identity())
            self.decoder = None
        else:
            self.head = None
            self.decoder = Decoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(float(cfg.mean)))
        self.register_buffer("pixel_std", torch.tensor(float(cfg.std)))

    def standardise(self, x01: torch.Tensor) -> torch.Tensor:
        """float [0, 1] NCHW -> the encoder's input scale."""
        return (x01 - self.pixel_mean) / self.pixel_std

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [N, H, W, C] (NHWC, as cameras deliver them) -> standardised float NCHW."""
        return self.standardise(frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised NCHW -> continuous y [N, D] (before quantisation)."""
        return self.encoder(x) * torch.exp(self.log_scale) + self.shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised NCHW -> (y_hat, bits [N])."""
        return self.bottleneck(self.latents(x))


class SymbolEncoder(nn.Module):
    """What cameras run: uint8 frames [N, H, W, C] -> int32 symbols [N, D], all preprocessing inside (export-ready).

    Call ``.eval()`` semantics are forced: BatchNorm uses its running statistics.
    """

    def __init__(self, compressor: Compressor):
        super().__init__()
        self.compressor = compressor.eval()

    def train(self, mode: bool = True) -> "SymbolEncoder":  # stays in eval mode: export must see running stats
        super().train(False)
        return self

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.compressor.normalise(frames)
        return torch.round(self.compressor.latents(x)).to(torch.int32)
