"""Model families: what a checkpoint's ``family`` field names, and the protocol every verb relies on.

A family pairs a denoiser with an autoencoder. :data:`FAMILIES` maps the ``family`` field of
``pipeline.json`` to the classes that build both from their configs; a checkpoint of an unknown
family is an error naming the field and the known families.

The denoiser protocol
---------------------
Everything after training (calibrate, sensitivity, plan, export, verify) speaks to a denoiser only
through this, so a second family plugs in without touching calibration, targets or the runtime:

* **Forward:** ``denoiser(x, t, cond) -> v`` with ``x`` the noisy latent ``(B, D, L)`` float32,
  ``t`` the diffusion time ``(B,)`` in [0, 1] (the cosine schedule's continuous time), ``cond``
  the conditioning latent ``(B, D, L)`` — the VAE latent of the reference vocal, all zeros for the
  unconditional branch of classifier-free guidance — and ``v`` of the shape of ``x``.
* **Parameterization:** v-prediction (seed 000 eq. 4): x̂0 = α z − σ v̂, ε̂ = σ z + α v̂; the sampler
  table in a bundle is (t, α, σ) per step and nothing else.
* **Latent shape:** ``denoiser.config.latent_shape == (D, L)``, ``latent_channels == D`` equal to
  the autoencoder's ``latent_dim``; ``L × autoencoder.config.downsampling`` audio samples per call.
* **Schedule:** ``denoiser.config.schedule_offset`` equals the pipeline's.
* **Quantizable layers:** the leaves of the types in :data:`QUANTIZABLE_TYPES`, named by FQN;
  plans and targets see nothing else, and a weighted leaf of any other type is an error that names
  it (:func:`unquantizable_weighted_layers`), never silently left float.

The autoencoder protocol: ``.encoder(audio (1, C, S)) -> (1, 2D, L)`` (posterior mean and scale
halves), ``.decoder(latent (1, D, L)) -> audio (1, C, S)``, ``config.sample_rate``,
``config.audio_channels``, ``config.downsampling``, ``config.latent_dim``; the family's
``fold_autoencoder`` returns a copy ready for export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# The layer types a plan can set a precision for (weights, and the activations feeding them).
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# Leaves whose weights are not a plan's business (normalisation scales, 1-D by construction).
_NOT_WEIGHTED = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d)


@dataclass(frozen=True)
class ModelFamily:
    """One row of the family registry (see the module doc for the protocol the classes follow).

    ``keep_high``: FQN patterns (full match) of the denoiser layers that a preset keeps at high
    precision (first and last convolutions, attention); ``attention_types``: modules besides the
    quantizable leaves whose outputs PTQ4ADM's Algorithm 2 watches.
    """

    name: str
    denoiser_config: type
    denoiser: Callable[..., nn.Module]
    autoencoder_config: type
    autoencoder: Callable[..., nn.Module]
    fold_autoencoder: Callable[[nn.Module], nn.Module]
    keep_high: tuple[str, ...] = ()
    attention_types: tuple[type[nn.Module], ...] = ()


def _softalign_oobleck() -> ModelFamily:
    from toolkit.models.oobleck import OobleckConfig, OobleckVAE, fold_for_export
    from toolkit.models.softalign import CrossAttention, SoftAlignAttention, SoftAlignConfig, SoftAlignUNet

    return ModelFamily(
        name="softalign-oobleck",
        denoiser_config=SoftAlignConfig, denoiser=SoftAlignUNet,
        autoencoder_config=OobleckConfig, autoencoder=OobleckVAE, fold_autoencoder=fold_for_export,
        keep_high=(
            r"conv_in",  # first conv of the denoiser
            r"vocal\.conv_in",  # first conv of the conditioning stream
            r"conv_out",  # last conv
            r"attn(\..*)?",  # soft alignment attention (bottleneck)
            r".*\.cross(\..*)?",  # cross-attention to the vocal
        ),
        attention_types=(SoftAlignAttention, CrossAttention),
    )


FAMILIES: dict[str, Callable[[], ModelFamily]] = {"softalign-oobleck": _softalign_oobleck}
DEFAULT_FAMILY = "softalign-oobleck"


def register_family(name: str, factory: Callable[[], ModelFamily]) -> None:
    """Make ``name`` loadable from a checkpoint's ``family`` field (``factory`` builds the row lazily)."""
    FAMILIES[name] = factory


def get_family(name: str) -> ModelFamily:
    """The registry row of ``name``; a KeyError listing the known families otherwise."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))} "
                       "(a new family registers with toolkit.families.register_family)")
    family = FAMILIES[name]()
    if family.name != name:
        raise ValueError(f"family factory for {name!r} built a family named {family.name!r}")
    return family


def quantizable_leaves(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The :data:`QUANTIZABLE_TYPES` leaves under ``module`` by FQN (``module`` itself if one)."""
    if isinstance(module, QUANTIZABLE_TYPES):
        return {prefix: module}
    return {f"{prefix}.{n}" if prefix else n: m for n, m in module.named_modules()
            if n and isinstance(m, QUANTIZABLE_TYPES)}


def unquantizable_weighted_layers(module: nn.Module) -> list[str]:
    """FQN and type of every leaf holding a weight of two or more dimensions that no plan can see."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, QUANTIZABLE_TYPES) or isinstance(m, _NOT_WEIGHTED) or list(m.children()):
            continue
        weights = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if weights:
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def check_quantizable(module: nn.Module, *, source: str) -> None:
    """Refuse a model whose weighted layers a plan cannot see, naming them."""
    hidden = unquantizable_weighted_layers(module)
    if hidden:
        raise TypeError(f"{source}: {len(hidden)} weighted layers are of types a plan cannot quantize: "
                        f"{hidden[:5]}; quantizable types are "
                        f"{', '.join(t.__name__ for t in QUANTIZABLE_TYPES)} (express them as those, or "
                        "add the type to toolkit.families.QUANTIZABLE_TYPES with a lowering in every target)")
