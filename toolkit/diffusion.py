"""Diffusion core of seed 000: cosine schedule, v/ε/x0 conversions, v-prediction loss, DDIM + CFG.

Everything here is a small pure function. Time is continuous, t ∈ [0, 1]; the 800 training steps
of seed 000 §V are the grid t = k / 800, k = 1..800. With ᾱ(t) the cosine schedule's cumulative
signal level, α(t) = √ᾱ(t), σ(t) = √(1 − ᾱ(t)) and SNR(t) = α² / σ² = ᾱ / (1 − ᾱ).

The sampler runs over a precomputed table of (t, α, σ): a device reads the same table from a
bundle's manifest and runs the same loop in numpy (``runtime_py``), line by line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from toolkit.config import register, require

# Seed 000 §V: "cosine noise schedule with 800 timesteps", "10% conditioning dropout".
TRAIN_STEPS = 800
COND_DROPOUT = 0.1


@register
@dataclass(frozen=True)
class CosineSchedule:
    """Nichol & Dhariwal's cosine schedule, ᾱ(t) = f(t) / f(0), f(t) = cos²((t + s) / (1 + s) · π/2)."""

    TYPE = "cosine_schedule"
    VERSION = 1

    train_steps: int = TRAIN_STEPS
    offset: float = 0.008  # the "s" of the cosine schedule: keeps σ(t) from vanishing too fast near 0

    def __post_init__(self) -> None:
        require(self.train_steps >= 2, "CosineSchedule", "train_steps", "must be at least 2")
        require(0.0 <= self.offset < 1.0, "CosineSchedule", "offset", "must be in [0, 1)")


