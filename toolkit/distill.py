"""Progressive distillation with the Balanced SNR-Aware loss weight (seed 003), CFG folded in.

A student initialised from the teacher learns to take in one DDIM step what the teacher takes in
two (seed 003 Algorithm 1, Salimans & Ho 2022 adapted to v-prediction); it then becomes the next
teacher and the number of sampling steps halves, round after round. With ``fold`` the teacher's
classifier-free-guided prediction is the target, so the student makes one conditional call per
step where the teacher made two (Meng et al. 2023); without it the student learns the conditional
and the unconditional branch and keeps CFG at sampling time. Folding can also be its own stage
before the halvings (``fold_iterations``, Meng et al. 2023 stage one, "round 0"): the student keeps
the teacher's step count and regresses the guided x̂ from the conditional call alone; the rounds
then distil that folded model, one call per teacher step.

Time is continuous as in :mod:`toolkit.diffusion`: a student of N steps samples on t = i / N and is
trained at those times only; its teacher's two steps go t → t − 0.5/N → t − 1/N. The x-space MSE
is weighted by a function of SNR(t) = α² / σ² (seed 003 eqs. 7–10, :data:`WEIGHTINGS`).

Runs under ``torchrun`` unchanged: with WORLD_SIZE > 1 the process group is initialised from the
environment (gloo on CPU, NCCL on GPU), the student is wrapped in DistributedDataParallel, every
rank draws the same global batch from one seeded stream and keeps its own slice (so a run on R
ranks takes the same steps as a run on one), and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.checkpoint import Pipeline, load_checkpoint, save_checkpoint
from toolkit.config import register, require
from toolkit.diffusion import CosineSchedule, alpha_sigma, diffuse, guided_denoiser, x0_from_v
from toolkit.fingerprint import module_digest, tree_digest
from toolkit.training import save_state

STATE_FILE = "distill_state.pt"
LATENTS_FILE = "latents.pt"
BSA_GAMMA = 5.0  # seed 003 §3.3: "γ ... is set to 5 empirically"
GRAD_CLIP = 1.0  # as in toolkit.training
LR_DECAYS = ("none", "linear")


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


# --- data -------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent_pairs(pipeline: Pipeline, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocal, accompaniment) latents of every whole ``segment_samples`` segment of every track,
    through ``toolkit.generate.encode_audio`` (VAE mean × latent_scale), the denoiser's inputs."""
    from toolkit.generate import encode_audio
    from toolkit.training import load_audio_set

    tracks = load_audio_set(Path(data_dir), sample_rate=pipeline.sample_rate,
                            channels=pipeline.audio_channels)
    seg = pipeline.segment_samples
    vocals, accs = [], []
    for track in tracks:
        starts = range(0, track.num_samples - seg + 1, seg)
        if not starts:
            continue
        v = torch.from_numpy(np.stack([track.vocals[:, s:s + seg] for s in starts])).float()
        a = torch.from_numpy(np.stack([track.accompaniment[:, s:s + seg] for s in starts])).float()
        vocals.append(encode_audio(pipeline, v)); accs.append(encode_audio(pipeline, a))
    if not vocals:
        raise ValueError(f"{data_dir}: no track is at least one segment ({seg} samples, "
                         f"{seg / pipeline.sample_rate:.3f} s) long")
    return torch.cat(vocals), torch.cat(accs)


