"""What a distillation run is (DistillArgs), validated; the LR schedules it may name."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config import register, require
from toolkit.distill.weights import BSA_GAMMA, WEIGHTINGS

LR_DECAYS = ("none", "linear")


@register
@dataclass(frozen=True)
class DistillArgs:
    """What a distillation run is: K rounds halving ``start_steps``, each ``iterations`` AdamW steps."""

    TYPE = "distill_args"
    VERSION = 1

    start_steps: int = 64  # the teacher's sampling steps; round k's student samples in start_steps / 2^k
    rounds: int = 3
    weighting: str = "bsa"
    gamma: float = BSA_GAMMA
    guidance: float | None = None  # the teacher's CFG scale w; None: the teacher's default_guidance
    fold: bool = True  # the student learns the guided prediction (one call per step)
    iterations: int = 1000  # optimizer steps per round
    # Round 0 (Meng et al. 2023 stage one): AdamW steps that fold CFG at the teacher's own step
    # count before the first halving; 0 folds guidance inside round 1 (teacher target guided).
    fold_iterations: int = 0
    # Exponential moving average of the student's weights (0: off). The EMA is what each round
    # writes and what teaches the next round: the raw weights carry the optimizer's noise.
    ema: float = 0.0
    batch_size: int = 16  # global: split across ranks under torchrun
    lr: float = 1e-4
    # Per round: the LR rises linearly over ``warmup`` steps (a fresh AdamW's first updates are
    # sign-like, ~lr per weight whatever the gradient, and the student starts at a loss near 0, so
    # full-size first steps only add noise to the teacher's weights), then stays at ``lr``
    # (``lr_decay="none"``) or falls linearly to 0 at the round's end (``"linear"``).
    warmup: int = 200
    lr_decay: str = "linear"
    seed: int = 0

    def __post_init__(self) -> None:
        n = "DistillArgs"
        require(self.fold_iterations >= 0, n, "fold_iterations", "must be >= 0")
        require(self.fold or self.fold_iterations == 0, n, "fold_iterations",
                "a guidance-folding stage needs fold=True (set fold_iterations to 0 with --no-fold)")
        require(self.rounds >= 1 or (self.rounds == 0 and self.fold_iterations > 0), n, "rounds",
                "must be at least 1 (0 only with fold_iterations > 0: the folding stage alone)")
        require(self.start_steps >= 2 and self.start_steps % 2 ** self.rounds == 0, n, "start_steps",
                f"{self.start_steps} must be a multiple of 2^rounds = {2 ** self.rounds} so that "
                "every round halves the steps exactly")
        require(self.weighting in WEIGHTINGS, n, "weighting",
                f"{self.weighting!r} is not one of {sorted(WEIGHTINGS)}")
        require(self.gamma > 0, n, "gamma", "must be positive")
        require(self.guidance is None or self.guidance >= 0, n, "guidance", "must be >= 0")
        require(self.iterations >= 1, n, "iterations", "must be at least 1")
        require(self.batch_size >= 1, n, "batch_size", "must be at least 1")
        require(self.lr > 0, n, "lr", "must be positive")
        require(self.warmup >= 0, n, "warmup", "must be >= 0")
        require(self.lr_decay in LR_DECAYS, n, "lr_decay",
                f"{self.lr_decay!r} is not one of {list(LR_DECAYS)}")
        require(0.0 <= self.ema < 1.0, n, "ema", "must be in [0, 1): the EMA decay per step, 0 off")

    @property
    def first_round(self) -> int:
        """0 when a guidance-folding stage runs before the halvings, else 1."""
        return 0 if self.fold_iterations else 1

    def student_steps(self, round_index: int) -> int:
        """Sampling steps of the student of round ``round_index`` (1-based; round 0, the folding
        stage, keeps the teacher's steps)."""
        return self.start_steps // 2 ** round_index

    def round_iterations(self, round_index: int) -> int:
        return self.fold_iterations if round_index == 0 else self.iterations

    def lr_at(self, step: int, n_iterations: int) -> float:
        """The learning rate of the round's optimizer step ``step`` (0-based) of ``n_iterations``."""
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.lr_decay == "linear":
            factor *= 1.0 - step / n_iterations
        return self.lr * factor

    def steps_before(self, round_index: int) -> int:
        """Optimizer steps of all rounds before ``round_index`` (for the global step count)."""
        return sum(self.round_iterations(k) for k in range(self.first_round, round_index))