def alpha_bar(t: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """ᾱ(t) of the cosine schedule, t ∈ [0, 1] (ᾱ(0) = 1, ᾱ(1) = 0)."""
    s = schedule.offset
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    ft = torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2
    return (ft / f0).clamp(0.0, 1.0)


def alpha_sigma(t: torch.Tensor, schedule: CosineSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t) = √ᾱ(t) and σ(t) = √(1 − ᾱ(t)); α² + σ² = 1."""
    ab = alpha_bar(t, schedule)
    return ab.sqrt(), (1.0 - ab).sqrt()


def snr(t: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """SNR(t) = α² / σ² = ᾱ / (1 − ᾱ) (seed 000 eq. 6's weight w(t))."""
    ab = alpha_bar(t, schedule)
    return ab / (1.0 - ab)


def train_timesteps(schedule: CosineSchedule) -> torch.Tensor:
    """The discrete training grid t_k = k / T, k = 1..T (T = 800 in seed 000)."""
    return torch.arange(1, schedule.train_steps + 1, dtype=torch.float64) / schedule.train_steps


# --- parameterisations (seed 000 eq. 4: v = √ᾱ ε − √(1−ᾱ) x0 = α ε − σ x0) -----------------------


def v_from_x0_eps(x0, eps, alpha, sigma):
    """Seed 000 eq. 4: v_t = α ε − σ x0."""
    return alpha * eps - sigma * x0


def x0_from_v(z, v, alpha, sigma):
    """x0 = α z − σ v (z = α x0 + σ ε is the noisy latent)."""
    return alpha * z - sigma * v


def eps_from_v(z, v, alpha, sigma):
    """ε = σ z + α v."""
    return sigma * z + alpha * v


def v_from_x0_z(z, x0, alpha, sigma):
    """v from a noisy latent and a clean estimate: v = (α z − x0) / σ (σ > 0)."""
    return (alpha * z - x0) / sigma


def diffuse(x0, eps, alpha, sigma):
    """The forward process z_t = α x0 + σ ε."""
    return alpha * x0 + sigma * eps


# --- training loss --------------------------------------------------------------------------------

LOSS_WEIGHTINGS = ("snr", "mse")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def v_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    schedule: CosineSchedule,
    generator: torch.Generator,
    weighting: str = "mse",
    cond_dropout: float = COND_DROPOUT,
    snr_max: float | None = None,
) -> torch.Tensor:
    """v-prediction loss of seed 000: eq. 5 (``mse``) or eq. 6 (``snr``, w(t) = ᾱ / (1 − ᾱ)).

    t is drawn from the 800-step training grid; with probability ``cond_dropout`` (10 %, §V) an
    example's conditioning is replaced by zeros, the null conditioning that classifier-free
    guidance uses at sampling time. Eq. 6's weight grows without bound as t → 0 (SNR ≈ 2·10⁴ at
    t = 1/800); ``snr_max`` clips it when given — the paper states no clip, so the default is none.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    b = x0.shape[0]
    k = torch.randint(1, schedule.train_steps + 1, (b,), generator=generator)
    t = (k.to(torch.float64) / schedule.train_steps).to(torch.float32)
    alpha, sigma = alpha_sigma(t, schedule)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    z = diffuse(x0, eps, _bcast(alpha, x0), _bcast(sigma, x0))
    target = v_from_x0_eps(x0, eps, _bcast(alpha, x0), _bcast(sigma, x0))
    keep = (torch.rand((b,), generator=generator) >= cond_dropout).to(cond.dtype)
    cond = cond * _bcast(keep, cond)
    pred = model(z, t, cond)
    per_example = ((pred - target) ** 2).mean(dim=tuple(range(1, x0.dim())))
    if weighting == "snr":
        w = snr(t, schedule)
        if snr_max is not None:
            w = w.clamp(max=snr_max)
        per_example = per_example * w
    return per_example.mean()


# --- sampling -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerTable:
    """The (t, α, σ) grid a sampler walks, from t = 1 (pure noise) to t = 0; ``steps + 1`` rows."""

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def to_dict(self) -> dict[str, list[float]]:
        return {"t": list(self.t), "alpha": list(self.alpha), "sigma": list(self.sigma)}


def make_table(schedule: CosineSchedule, steps: int) -> SamplerTable:
    """Evenly spaced continuous times 1 = t_0 > … > t_N = 0 with their α, σ (computed in float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alpha, sigma = alpha_sigma(t, schedule)
    # Pin the end points exactly: pure noise at t = 1, the clean sample at t = 0.
    alpha[0], sigma[0], alpha[-1], sigma[-1] = 0.0, 1.0, 1.0, 0.0
    return SamplerTable(tuple(t.tolist()), tuple(alpha.tolist()), tuple(sigma.tolist()))


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    table: SamplerTable,
    *,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with a v-predicting ``denoise(z, t) -> v``.

    Each step: x̂0 = α_i z − σ_i v̂, ε̂ = σ_i z + α_i v̂, z ← α_{i+1} x̂0 + σ_{i+1} ε̂. The last row has
    σ = 0, so the result is the final x̂0. ``callback(i, z, x0_hat)`` sees every step.
    """
    z = x
    for i in range(table.steps):
        t = torch.full((z.shape[0],), table.t[i], dtype=z.dtype)
        v = denoise(z, t)
        x0 = x0_from_v(z, v, table.alpha[i], table.sigma[i])
        eps = eps_from_v(z, v, table.alpha[i], table.sigma[i])
        if callback is not None:
            callback(i, z, x0)
        z = table.alpha[i + 1] * x0 + table.sigma[i + 1] * eps
    return z


SAMPLERS = {"ddim": sample_ddim}


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + w (v_c − v_u) (w = 1: conditional model alone)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guided_denoiser(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    guidance: float,
    *,
    folded: bool = False,
) -> Denoise:
    """A ``denoise(z, t)`` that applies CFG with the zero (null) conditioning as the unconditional.

    Both branches run as one batch of 2B, the way a device runs them. ``folded`` (a distilled
    student that learnt the guided prediction) makes one conditional call per step.
    """
    if folded or guidance == 1.0:
        return lambda z, t: model(z, t, cond)

    null = torch.zeros_like(cond)

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, null]))
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, guidance)

    return denoise
