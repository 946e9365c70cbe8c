"""Full-precision reference inference: encode the vocal, sample with DDIM + CFG, decode.

This is the reference every compressed or compiled model is compared against.
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.checkpoint import Pipeline
from toolkit.diffusion import guided_denoiser, make_table, sample_ddim


def encode_audio(pipeline: Pipeline, audio: torch.Tensor) -> torch.Tensor:
    """Audio (B, C, segment_samples) → the denoiser's latent: VAE posterior mean × latent_scale."""
    return pipeline.vae.encode_latent(audio) * pipeline.config.latent_scale


def decode_latent(pipeline: Pipeline, latent: torch.Tensor) -> torch.Tensor:
    return pipeline.vae.decode(latent / pipeline.config.latent_scale)


def initial_noise(pipeline: Pipeline, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((batch, *pipeline.latent_shape), generator=generator)


@torch.no_grad()
def sample_latent(
    pipeline: Pipeline,
    vocal_latent: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """DDIM over ``steps`` from ``noise``, conditioned on ``vocal_latent`` with CFG scale ``guidance``."""
    table = make_table(pipeline.config.schedule, steps)
    denoise = guided_denoiser(pipeline.denoiser, vocal_latent, guidance,
                              folded=pipeline.config.guidance_folded)
    return sample_ddim(denoise, noise, table)


@torch.no_grad()
def generate_accompaniment(
    pipeline: Pipeline,
    vocals: np.ndarray,
    *,
    steps: int,
    guidance: float,
    seed: int,
    latents: list | None = None,
) -> np.ndarray:
    """Vocals (C, N) at the pipeline's rate → accompaniment (C, N).

    ``latents``: a list that receives each segment's final latent (D, L), for latent-space metrics.

    The denoiser has a fixed latent length, so the vocal is cut into segments of
    ``segment_samples`` (the last one zero-padded), each generated with the next draw of one
    seeded noise stream, and the results are joined and trimmed to the vocal's length.
    """
    channels, n = vocals.shape
    if channels != pipeline.audio_channels:
        raise ValueError(f"vocals have {channels} channels, the model takes {pipeline.audio_channels}")
    seg = pipeline.segment_samples
    n_seg = max(1, -(-n // seg))
    padded = np.zeros((channels, n_seg * seg), dtype=np.float32)
    padded[:, :n] = vocals
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_seg):
        chunk = torch.from_numpy(padded[None, :, i * seg:(i + 1) * seg])
        cond = encode_audio(pipeline, chunk)
        noise = initial_noise(pipeline, 1, generator)
        latent = sample_latent(pipeline, cond, noise, steps=steps, guidance=guidance)
        if latents is not None:
            latents.append(latent[0].numpy())
        out.append(decode_latent(pipeline, latent)[0].numpy())
    return np.concatenate(out, axis=-1)[:, :n]
