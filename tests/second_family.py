"""A second model family for the tests: a tiny 2-D-convolution denoiser over the Oobleck VAE.

It follows toolkit.families' denoiser protocol with nothing of SoftAlign: the latent (B, D, L) is
read as a one-channel image (B, 1, D, L) with the conditioning latent as a second channel, through
Conv2d, a strided Conv2d down, a ConvTranspose2d up and a Linear time embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.config import register, require
from toolkit.families import FAMILIES, ModelFamily, register_family

NAME = "conv2d-oobleck"


@register
@dataclass(frozen=True)
class Conv2dDenoiserConfig:
    TYPE = "test_conv2d_denoiser"
    VERSION = 1

    latent_channels: int = 4
    latent_length: int = 16
    width: int = 8
    schedule_offset: float = 0.008

    def __post_init__(self) -> None:
        require(self.latent_length % 2 == 0, "Conv2dDenoiserConfig", "latent_length", "must be even")

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_channels, self.latent_length)


class Conv2dDenoiser(nn.Module):
    def __init__(self, config: Conv2dDenoiserConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.time = nn.Linear(1, w)
        self.conv_in = nn.Conv2d(2, w, 3, padding=1)
        self.down = nn.Conv2d(w, w, (3, 4), stride=(1, 2), padding=(1, 1))
        self.mid = nn.Conv2d(w, w, 3, padding=1)
        self.up = nn.ConvTranspose2d(w, w, (1, 2), stride=(1, 2))
        self.conv_out = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(torch.stack([x, cond], dim=1)) + self.time(t[:, None])[:, :, None, None]
        h = torch.nn.functional.silu(h)
        h = h + self.up(torch.nn.functional.silu(self.mid(torch.nn.functional.silu(self.down(h)))))
        return self.conv_out(h)[:, 0]


def _family() -> ModelFamily:
    from toolkit.models.oobleck import OobleckConfig, OobleckVAE, fold_for_export

    return ModelFamily(name=NAME, denoiser_config=Conv2dDenoiserConfig, denoiser=Conv2dDenoiser,
                       autoencoder_config=OobleckConfig, autoencoder=OobleckVAE, fold_autoencoder=fold_for_export,
                       keep_high=(r"conv_in", r"conv_out"))


if NAME not in FAMILIES:
    register_family(NAME, _family)
