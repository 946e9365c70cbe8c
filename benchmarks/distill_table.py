"""Seed 003 Table 1 on the demo model: teacher at N, N/2, N/4, N/8 steps vs distilled students.

For every loss weighting (BSA eq. 10, truncated SNR eq. 7, SNR+1 eq. 8, min-SNR-γ eq. 9) the
teacher is distilled for ``--rounds`` rounds from ``--start-steps`` (one ``toolkit distill`` run per
weighting, resumable: rerunning this script continues where it stopped). Each model is measured on
held-out synthetic pairs (never seen in distillation) with the quality harness:

- paired distance to the teacher's N-step output (same vocal, same seed), divided by the
  teacher's own seed-to-seed spread at N steps (``runtime_py.metrics.relative_to_spread``): 1.0
  means "as far from the N-step teacher as another seed is"; SI-SNR (dB) against it as well;
- FD: the Fréchet distance between Gaussians fitted to log-mel frames of the generated and of the
  true held-out accompaniments (the paper's FD with log-mel frames as the embedding);
- chord accuracy / cosine against the true chords (``toolkit.data.music.chord_agreement``).

The table goes to stdout and is appended, with the command, wall time and machine, to
BENCHMARKS.md. ``--smoke`` runs the whole path on a tiny random model in seconds (not appended).

    python benchmarks/distill_table.py                  # the real run (hours on 2 CPU cores)
    python benchmarks/distill_table.py --smoke          # check that it works
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime_py.metrics import DISTANCES, log_mel, paired_audio_metrics, relative_to_spread  # noqa: E402
from benchmarks._record import append_section, command_line  # noqa: E402
from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint  # noqa: E402
from toolkit.data.music import chord_agreement  # noqa: E402
from toolkit.data.stems import list_tracks, load_track  # noqa: E402
from toolkit.data.synth import MIN_SAMPLE_RATE, MIN_SECONDS, write_synth_dataset  # noqa: E402
from toolkit.distill import LR_DECAYS, WEIGHTINGS, DistillArgs, distill  # noqa: E402
from toolkit.generate import generate_accompaniment  # noqa: E402

HELDOUT_SEED = 3003  # dataset seed of the held-out pairs; differs from the training data's (0)
TRAIN_SEED = 0
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
WEIGHTING_ORDER = ("truncated-snr", "snr-plus-one", "min-snr", "bsa")  # eqs. 7, 8, 9, 10
EQUATION = {"truncated-snr": "eq. 7", "snr-plus-one": "eq. 8", "min-snr": "eq. 9", "bsa": "eq. 10"}


def frechet_log_mel(a_frames: np.ndarray, b_frames: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of (frames, dim) log-mel frames:
    ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^½ Σ_b Σ_a^½)^½ (symmetric form, eigh only)."""
    a, b = np.asarray(a_frames, np.float64), np.asarray(b_frames, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (frames >= 2, dim) arrays of one dim, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    value = float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b)
                  - 2.0 * np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    return max(value, 0.0)


def tiny_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    pipe = Pipeline(config=PipelineConfig(name="tiny", default_steps=8),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())
    return save_checkpoint(path, pipe, overwrite=True)


def render(pipe: Pipeline, tracks: list, *, steps: int, guidance: float, seeds: list[int]) -> list:
    """outputs[s][j]: accompaniment of held-out track j with noise seed seeds[s]."""
    return [[generate_accompaniment(pipe, tr.vocals, steps=steps, guidance=guidance, seed=s, mode="segments")
             for tr in tracks] for s in seeds]


def paired(ref: list, test: list, sample_rate: int) -> dict[str, float]:
    rows = [paired_audio_metrics(r, t, sample_rate) for rs, ts in zip(ref, test) for r, t in zip(rs, ts)]
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def measure(outputs: list, reference: list, spread: dict, tracks: list, true_frames: np.ndarray,
            sample_rate: int) -> dict:
    dist = paired(reference, outputs, sample_rate)
    rel = relative_to_spread(dist, spread)
    frames = np.concatenate([log_mel(o, sample_rate) for per_seed in outputs for o in per_seed])
    chords = [chord_agreement(o, sample_rate, tr.labels) for per_seed in outputs
              for o, tr in zip(per_seed, tracks)]
    acc = [c["chord_accuracy"] for c in chords if c["chord_accuracy"] is not None]
    return {**{f"rel_{k}": rel[k] for k in rel}, "si_snr_db": dist["si_snr_db"],
            "fd_log_mel": frechet_log_mel(frames, true_frames),
            "chord_accuracy": float(np.mean(acc)) if acc else float("nan"),
            "chord_cosine": float(np.mean([c["chord_cosine"] for c in chords
                                           if c["chord_cosine"] is not None]))}


