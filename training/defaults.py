"""The default compressor configuration (what `taskcodec train` with no flags builds and runs/default holds).

Chosen by measurement on Fashion-MNIST (see the report in the run's metrics.json): BINCE with label-preserving
invariances, a 3-layer strided conv encoder with BatchNorm, 64 latent dimensions and a low rate weight, so that the
MLP probe on the integer symbols stays close to a supervised CNN at about 3 range-coder words per image.
"""

from __future__ import annotations

from training.models import CompressorConfig

DEFAULT_RUN = "runs/default"


def default_config(**overrides) -> CompressorConfig:
    base = dict(objective="bince", augmentations="fashion+label", beta=0.003, latent_dim=64, channels=(32, 64, 128),
                epochs=10, batch_size=256, lr=2e-3, temperature=0.1, seed=0, threads=1)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return CompressorConfig(**base)
