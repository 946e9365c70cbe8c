"""The three deployable components of a pipeline, as plain modules with fixed tensor signatures.

What a device runs, and what every target exports:

| component     | inputs                                   | output                         |
| ------------- | ---------------------------------------- | ------------------------------ |
| `vae_encoder` | audio (1, C, segment_samples)            | latent (1, D, L) — mean × scale |
| `denoiser`    | x (B, D, L), t (B,), cond (B, D, L)      | v (B, D, L)                    |
| `vae_decoder` | latent (1, D, L)                         | audio (1, C, segment_samples)  |

B is 2 when classifier-free guidance runs both branches in one call, 1 when guidance is folded
into a distilled student. The latent scale is folded into the encoder and decoder, so the device
loop needs nothing but the sampler table. The VAE is folded by its family's ``fold_autoencoder``
(Oobleck: weight norm and Snake exponentials) so that XNNPACK takes it as one delegate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime_py.bundle import COMPONENTS  # noqa: F401  (the one list of components, device side)
from toolkit.checkpoint import Pipeline


class VAEEncoderExport(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.encoder = vae.encoder
        self.latent_scale = latent_scale

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        h = self.encoder(audio)
        # Deploy with the posterior mean (first half); a slice, not chunk(), so XNNPACK takes it all.
        return h[:, : h.shape[1] // 2] * self.latent_scale


class VAEDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.decoder = vae.decoder
        self.inv_scale = 1.0 / latent_scale

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent * self.inv_scale)


@dataclass(frozen=True)
class ComponentSpec:
    """A component ready to export: the module, example inputs and the tensor names."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def denoiser_batch(pipeline: Pipeline) -> int:
    return 1 if pipeline.config.guidance_folded else 2


def component_specs(pipeline: Pipeline, *, seed: int = 0) -> dict[str, ComponentSpec]:
    """The three components of ``pipeline`` with seeded example inputs of the deployed shapes."""
    g = torch.Generator().manual_seed(seed)
    vae = pipeline.family.fold_autoencoder(pipeline.vae).eval()
    scale = pipeline.config.latent_scale
    d, length = pipeline.latent_shape
    b = denoiser_batch(pipeline)
    audio = 0.1 * torch.randn(1, pipeline.audio_channels, pipeline.segment_samples, generator=g)
    return {
        "vae_encoder": ComponentSpec("vae_encoder", VAEEncoderExport(vae, scale).eval(), (audio,),
                                     ("audio",), ("latent",)),
        "denoiser": ComponentSpec(
            "denoiser", pipeline.denoiser.eval(),
            (torch.randn(b, d, length, generator=g), torch.rand(b, generator=g),
             torch.randn(b, d, length, generator=g)),
            ("x", "t", "cond"), ("v",)),
        "vae_decoder": ComponentSpec("vae_decoder", VAEDecoderExport(vae, scale).eval(),
                                     (torch.randn(1, d, length, generator=g),), ("latent",), ("audio",)),
    }