def markdown(rows: list[dict]) -> str:
    head = ("| model | weighting | steps | NFE | log-mel L1 / spread | MRSTFT / spread | LSD / spread "
            "| SI-SNR dB vs N-step | FD log-mel ↓ | chord acc ↑ | chord cos ↑ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["metrics"]
        si = "∞" if not np.isfinite(m["si_snr_db"]) else f"{m['si_snr_db']:.1f}"
        lines.append(
            f"| {r['model']} | {r['weighting']} | {r['steps']} | {r['nfe']} | "
            f"{m.get('rel_log_mel_l1', float('nan')):.2f} | {m.get('rel_mrstft', float('nan')):.2f} | "
            f"{m.get('rel_lsd_db', float('nan')):.2f} | {si} | {m['fd_log_mel']:.2f} | "
            f"{m['chord_accuracy']:.3f} | {m['chord_cosine']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint (default: demo)")
    p.add_argument("--data", type=Path, default=None,
                   help="stems folder to distill on (default: synthetic pairs written to --work)")
    p.add_argument("--train-n", type=int, default=64, help="synthetic training pairs when no --data")
    p.add_argument("--heldout-n", type=int, default=8, help="held-out synthetic pairs")
    p.add_argument("--seeds", type=int, default=2,
                   help="noise seeds per held-out pair (>= 2: the spread needs two)")
    p.add_argument("--start-steps", type=int, default=64, help="N: the teacher's reference steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weightings", default=",".join(WEIGHTING_ORDER),
                   help=f"comma-separated subset of {','.join(WEIGHTING_ORDER)}")
    p.add_argument("--iterations", type=int, default=1000, help="optimizer steps per round")
    p.add_argument("--fold-iterations", type=int, default=0,
                   help="fold CFG first, once, as round 0 at N steps (Meng et al. 2023 stage one, "
                        "BSA weighting); every weighting then distils the folded model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the student weights (0: off)")
    p.add_argument("--warmup", type=int, default=200, help="LR warm-up steps per round")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default="linear",
                   help="linear: LR falls to 0 at the end of every round")
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--guidance", type=float, default=None, help="default: the teacher's")
    p.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "distill-table",
                   help="data, students and their resumable state")
    p.add_argument("--append", action=argparse.BooleanOptionalAction, default=None,
                   help=f"append to {BENCHMARKS_MD.name} (default: yes, except with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, 2 iterations, N=8: checks the path, measures nothing")
    a = p.parse_args(argv)
    command = command_line(__file__)
    weightings = [w for w in a.weightings.split(",") if w]
    unknown = sorted(set(weightings) - set(WEIGHTINGS))
    if unknown:
        p.error(f"unknown weightings {unknown}; choose from {sorted(WEIGHTINGS)}")
    if a.seeds < 2:
        p.error("--seeds must be at least 2 (the seed-to-seed spread needs two)")
    append = (not a.smoke) if a.append is None else a.append
    t0 = time.time()
    tmp_work = None
    if a.smoke:
        tmp_work = Path(tempfile.mkdtemp(prefix="distill-table-smoke-"))
        work = tmp_work
        teacher_path = tiny_teacher(work / "teacher")
        a.start_steps, a.rounds, a.iterations, a.batch_size, a.lr = 8, 3, 2, 4, 1e-3
        a.fold_iterations = min(a.fold_iterations, 2)
        a.train_n, a.heldout_n = 2, 2
    else:
        work = a.work
        teacher_path = a.teacher
    try:
        teacher = load_checkpoint(teacher_path)
        guidance = teacher.config.default_guidance if a.guidance is None else a.guidance
        # Pairs last one denoiser segment (the demo: 4.096 s), or whole segments spanning the
        # synthesizer's minimum of 1 s (the tiny model's segments are 16 ms).
        segment_s = teacher.segment_samples / teacher.sample_rate
        seconds = segment_s * math.ceil(MIN_SECONDS / segment_s - 1e-9)
        data = a.data
        if data is None:
            data = work / f"train-{a.train_n}x{seconds:.3f}s-seed{TRAIN_SEED}"
            if not data.is_dir():
                write_synth_dataset(data, n=a.train_n, seconds=seconds, sample_rate=max(teacher.sample_rate, MIN_SAMPLE_RATE),
                                    channels=teacher.audio_channels, seed=TRAIN_SEED, progress=True)
        heldout = work / f"heldout-{a.heldout_n}x{seconds:.3f}s-seed{HELDOUT_SEED}"
        if not heldout.is_dir():
            write_synth_dataset(heldout, n=a.heldout_n, seconds=seconds, sample_rate=max(teacher.sample_rate, MIN_SAMPLE_RATE),
                                channels=teacher.audio_channels, seed=HELDOUT_SEED, progress=True)
        tracks = [load_track(t, sample_rate=teacher.sample_rate, channels=teacher.audio_channels)
                  for t in list_tracks(heldout)]
        sr = teacher.sample_rate
        true_frames = np.concatenate([log_mel(tr.accompaniment, sr) for tr in tracks])
        seeds = list(range(a.seed, a.seed + a.seeds))
        n = a.start_steps

        print(f"teacher {n}-step reference and its seed-to-seed spread ...", file=sys.stderr)
        reference = render(teacher, tracks, steps=n, guidance=guidance, seeds=seeds)
        other = reference[1:] + reference[:1]  # seed s vs seed s+1 (cyclic): the spread
        spread = paired(reference, other, sr)

        teacher_nfe = 1 if teacher.config.guidance_folded or guidance == 1.0 else 2
        rows = []
        for k in range(a.rounds + 1):
            steps = n // 2 ** k
            outputs = reference if k == 0 else render(teacher, tracks, steps=steps, guidance=guidance,
                                                      seeds=seeds)
            rows.append({"model": "teacher (DDIM)", "weighting": "—", "steps": steps,
                         "nfe": steps * teacher_nfe,
                         "metrics": measure(outputs, reference, spread, tracks, true_frames, sr)})
            print(f"teacher {steps} steps done", file=sys.stderr)
        first = teacher
        if a.fold_iterations:
            # Round 0, shared: every weighting's rounds start from the same folded model.
            fold_args = DistillArgs(start_steps=n, rounds=0, fold_iterations=a.fold_iterations,
                                    gamma=a.gamma, guidance=guidance, batch_size=a.batch_size,
                                    lr=a.lr, warmup=a.warmup, lr_decay=a.lr_decay, ema=a.ema,
                                    seed=a.seed)
            (fold_path,) = distill(teacher, data, work / "students" / "fold", fold_args,
                                   provenance={"command": command, "benchmark": "distill_table"})
            first = load_checkpoint(fold_path)
            outputs = render(first, tracks, steps=n, guidance=guidance, seeds=seeds)
            rows.append({"model": "CFG folded (round 0)", "weighting": "bsa (eq. 10)", "steps": n,
                         "nfe": n, "metrics": measure(outputs, reference, spread, tracks,
                                                      true_frames, sr)})
            print(f"folded {n} steps done", file=sys.stderr)
        for weighting in weightings:
            args = DistillArgs(start_steps=n, rounds=a.rounds, weighting=weighting, gamma=a.gamma,
                               guidance=guidance, fold=a.fold, iterations=a.iterations,
                               batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                               lr_decay=a.lr_decay, ema=a.ema, seed=a.seed)
            paths = distill(first, data, work / "students" / weighting, args,
                            provenance={"command": command, "benchmark": "distill_table"})
            for path in paths:
                student = load_checkpoint(path)
                steps = student.config.default_steps
                outputs = render(student, tracks, steps=steps, guidance=guidance, seeds=seeds)
                rows.append({"model": f"student round {student.config.provenance['round']}",
                             "weighting": f"{weighting} ({EQUATION[weighting]})", "steps": steps,
                             "nfe": steps * (1 if student.config.guidance_folded else 2),
                             "metrics": measure(outputs, reference, spread, tracks, true_frames, sr)})
                print(f"{weighting} {steps} steps done", file=sys.stderr)
        wall = time.time() - t0
        table = markdown(rows)
        spread_txt = ", ".join(f"{k} {spread[k]:.3g}" for k in DISTANCES if k in spread)
        notes = (f"Teacher `{teacher_path or 'demo'}` ({teacher.config.name}), N = {n}, guidance "
                 f"{guidance}, {'folded' if a.fold else 'not folded'}"
                 f"{f' first, in a round 0 of {a.fold_iterations} iterations' if a.fold_iterations else ''}"
                 f"; {a.rounds} rounds × "
                 f"{a.iterations} iterations, batch {a.batch_size}, lr {a.lr} (warm-up {a.warmup}, decay "
                 f"{a.lr_decay}), EMA {a.ema}, γ {a.gamma}; "
                 f"{len(tracks)} held-out pairs × {len(seeds)} seeds (dataset seed {HELDOUT_SEED}). "
                 f"Teacher {n}-step seed-to-seed spread: {spread_txt}. NFE: denoiser calls per clip "
                 "segment (CFG costs two per step unless folded).")
        print(table)
        print(f"\n{notes}\nwall time {wall:.0f} s", file=sys.stderr)
        if append:
            append_section("Progressive distillation, seed 003 Table 1", command=command, wall_s=wall, notes=notes, table=table,
                           path=BENCHMARKS_MD)
    finally:
        if tmp_work is not None:
            shutil.rmtree(tmp_work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
