"""The three deployable components of a pipeline, as plain modules with fixed tensor signatures.

What a device runs, and what every target exports:

| component     | inputs                                   | output                         |
| ------------- | ---------------------------------------- | ------------------------------ |
| `vae_encoder` | audio (1, C, segment_samples)            | latent (1, D, L) — mean × scale |
| `denoiser`    | x (B, D, L), t (B,), cond (B, D, L)      | v (B, D, L)                    |
|               | [+ comp_idx (K,) int64 with LiteFocus]   |                                |
| `vae_decoder` | latent (1, D, L)                         | audio (1, C, segment_samples)  |

B is 2 when classifier-free guidance runs both branches in one call, 1 when guidance is folded
into a distilled student. L is the training length unless a bundle is exported for ``frames``
(long audio: the whole latent in one pass); with LiteFocus (seed 002) beyond the training length,
the denoiser takes its compensation set C as a fourth input, drawn per call on the device
(``runtime_py.compensation``; :func:`attention_record` is what the manifest says about it). The latent scale is folded into the encoder and decoder, so the device
loop needs nothing but the sampler table. The VAE is folded by its family's ``fold_autoencoder``
(Oobleck: weight norm and Snake exponentials) so that XNNPACK takes it as one delegate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime_py.bundle import COMPONENTS  # noqa: F401  (the one list of components, device side)
from runtime_py.compensation import HASH, compensation_count
from toolkit.checkpoint import Pipeline
from toolkit.models.litefocus import LiteFocusConfig, compensation_indices

# Name of the denoiser's compensation-index input in a LiteFocus bundle.
COMPENSATION_INPUT = "comp_idx"


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


class LiteFocusDenoiserExport(nn.Module):
    """The denoiser with LiteFocus global attention; C (int64 bottleneck-frame indices) an input."""

    def __init__(self, denoiser: nn.Module, litefocus: LiteFocusConfig):
        super().__init__()
        self.denoiser = denoiser
        self.litefocus = litefocus

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                comp_idx: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, cond, comp_idx, litefocus=self.litefocus)


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


def check_export_length(pipeline: Pipeline, frames: int, litefocus: LiteFocusConfig | None) -> None:
    """Raise unless the components can be exported at ``frames`` latent frames with ``litefocus``."""
    den, length = pipeline.denoiser, pipeline.latent_shape[1]
    if frames != length and not hasattr(den, "prepare_length"):
        raise ValueError(f"frames: the {pipeline.config.family} denoiser runs at its training length "
                         f"({length} latent frames) only; export without --frames/--seconds")
    if frames != length:
        den.check_length(frames)
    if litefocus is None:
        return
    if not hasattr(den, "prepare_length"):
        raise ValueError(f"attention: LiteFocus applies to SoftAlign denoisers, not the "
                         f"{pipeline.config.family} family; export with --attention dense")
    if frames <= length:
        raise ValueError(f"attention: LiteFocus is dense attention up to the training length ({length} "
                         f"latent frames), so a bundle at {frames} would not use it; pass --frames above "
                         f"{length} (or --seconds) or --attention dense")
    keys = frames // den.config.downsampling
    if compensation_count(keys, litefocus.ratio) < 1:
        raise ValueError(f"compensation: r={litefocus.ratio} draws no key of {keys} bottleneck frames "
                         f"(floor(r*{keys}) = 0); a bundle needs at least one: raise --compensation")


def attention_record(pipeline: Pipeline, frames: int, litefocus: LiteFocusConfig | None) -> dict:
    """The manifest's ``attention`` field: the mode, and for LiteFocus how a device draws C per call."""
    if litefocus is None:
        return {"mode": "dense"}
    den = pipeline.denoiser
    keys = frames // den.config.downsampling
    count = compensation_count(keys, litefocus.ratio)
    return {
        "mode": "litefocus", "ratio": litefocus.ratio,
        "band": den.config.bottleneck_length // 2 if litefocus.band is None else litefocus.band,
        "lags": list(litefocus.lags), "structured": litefocus.structured,
        "dense_up_to_frames": pipeline.latent_shape[1],
        "compensation": {
            "component": "denoiser", "input": COMPENSATION_INPUT, "dtype": "int64", "shape": [count],
            "keys": keys, "count": count, "seed": litefocus.seed, "hash": HASH,
            "call": "0-based index of the denoiser call within one generation (= the DDIM step; "
                    "CFG's two branches are one batch-2 call and share it)",
            "how": "runtime_py.compensation.draw_indices(keys, count, seed=seed, call=call) "
                   "(native/compensation.cpp the same): the count keys of smallest "
                   "mix(j ^ mix(mix(seed) ^ call*0x9E3779B9)), ascending, all mod 2^32",
        },
    }


def component_specs(pipeline: Pipeline, *, seed: int = 0, frames: int | None = None,
                    litefocus: LiteFocusConfig | None = None) -> dict[str, ComponentSpec]:
    """The three components of ``pipeline`` with seeded example inputs of the deployed shapes.

    ``frames``: latent frames the components run at (default: the training length); ``litefocus``:
    the denoiser's global attention runs as LiteFocus and takes C (call 0's draw as the example).
    """
    g = torch.Generator().manual_seed(seed)
    vae = pipeline.family.fold_autoencoder(pipeline.vae).eval()
    scale = pipeline.config.latent_scale
    d, length = pipeline.latent_shape
    frames = length if frames is None else frames
    check_export_length(pipeline, frames, litefocus)
    if frames != length:
        pipeline.denoiser.prepare_length(frames)  # RoPE and window tables as graph constants
    samples = pipeline.segment_samples // length * frames
    b = denoiser_batch(pipeline)
    audio = 0.1 * torch.randn(1, pipeline.audio_channels, samples, generator=g)
    den_inputs = (torch.randn(b, d, frames, generator=g), torch.rand(b, generator=g),
                  torch.randn(b, d, frames, generator=g))
    den_names = ("x", "t", "cond")
    den_module = pipeline.denoiser.eval()
    if litefocus is not None:
        keys = frames // pipeline.denoiser.config.downsampling
        den_inputs += (compensation_indices(keys, litefocus.ratio, seed=litefocus.seed, call=0),)
        den_names += (COMPENSATION_INPUT,)
        den_module = LiteFocusDenoiserExport(pipeline.denoiser, litefocus).eval()
    return {
        "vae_encoder": ComponentSpec("vae_encoder", VAEEncoderExport(vae, scale).eval(), (audio,),
                                     ("audio",), ("latent",)),
        "denoiser": ComponentSpec("denoiser", den_module, den_inputs, den_names, ("v",)),
        "vae_decoder": ComponentSpec("vae_decoder", VAEDecoderExport(vae, scale).eval(),
                                     (torch.randn(1, d, frames, generator=g),), ("latent",), ("audio",)),
    }
