"""The distillation loop: rounds that halve the steps, resumable state, EMA, checkpoints per round."""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.checkpoint import Pipeline, save_checkpoint
from toolkit.distill.args import DistillArgs
from toolkit.distill.ddp import DistContext, init_distributed
from toolkit.distill.latents import cached_latents
from toolkit.distill.targets import distill_loss
from toolkit.fingerprint import module_digest, tree_digest
from toolkit.training import save_state

STATE_FILE = "distill_state.pt"
GRAD_CLIP = 1.0  # as in toolkit.training


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
    dist = init_distributed(device)
    try:
        return _distill(teacher, Path(data_dir), Path(out_dir), args, dist=dist,
                        state_dir=Path(state_dir or f"{out_dir}-state"), save_every=save_every,
                        show_progress=show_progress, stop_at=stop_at, provenance=provenance or {})
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def _distill(teacher: Pipeline, data_dir: Path, out_dir: Path, args: DistillArgs, *, dist: DistContext,
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