def cached_latents(pipeline: Pipeline, data_dir: Path, state_dir: Path, *,
                   write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents of ``data_dir``, encoded once and kept in ``state_dir/latents.pt`` (keyed by the
    data folder, the VAE weights, the segment length and the latent scale)."""
    key = {"data": str(Path(data_dir).resolve()), "vae_sha256": module_digest(pipeline.vae),
           "segment_samples": pipeline.segment_samples, "latent_scale": pipeline.config.latent_scale}
    path = state_dir / LATENTS_FILE
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return cached["vocals"], cached["accompaniment"]
    vocals, accs = encode_latent_pairs(pipeline, Path(data_dir))
    if write:
        save_state(state_dir, {"key": key, "vocals": vocals, "accompaniment": accs}, name=LATENTS_FILE)
    return vocals, accs


# --- distributed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return float(value.detach())


def _init_distributed(device: str | None) -> _Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
    if world <= 1:
        return _Dist(0, 1, dev, False)
    import torch.distributed as dist

    if cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


# --- the loop ---------------------------------------------------------------------------------------


def _round_dir(out_dir: Path, round_index: int, steps: int) -> Path:
    return out_dir / f"round-{round_index}-{steps}steps"


def distill(
    teacher: Pipeline,
    data_dir: Path,
    out_dir: Path,
    args: DistillArgs,
    *,
    state_dir: Path | None = None,
    save_every: int = 100,
    show_progress: bool = True,
    stop_at: int | None = None,
    provenance: dict | None = None,
    device: str | None = None,
) -> list[Path] | None:
    """Run ``args.rounds`` rounds of progressive distillation from ``teacher``; return the checkpoints.

    Round k (1-based) trains a student of ``start_steps / 2^k`` steps, initialised from the previous
    round's student (round 1: from ``teacher``), for ``args.iterations`` AdamW steps, and writes
    ``out_dir/round-<k>-<steps>steps/``: a complete checkpoint with the teacher's VAE,
    ``default_steps`` = the student's steps, ``guidance_folded`` = ``args.fold`` and the round,
    weighting, γ, iterations and losses in its provenance. With ``args.fold_iterations`` a round 0
    comes first: ``round-0-<start_steps>steps/``, the teacher with CFG folded in (same steps).

    Resumable: the student, optimizer, RNG, round and step go to ``state_dir/distill_state.pt``
    (default ``<out_dir>-state``) every ``save_every`` steps and at each round's end; a rerun with
    the same arguments continues from there. ``stop_at`` ends this run after that global step
    (counted over all rounds; state saved) and returns None. Under torchrun only rank 0 writes.
    """
    dist = _init_distributed(device)
    try:
        return _distill(teacher, Path(data_dir), Path(out_dir), args, dist=dist,
                        state_dir=Path(state_dir or f"{out_dir}-state"), save_every=save_every,
                        show_progress=show_progress, stop_at=stop_at, provenance=provenance or {})
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _distill(teacher: Pipeline, data_dir: Path, out_dir: Path, args: DistillArgs, *, dist: _Dist,
             state_dir: Path, save_every: int, show_progress: bool, stop_at: int | None,
             provenance: dict) -> list[Path] | None:
    from toolkit.training import progress

    if args.batch_size % dist.world:
        raise ValueError(f"batch_size {args.batch_size} is the global batch; it must be divisible "
                         f"by the number of processes ({dist.world})")
    if teacher.config.guidance_folded and not args.fold:
        raise ValueError("the teacher already folds guidance into one call; its student cannot "
                         "unfold it: distill with fold (--fold)")
    if teacher.config.guidance_folded and args.fold_iterations:
        raise ValueError("the teacher already folds guidance; drop the folding stage "
                         "(--fold-iterations 0)")
    guidance = teacher.config.default_guidance if args.guidance is None else float(args.guidance)
    schedule = teacher.config.schedule
    writer = dist.rank == 0
    t_start = time.time()
    arg_dict = {**dataclasses.asdict(args), "guidance": guidance,
                "data": str(data_dir.resolve()), "data_sha256": tree_digest(data_dir),
                "teacher": str(teacher.path.resolve()) if teacher.path is not None else None,
                "teacher_sha256": module_digest(teacher.denoiser)}

    state_path = state_dir / STATE_FILE
    state = torch.load(state_path, weights_only=False, map_location=dist.device) \
        if state_path.is_file() else None
    if state is not None and state["args"] != arg_dict:
        changed = sorted(k for k in set(arg_dict) | set(state["args"])
                         if arg_dict.get(k) != state["args"].get(k))
        raise ValueError(f"{state_path}: saved with different arguments ({', '.join(changed)}); "
                         "rerun with the same arguments to resume, or remove the state directory "
                         "to start over")
    if state is None and out_dir.is_dir() and any(out_dir.glob("round-*")):
        raise FileExistsError(f"{out_dir} holds checkpoints of an earlier run and {state_path} is "
                              "missing; choose another --out or remove it")

    # Latents: rank 0 encodes (or reads the cache); the others read what it wrote.
    if writer:
        vocal_lat, acc_lat = cached_latents(teacher, data_dir, state_dir)
    dist.barrier()
    if not writer:
        vocal_lat, acc_lat = cached_latents(teacher, data_dir, state_dir, write=False)
    vocal_lat, acc_lat = vocal_lat.to(dist.device), acc_lat.to(dist.device)
    n_examples = vocal_lat.shape[0]
    latent_shape = tuple(vocal_lat.shape[1:])

    teacher_model = copy.deepcopy(teacher.denoiser).to(dist.device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    round_index, step, losses, written = args.first_round, 0, [], []
    if state is not None:
        round_index, step, losses = state["round"], state["step"], state["losses"]
        written = [Path(p) for p in state["written"]]
        gen.set_state(state["torch_rng"].cpu())
        teacher_model.load_state_dict(state["teacher"])
    teacher_model.requires_grad_(False)

    def new_student(weights: dict | None, opt_state: dict | None, ema_weights: dict | None):
        student = copy.deepcopy(teacher_model).train().requires_grad_(True)
        if weights is not None:
            student.load_state_dict(weights)
        # No weight decay: it would pull the student away from the teacher it starts as.
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        # The EMA starts where the student starts (the teacher's weights).
        ema = copy.deepcopy(teacher_model).eval().requires_grad_(False) if args.ema else None
        if ema is not None and ema_weights is not None:
            ema.load_state_dict(ema_weights)
        return student, opt, ema

    if round_index <= args.rounds:
        student, opt, ema = (new_student(state["model"], state["optimizer"], state.get("ema"))
                             if state is not None else new_student(None, None, None))

    def save(round_k: int, step_k: int) -> None:
        if writer:
            save_state(state_dir, {
                "round": round_k, "step": step_k, "losses": losses, "args": arg_dict,
                "written": [str(p) for p in written], "torch_rng": gen.get_state(),
                "teacher": teacher_model.state_dict(),
                "model": student.state_dict() if round_k <= args.rounds else None,
                "optimizer": opt.state_dict() if round_k <= args.rounds else None,
                "ema": ema.state_dict() if ema is not None and round_k <= args.rounds else None,
            }, name=STATE_FILE)

    local = slice(dist.rank * args.batch_size // dist.world,
                  (dist.rank + 1) * args.batch_size // dist.world)
    while round_index <= args.rounds:
        n_student = args.student_steps(round_index)
        n_iterations = args.round_iterations(round_index)
        fold_only = round_index == 0
        # A teacher that already predicts the guided v (an earlier folded round, or a folded
        # checkpoint given as the teacher) is called once: CFG at w = 1.
        teacher_folded = teacher.config.guidance_folded or (
            args.fold and round_index > args.first_round)
        teacher_guidance = guidance if args.fold and not teacher_folded else 1.0
        model = student
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        what = (f"fold CFG at {n_student} steps" if fold_only
                else f"{2 * n_student}→{n_student} steps")
        bar = progress(n_iterations, step, f"distill round {round_index}/{args.rounds} ({what})",
                       show_progress and writer)
        round_t0 = time.time()
        while step < n_iterations:
            # Every rank draws the same global batch from the one seeded stream, then keeps its slice.
            idx = torch.randint(0, n_examples, (args.batch_size,), generator=gen)
            i = torch.randint(1, n_student + 1, (args.batch_size,), generator=gen)
            eps = torch.randn((args.batch_size, *latent_shape), generator=gen)
            idx, i, eps = idx[local].to(dist.device), i[local], eps[local].to(dist.device)
            t = (i.to(torch.float64) / n_student).to(torch.float32).to(dist.device)
            loss = distill_loss(model, teacher_model, acc_lat[idx], vocal_lat[idx], t, eps,
                                schedule=schedule, n_steps=n_student, guidance=teacher_guidance,
                                fold=args.fold, weighting=args.weighting, gamma=args.gamma,
                                fold_only=fold_only)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
            for group in opt.param_groups:  # a function of the step alone, so resume needs no state
                group["lr"] = args.lr_at(step, n_iterations)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, w in zip(ema.parameters(), student.parameters()):
                        e.lerp_(w, 1.0 - args.ema)
                    for e, w in zip(ema.buffers(), student.buffers()):
                        e.copy_(w)
            step += 1
            losses.append(dist.mean(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            global_step = args.steps_before(round_index) + step
            if step % save_every == 0 or step == n_iterations or global_step == stop_at:
                save(round_index, step)
            if global_step == stop_at:
                bar.close()
                dist.barrier()
                return None
        bar.close()

        path = _round_dir(out_dir, round_index, n_student)
        trained = ema if ema is not None else student  # what the round writes and teaches with
        if writer:
            student_cpu = copy.deepcopy(trained).cpu().eval()
            config = dataclasses.replace(
                teacher.config,
                name=f"{teacher.config.name}-distilled-{n_student}steps",
                default_steps=n_student,
                default_guidance=guidance,
                guidance_folded=args.fold,
                provenance={
                    "distilled_with": "toolkit distill",
                    "method": ("guidance distillation, Meng et al. 2023 stage one (v-prediction)"
                               if fold_only else
                               "progressive distillation, seed 003 Algorithm 1 (v-prediction)"),
                    "round": round_index, "rounds": args.rounds,
                    "teacher_steps": n_student if fold_only else 2 * n_student,
                    "student_steps": n_student,
                    "weighting": args.weighting, "gamma": args.gamma, "guidance": guidance,
                    "fold": args.fold, "iterations": n_iterations, "ema": args.ema,
                    "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                    "lr_decay": args.lr_decay, "seed": args.seed,
                    "examples": n_examples, "world_size": dist.world,
                    "loss_first_100": float(np.mean(losses[:100])),
                    "loss_last_100": float(np.mean(losses[-100:])),
                    "wall_time_s_last_run": round(time.time() - round_t0, 1),
                    "args": arg_dict,
                    "teacher_provenance": (teacher.config.provenance
                                           if round_index == args.first_round else None),
                    **provenance,
                },
            )
            save_checkpoint(path, Pipeline(config=config, denoiser=student_cpu, vae=teacher.vae),
                            overwrite=True)
        written.append(path)
        # The student becomes the next teacher; the next student starts from it with a fresh AdamW.
        teacher_model.load_state_dict(trained.state_dict())
        round_index, step, losses = round_index + 1, 0, []
        if round_index <= args.rounds:
            student, opt, ema = new_student(None, None, None)
        save(round_index, step)
        dist.barrier()
    if writer and show_progress:
        print(f"distill: {len(written)} rounds in {time.time() - t_start:.0f} s (this run)",
              file=sys.stderr)
    return written


# --- the ``distill`` verb -------------------------------------------------------------------------


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher checkpoint directory (default: the embedded demo)")
    p.add_argument("--data", type=Path, required=True,
                   help="stems folder; encoded once with the teacher's VAE and cached")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for round-<k>-<steps>steps/ checkpoints (state in <out>-state)")
    p.add_argument("--start-steps", type=int, default=64,
                   help="the teacher's sampling steps; each round halves them")
    p.add_argument("--rounds", type=int, default=3,
                   help="halvings: more rounds, fewer steps, more drift from the teacher")
    p.add_argument("--weighting", choices=sorted(WEIGHTINGS), default="bsa",
                   help="loss weight on the x-MSE: bsa min(SNR+1,γ) (seed 003 eq. 10), "
                        "truncated-snr max(SNR,1) (eq. 7), snr-plus-one SNR+1 (eq. 8), "
                        "min-snr min(SNR,γ) (eq. 9, weight 0 at pure noise)")
    p.add_argument("--gamma", type=float, default=BSA_GAMMA,
                   help="cap γ of bsa / min-snr: lower puts less weight on low-noise steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="teacher CFG scale w (default: the teacher's default_guidance)")
    p.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                   help="fold CFG into the student (one denoiser call per step instead of two); "
                        "--no-fold keeps CFG adjustable at sampling time at twice the cost")
    p.add_argument("--iterations", type=int, default=1000, help="optimizer steps per round")
    p.add_argument("--fold-iterations", type=int, default=0,
                   help="fold CFG first, as its own round 0 at the teacher's step count (Meng et "
                        "al. 2023 stage one), for this many steps; 0 folds it inside round 1")
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200,
                   help="steps of linear LR warm-up at the start of every round")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default="linear",
                   help="linear: the LR falls to 0 at the end of every round")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the student's weights per step (e.g. 0.999; 0 = off): each "
                        "round writes, and teaches the next round with, the averaged weights")
    p.add_argument("--seed", type=int, default=0)


def cmd_distill(args: argparse.Namespace) -> int:
    """Handler of ``toolkit distill``: parse → DistillArgs → :func:`distill` → print the checkpoints."""
    teacher = load_checkpoint(args.teacher)
    config = DistillArgs(start_steps=args.start_steps, rounds=args.rounds, weighting=args.weighting,
                         gamma=args.gamma, guidance=args.guidance, fold=args.fold,
                         iterations=args.iterations, fold_iterations=args.fold_iterations,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         lr_decay=args.lr_decay, ema=args.ema, seed=args.seed)
    t0 = time.time()
    written = distill(teacher, args.data, args.out, config,
                      provenance={"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])})
    if int(os.environ.get("RANK", "0")) == 0:
        for path in written or []:
            print(path)
        print(f"distilled {config.start_steps} → {config.student_steps(config.rounds)} steps in "
              f"{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``distill`` verb on a ``toolkit`` subparsers object."""
    p = subparsers.add_parser(
        "distill", help="progressive distillation (BSA weighting, CFG folded): halve the sampling "
                        "steps per round (resumable, torchrun-ready)")
    add_distill_arguments(p)
    p.set_defaults(func=cmd_distill)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m toolkit.distill ...`` (and ``torchrun ... -m toolkit.distill ...``)."""
    from toolkit.checkpoint_errors import CheckpointError
    from toolkit.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m toolkit.distill", description=__doc__.split("\n")[0])
    add_distill_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_distill(args)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
