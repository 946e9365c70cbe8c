"""Calibration inputs of each deployable component, in its export signature, from a calibration set.

What a target's quantizer observes: the PTQ4ADM intermediates for the denoiser, and for the VAE
decoder the final latents that full-precision sampling produces from the set's conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from calibration.fakequant import denoiser_feeds
from calibration.sampling import load_calibration_set
from toolkit.checkpoint import Pipeline
from toolkit.components import denoiser_batch
from toolkit.generate import sample_latent

MAX_CALIBRATION_FEEDS = 128  # calibration inputs per component (intermediates beyond are not used)
DECODER_CALIBRATION_EXAMPLES = 16  # final latents sampled for the VAE decoder's calibration


def calibration_feeds(pipeline: Pipeline, calib_dir: Path, component: str, *,
                      limit: int = MAX_CALIBRATION_FEEDS) -> list[tuple[torch.Tensor, ...]]:
    """Calibration inputs of one component, in its export signature, from a calibration set.

    denoiser: the PTQ4ADM intermediates (x_t, t, cond), both CFG branches per call when the
    model is not folded; vae_decoder: the final latents of full-precision sampling from the set's
    conditioning examples and stored noise (what the decoder sees on the device).
    """
    calib = load_calibration_set(Path(calib_dir))
    if tuple(calib.manifest["latent_shape"]) != tuple(pipeline.latent_shape):
        raise ValueError(f"{calib_dir}: calibration set latents {calib.manifest['latent_shape']} do not "
                         f"match the model's {list(pipeline.latent_shape)}; calibrate this checkpoint")
    if component == "denoiser":
        return denoiser_feeds(calib, batch=denoiser_batch(pipeline), limit=limit,
                              folded=pipeline.config.guidance_folded)
    if component == "vae_decoder":
        n = min(DECODER_CALIBRATION_EXAMPLES, calib.conditioning.shape[0])
        latents = sample_latent(pipeline, calib.conditioning[:n], calib.noise[:n],
                                steps=int(calib.manifest["steps"]), guidance=float(calib.manifest["guidance"]))
        return [(latents[i:i + 1],) for i in range(n)]
    raise ValueError(f"{component}: no calibration inputs for this component (the calibration set holds "
                     "latents); keep it float by leaving it out of the plan")
