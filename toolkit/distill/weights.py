"""Loss weights on the x-space MSE as functions of SNR = α² / σ² (seed 003 eqs. 7–10, §3.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

BSA_GAMMA = 5.0  # seed 003 §3.3: "γ ... is set to 5 empirically"


# --- loss weights on the x-space MSE, as functions of SNR = α² / σ² (seed 003 §3.3) ----------------
# One signature, ``weight(snr, *, gamma) -> weight``; eqs. 7 and 8 have no γ and ignore it.


def truncated_snr_weight(snr: torch.Tensor, *, gamma: float = BSA_GAMMA) -> torch.Tensor:
    """Seed 003 eq. 7 (Salimans & Ho's "truncated SNR"): max(SNR, 1)."""
    return torch.clamp(torch.as_tensor(snr), min=1.0)


def snr_plus_one_weight(snr: torch.Tensor, *, gamma: float = BSA_GAMMA) -> torch.Tensor:
    """Seed 003 eq. 8 (Salimans & Ho's "SNR+1", the same loss as an unweighted v-MSE): SNR + 1."""
    return torch.as_tensor(snr) + 1.0


def min_snr_weight(snr: torch.Tensor, *, gamma: float = BSA_GAMMA) -> torch.Tensor:
    """Seed 003 eq. 9 (Hang et al.'s Min-SNR-γ): min(SNR, γ); → 0 as SNR → 0."""
    return torch.clamp(torch.as_tensor(snr), max=gamma)


def bsa_weight(snr: torch.Tensor, *, gamma: float = BSA_GAMMA) -> torch.Tensor:
    """Seed 003 eq. 10 (Balanced SNR-Aware): min(SNR + 1, γ); → 1 at low SNR, γ at high SNR."""
    return torch.clamp(torch.as_tensor(snr) + 1.0, max=gamma)


WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {
    "bsa": bsa_weight,
    "truncated-snr": truncated_snr_weight,
    "snr-plus-one": snr_plus_one_weight,
    "min-snr": min_snr_weight,
}
