"""Seed 003 Algorithm 1 in v-prediction: the teacher's two-step x-target, the guided target, the loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from toolkit.diffusion import (
    CosineSchedule,
    alpha_sigma,
    diffuse,
    guided_denoiser,
    x0_from_v,
)
from toolkit.distill.weights import WEIGHTINGS

# --- Algorithm 1 in v-prediction ----------------------------------------------------------------


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def grid_alpha_sigma(t: torch.Tensor, schedule: CosineSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t), σ(t) in float64 with the end points pinned exactly as :func:`toolkit.diffusion.make_table`
    pins them (pure noise at t = 1, the clean sample at t = 0), so training sees the sampler's table."""
    t = t.to(torch.float64)
    alpha, sigma = alpha_sigma(t, schedule)
    one, zero = t == 1.0, t == 0.0
    alpha = torch.where(one, 0.0, torch.where(zero, 1.0, alpha))
    sigma = torch.where(one, 1.0, torch.where(zero, 0.0, sigma))
    return alpha, sigma


def _grid_index(t: torch.Tensor, n_steps: int) -> torch.Tensor:
    """i with t = i / n_steps, i in 1..n_steps; anything off the student's grid is an error."""
    i = torch.round(t.to(torch.float64) * n_steps)
    if not torch.allclose(i / n_steps, t.to(torch.float64), rtol=0.0, atol=1e-6) or \
            bool((i < 1).any()) or bool((i > n_steps).any()):
        raise ValueError(f"t must lie on the student's grid i / {n_steps}, i = 1..{n_steps}; "
                         f"got {t.tolist()}")
    return i


@torch.no_grad()
def teacher_target(
    teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    schedule: CosineSchedule,
    n_steps: int,
    guidance: float,
    fold: bool,
) -> torch.Tensor:
    """The x-space target x̃ of seed 003 Algorithm 1: two teacher DDIM steps t → t' → t''.

    ``teacher(z, t, cond) -> v``; ``t`` (B,) on the student's grid i / ``n_steps``; t' = t − 0.5/N,
    t'' = t − 1/N. Each step is the DDIM update of :func:`toolkit.diffusion.sample_ddim`
    (x̂ = α z − σ v̂, z' = α' x̂ + σ' ε̂ with ε̂ = σ z + α v̂, i.e. Algorithm 1's
    z' = α' x̂ + (σ'/σ)(z − α x̂)). The target is the x̃ from which one DDIM step lands on z_{t''}:
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t); at the last step (t'' = 0) it
    is the teacher's x̂(z_{t'}) itself.

    ``fold``: the teacher's v is classifier-free guided, v = v_u + w (v_c − v_u) with w = ``guidance``
    and the all-zero null conditioning (w = 1: the conditional call alone, which is what a teacher
    that already folds guidance needs). Without ``fold`` the target is the teacher's own prediction
    for ``cond`` as given (a real or a null conditioning; the student learns both branches), and
    ``guidance`` must be 1.
    """
    if not fold and guidance != 1.0:
        raise ValueError(f"without fold the teacher is not guided (the student keeps CFG); pass "
                         f"guidance=1.0, got {guidance}")
    i = _grid_index(t, n_steps)
    times = (i / n_steps, (i - 0.5) / n_steps, (i - 1.0) / n_steps)  # t, t', t''
    (a0, s0), (a1, s1), (a2, s2) = (grid_alpha_sigma(tt, schedule) for tt in times)
    denoise = guided_denoiser(teacher, cond, guidance)

    def ddim_step(z, tt, a, s, a_next, s_next):
        v = denoise(z, tt.to(z.dtype))
        x0 = x0_from_v(z, v, _bcast(a, z), _bcast(s, z))
        eps = _bcast(s, z) * z + _bcast(a, z) * v  # ε̂ = σ z + α v̂
        return x0, _bcast(a_next, z) * x0 + _bcast(s_next, z) * eps

    _, z_mid = ddim_step(z_t, times[0], a0, s0, a1, s1)
    x_mid, z_next = ddim_step(z_mid, times[1], a1, s1, a2, s2)
    ratio = s2 / s0  # σ_t > 0 on the grid (t ≥ 1/N)
    x_tilde = (z_next - _bcast(ratio, z_t) * z_t) / _bcast(a2 - ratio * a0, z_t)
    # t'' = 0: the formula reduces to z_{t''} = x̂(z_{t'}); take it directly, as Algorithm 1 does.
    last = (i == 1).reshape(-1, *([1] * (z_t.dim() - 1)))
    return torch.where(last, x_mid, x_tilde)


@torch.no_grad()
def guided_target(
    teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    schedule: CosineSchedule,
    guidance: float,
) -> torch.Tensor:
    """The x-space target of guidance folding (Meng et al. 2023 stage one, in v-prediction):
    x̃ = α z_t − σ ṽ with ṽ = v_u + w (v_c − v_u), the teacher's guided prediction at the same t."""
    alpha, sigma = grid_alpha_sigma(t, schedule)
    v = guided_denoiser(teacher, cond, guidance)(z_t, t.to(z_t.dtype))
    return x0_from_v(z_t, v, _bcast(alpha, z_t), _bcast(sigma, z_t))


def distill_loss(
    student: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    teacher: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    schedule: CosineSchedule,
    n_steps: int,
    guidance: float,
    fold: bool,
    weighting: str,
    gamma: float,
    fold_only: bool = False,
) -> torch.Tensor:
    """weight(SNR_t) · ‖x̂_θ(z_t) − x̃‖² averaged over the batch (seed 003 Algorithm 1).

    z_t = α x0 + σ ε; the student's x̂ = α z_t − σ v̂ from one conditional call. Without ``fold``
    every example is also trained with the null conditioning (and the teacher's unguided target for
    it), so the student keeps both branches for CFG at sampling time. ``fold_only`` (round 0): the
    target is the teacher's guided x̂ at the same t (:func:`guided_target`), not two DDIM steps.
    """
    if fold_only and not fold:
        raise ValueError("fold_only (the guidance-folding stage) needs fold=True")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    alpha, sigma = grid_alpha_sigma(_grid_index(t, n_steps) / n_steps, schedule)  # t = i / N exactly
    z = diffuse(x0, eps, _bcast(alpha, x0), _bcast(sigma, x0))
    if not fold:
        z, t, cond = torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)])
        alpha, sigma = torch.cat([alpha, alpha]), torch.cat([sigma, sigma])
    if fold_only:
        target = guided_target(teacher, z, t, cond, schedule=schedule, guidance=guidance)
    else:
        target = teacher_target(teacher, z, t, cond, schedule=schedule, n_steps=n_steps,
                                guidance=guidance, fold=fold)
    v = student(z, t, cond)
    x_hat = x0_from_v(z, v, _bcast(alpha, z), _bcast(sigma, z))
    weight = WEIGHTINGS[weighting](alpha**2 / sigma**2, gamma=gamma).to(z.dtype)
    per_example = ((x_hat - target) ** 2).mean(dim=tuple(range(1, z.dim())))
    return (weight * per_example).mean()
