"""The ``toolkit distill`` verb (and ``python -m toolkit.distill`` under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from toolkit.checkpoint import load_checkpoint
from toolkit.distill.args import LR_DECAYS, DistillArgs
from toolkit.distill.loop import distill
from toolkit.distill.weights import BSA_GAMMA, WEIGHTINGS

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
