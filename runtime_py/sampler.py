"""The device's sampling loop in numpy: DDIM (η = 0) over the manifest's (t, α, σ) table, with CFG.

Line for line the loop of ``toolkit.diffusion.sample_ddim``; a test checks they agree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def sample_ddim(
    denoise: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    table: dict,
    *,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
    """x̂0 = α_i z − σ_i v̂, ε̂ = σ_i z + α_i v̂, z ← α_{i+1} x̂0 + σ_{i+1} ε̂, for i = 0..N−1."""
    t, alpha, sigma = table["t"], table["alpha"], table["sigma"]
    z = x
    for i in range(len(t) - 1):
        v = denoise(z, np.full((z.shape[0],), t[i], dtype=z.dtype))
        x0 = alpha[i] * z - sigma[i] * v
        eps = sigma[i] * z + alpha[i] * v
        if callback is not None:
            callback(i, z, x0)
        z = (alpha[i + 1] * x0 + sigma[i + 1] * eps).astype(x.dtype)
    return z


def guided(
    run_denoiser: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    cond: np.ndarray,
    guidance: float,
    *,
    folded: bool,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """CFG v = v_u + w (v_c − v_u), both branches in one batch-2 call; one call when folded."""
    if folded:
        return lambda z, t: run_denoiser(z, t, cond)
    null = np.zeros_like(cond)

    def denoise(z: np.ndarray, t: np.ndarray) -> np.ndarray:
        v = run_denoiser(np.concatenate([z, z]), np.concatenate([t, t]), np.concatenate([cond, null]))
        v_cond, v_uncond = v[: z.shape[0]], v[z.shape[0]:]
        return v_uncond + guidance * (v_cond - v_uncond)

    return denoise
