"""PTQ4ADM's calibration comparison (paper Figure 4 / §6.2) on the demo model.

The grid: calibration strategy (``activation-aware`` = PTQ4ADM Algorithm 2, ``uniform`` =
Q-Diffusion's random steps, ``normal`` = PTQ4DM's t ~ N(0.4, 0.4)) × precision (W8A8, W4A8 on every
Conv1d / Linear leaf of the denoiser, fake-quantized by :mod:`calibration.fakequant`, the int8
activation ranges observed on that strategy's calibration set) × conditioning set (the vocals as
they are, or after §5.1 coverage-driven augmentation). Every strategy gets the same K
intermediates and the same seeds (``calibration.sampling.calibrate``); ``--seeds`` repeats the
whole grid with other calibration seeds and reports mean ± sd, so a difference between strategies
can be read against the calibration draw's own noise.

Each cell is measured on one fixed held-out evaluation set: synthetic vocals (never seen in
training or calibration), one denoiser segment each, fixed initial noises, DDIM at ``--steps``
with the checkpoint's guidance, exactly what the full-precision reference runs:

- latent SNR (dB) of the quantized model's final latent against full precision (higher is better);
- paired audio distances to the full-precision audio (``runtime_py.metrics.paired_audio_metrics``)
  divided by the full-precision model's own seed-to-seed spread (``relative_to_spread``): 1.0 means
  "as far from full precision as another noise seed is"; SI-SNR (dB) against it as well;
- FD: the log-mel Fréchet distance (``calibration.quality.log_mel_frechet``) between the generated
  and the true accompaniments of the evaluation vocals, and its change against full precision
  (the paper's "FD increase"; the fp32 row with the other noise seed shows how much FD moves with
  the seed alone).

The table goes to stdout and is appended, with the command, wall time and machine, to
BENCHMARKS.md. ``--smoke`` runs the whole path on a tiny random model in seconds (not appended).

    OMP_NUM_THREADS=2 python benchmarks/calibration_table.py           # the real run
    OMP_NUM_THREADS=1 python benchmarks/calibration_table.py --smoke   # check that it works
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

import calibration.coverage as coverage  # noqa: E402
from calibration.vocal_features import measure_features  # noqa: E402
from calibration.fakequant import OBSERVERS, activation_ranges, quantizable_leaves, quantized_copy  # noqa: E402
from calibration.precision import PRECISIONS  # noqa: E402
from calibration.quality import log_mel_frechet  # noqa: E402
from calibration.sampling import STRATEGIES, calibrate, load_calibration_set, load_vocal_clips  # noqa: E402
from runtime_py.metrics import DISTANCES, paired_audio_metrics, relative_to_spread, snr_db  # noqa: E402
from benchmarks._record import append_section, command_line  # noqa: E402
from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint  # noqa: E402

from toolkit.data.synth import (MIN_SAMPLE_RATE, MIN_SECONDS, synth_pair_at_rate, track_seed,  # noqa: E402
                                write_synth_dataset)
from toolkit.generate import decode_latent, encode_audio, sample_latent  # noqa: E402

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SECTION = "PTQ4ADM calibration comparison"
# Dataset seeds (toolkit.data.synth.track_seed(seed, i)); the demo was trained on seed 0 and
# held out seed 1000, the distillation table holds out 3003.
CALIB_DATA_SEED = 4001  # the conditioning set the calibration sets are built from
EVAL_DATA_SEED = 4004  # the evaluation vocals (and their true accompaniments, for FD)
EVAL_NOISE_SEED = 4104  # the evaluation's initial noises; +1 for the seed-to-seed spread
DEFAULT_PRECISIONS = ("w8a8", "w4a8")
METRIC_KEYS = ("latent_snr_db", *(f"rel_{k}" for k in DISTANCES), "si_snr_db", "fd", "dfd", "dfd_pct")


def tiny_pipeline() -> Pipeline:
    """A seeded random tiny model (for --smoke only: it measures nothing)."""
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=4),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


# --- the evaluation set -------------------------------------------------------------------------


def _middle(audio: np.ndarray, n: int) -> np.ndarray:
    """The middle ``n`` samples of (C, N) audio (zero-padded when shorter), as calibration does."""
    c, total = audio.shape
    if total <= n:
        return np.pad(audio, ((0, 0), (0, n - total))).astype(np.float32)
    start = (total - n) // 2
    return np.ascontiguousarray(audio[:, start:start + n], dtype=np.float32)


def evaluation_set(pipe: Pipeline, n: int, seconds: float):
    """(conditioning latents (E, C, L), true accompaniment segments [(C, seg)], noise, spread noise)."""
    vocals, accompaniments = [], []
    for i in range(n):
        v, a, _ = synth_pair_at_rate(track_seed(EVAL_DATA_SEED, i), seconds=seconds,
                                     sample_rate=pipe.sample_rate, channels=pipe.audio_channels)
        vocals.append(_middle(v, pipe.segment_samples))
        accompaniments.append(_middle(a, pipe.segment_samples))
    with torch.no_grad():
        cond = encode_audio(pipe, torch.from_numpy(np.stack(vocals)))
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(EVAL_NOISE_SEED))
    other = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(EVAL_NOISE_SEED + 1))
    return cond, accompaniments, noise, other


@torch.no_grad()
def render(pipe: Pipeline, denoiser: torch.nn.Module, cond, noise, *, steps: int, guidance: float):
    """(final latents (E, C, L), audio [(C, seg)]) of ``denoiser`` in ``pipe``'s sampler."""
    swapped = Pipeline(config=pipe.config, denoiser=denoiser, vae=pipe.vae, path=pipe.path)
    latent = sample_latent(swapped, cond, noise, steps=steps, guidance=guidance)
    return latent.numpy(), list(decode_latent(pipe, latent).numpy())


def paired(reference: list, test: list, sample_rate: int) -> dict[str, float]:
    rows = [paired_audio_metrics(r, t, sample_rate) for r, t in zip(reference, test)]
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def frechet(audio: list, truth: list, sample_rate: int) -> float:
    """``log_mel_frechet``, or NaN (with a message) when the covariances cannot be fitted."""
    try:
        return log_mel_frechet(audio, truth, sample_rate)
    except ValueError as exc:  # too few frames for the 64 mel bands: keep the other figures
        print(f"log-mel FD unavailable: {exc}", file=sys.stderr)
        return float("nan")


def measure(ref_latent, ref_audio, latent, audio, *, spread, truth, fd_fp, sample_rate) -> dict[str, float]:
    dist = paired(ref_audio, audio, sample_rate)
    rel = relative_to_spread(dist, spread)
    fd = frechet(audio, truth, sample_rate)
    return {"latent_snr_db": float(np.mean([snr_db(r, t) for r, t in zip(ref_latent, latent)])),
            **{f"rel_{k}": rel[k] for k in rel}, "si_snr_db": dist["si_snr_db"],
            "fd": fd, "dfd": fd - fd_fp, "dfd_pct": 100.0 * (fd - fd_fp) / max(fd_fp, 1e-12)}


# --- the conditioning set -----------------------------------------------------------------------


def plain_coverage(pipe: Pipeline, data: Path, max_tracks: int | None) -> tuple[int, int]:
    """(covered bins, total bins) of the conditioning set as it is (calibrate measures it only
    when it augments)."""
    vectors = [coverage.coverage_vector(measure_features(a, pipe.sample_rate))
               for _, a in load_vocal_clips(pipe, data, max_tracks=max_tracks)]
    return int(coverage.global_coverage(vectors).sum()), len(coverage.bin_names())


# --- the table ----------------------------------------------------------------------------------


def _fmt(values: list[float], digits: int, *, signed: bool = False) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return "—"
    if np.any(np.isinf(v)):
        return "∞" if np.all(v == np.inf) else "mixed ∞"
    mean = f"{float(v.mean()):{'+' if signed else ''}.{digits}f}"
    return mean if v.size == 1 else f"{mean} ± {float(v.std(ddof=1)):.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = ("| precision | conditioning set | strategy | t̄ calib | latent SNR dB ↑ | log-mel L1 / spread ↓ "
            "| MRSTFT / spread ↓ | LSD / spread ↓ | loudness / spread ↓ | SI-SNR dB ↑ | FD log-mel ↓ "
            "| ΔFD vs fp32 | ΔFD % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["metrics"]  # key -> list over calibration seeds
        lines.append(
            f"| {r['precision']} | {r['set']} | {r['strategy']} | {_fmt(r.get('t_mean', []), 3)} | "
            f"{_fmt(m['latent_snr_db'], 1)} | {_fmt(m.get('rel_log_mel_l1', []), 3)} | "
            f"{_fmt(m.get('rel_mrstft', []), 3)} | {_fmt(m.get('rel_lsd_db', []), 3)} | "
            f"{_fmt(m.get('rel_loudness_diff_db', []), 3)} | {_fmt(m['si_snr_db'], 1)} | "
            f"{_fmt(m['fd'], 3)} | {_fmt(m['dfd'], 3, signed=True)} | {_fmt(m['dfd_pct'], 2, signed=True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    p.add_argument("--size", type=int, default=256, help="K: calibration intermediates, the same for every strategy")
    p.add_argument("--steps", type=int, default=16,
                   help="DDIM steps of the calibration trajectories and of the evaluation sampler")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out vocals in the evaluation set")
    p.add_argument("--data", type=Path, default=None,
                   help="stems folder whose vocals are the conditioning set (default: synthetic, in --work)")
    p.add_argument("--calib-tracks", type=int, default=32,
                   help="conditioning tracks: synthesized when no --data, else the first N of --data (0: all)")
    p.add_argument("--seed", type=int, default=0, help="first calibration seed")
    p.add_argument("--seeds", type=int, default=5,
                   help="calibration seeds seed..seed+N-1 (the grid is repeated; cells show mean ± sd)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of "
                   + ",".join(STRATEGIES))
    p.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS),
                   help=f"comma-separated subset of {','.join(PRECISIONS)}")
    p.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer")
    p.add_argument("--coverage-iterations", type=int, default=8, help="I_max of the coverage loop")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "calibration-table",
                   help="conditioning data and calibration sets")
    p.add_argument("--append", action=argparse.BooleanOptionalAction, default=None,
                   help=f"append to {BENCHMARKS_MD.name} (default: yes, except with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, temp dir, tiny sizes: checks the path, measures nothing")
    a = p.parse_args(argv)
    command = command_line(__file__)
    strategies = [s for s in a.strategies.split(",") if s]
    precisions = [s for s in a.precisions.split(",") if s]
    if sorted(set(strategies) - set(STRATEGIES)):
        p.error(f"unknown strategies {sorted(set(strategies) - set(STRATEGIES))}; choose from {STRATEGIES}")
    if sorted(set(precisions) - set(PRECISIONS)):
        p.error(f"unknown precisions {sorted(set(precisions) - set(PRECISIONS))}; choose from {list(PRECISIONS)}")
    if min(a.size, a.steps, a.eval_examples, a.seeds) < 1 or a.calib_tracks < 0:
        p.error("--size, --steps, --eval-examples and --seeds must be >= 1, --calib-tracks >= 0")
    if a.data is None and a.calib_tracks < 1:
        p.error("--calib-tracks must be >= 1 when the conditioning set is synthesized (no --data)")
    if a.eval_examples < 2:
        p.error("--eval-examples must be at least 2 (FD fits a covariance over the set)")
    append = (not a.smoke) if a.append is None else a.append
    t0 = time.time()
    tmp_work = None
    if a.smoke:
        tmp_work = Path(tempfile.mkdtemp(prefix="calibration-table-smoke-"))
        work = tmp_work
        # 40 evaluation clips: the tiny model's 16 ms segments give 2 log-mel frames each, and the
        # Fréchet distance needs more frames than its 64 mel bands.
        a.size, a.steps, a.eval_examples, a.calib_tracks, a.seeds, a.coverage_iterations = 8, 4, 40, 3, 2, 2
    else:
        work = a.work
    try:
        pipe = tiny_pipeline() if a.smoke else load_checkpoint(a.checkpoint)
        sr = pipe.sample_rate
        guidance = pipe.config.default_guidance if a.guidance is None else float(a.guidance)
        # Clips last one denoiser segment (the demo: 2.048 s), or whole segments spanning the
        # synthesizer's minimum of 1 s; conditioning and evaluation both use the middle segment.
        segment_s = pipe.segment_samples / sr
        seconds = segment_s * math.ceil(MIN_SECONDS / segment_s - 1e-9)
        max_tracks = a.calib_tracks or None
        data = a.data
        if data is None:
            data = work / f"conditioning-{a.calib_tracks}x{seconds:.3f}s-seed{CALIB_DATA_SEED}"
            if not data.is_dir():
                write_synth_dataset(data, n=a.calib_tracks, seconds=seconds, sample_rate=max(sr, MIN_SAMPLE_RATE),
                                    channels=pipe.audio_channels, seed=CALIB_DATA_SEED, progress=False)

        print(f"evaluation set: {a.eval_examples} vocals, fp32 reference and its seed-to-seed spread ...",
              file=sys.stderr)
        cond, truth, noise, other_noise = evaluation_set(pipe, a.eval_examples, seconds)
        ref_latent, ref_audio = render(pipe, pipe.denoiser, cond, noise, steps=a.steps, guidance=guidance)
        other_latent, other_audio = render(pipe, pipe.denoiser, cond, other_noise, steps=a.steps, guidance=guidance)
        spread = paired(ref_audio, other_audio, sr)
        fd_fp = frechet(ref_audio, truth, sr)
        fp_other = measure(ref_latent, ref_audio, other_latent, other_audio, spread=spread, truth=truth,
                           fd_fp=fd_fp, sample_rate=sr)
        fp_self = {"latent_snr_db": float("inf"), **{f"rel_{k}": 0.0 for k in DISTANCES},
                   "si_snr_db": float("inf"), "fd": fd_fp, "dfd": 0.0, "dfd_pct": 0.0}
        rows = [{"precision": "fp32", "set": "—", "strategy": "— (the reference)",
                 "metrics": {k: [v] for k, v in fp_self.items()}},
                {"precision": "fp32", "set": "—", "strategy": "— (other noise seed: the spread)",
                 "metrics": {k: [v] for k, v in fp_other.items()}}]

        cells: dict[tuple[str, str, str], dict] = {}
        set_info: dict[str, dict] = {}
        leaves = list(quantizable_leaves(pipe.denoiser))
        seeds = list(range(a.seed, a.seed + a.seeds))
        for augment in (False, True):
            set_name = "augmented (§5.1)" if augment else "as is"
            for seed in seeds:
                for strategy in strategies:
                    out = work / "calibration-sets" / (f"{strategy}-{'augmented' if augment else 'plain'}"
                                                       f"-K{a.size}-steps{a.steps}-seed{seed}")
                    calibrate(pipe, data, strategy=strategy, size=a.size, steps=a.steps, seed=seed,
                              out_dir=out, guidance=guidance, max_tracks=max_tracks,
                              coverage_iterations=a.coverage_iterations, augment=augment,
                              overwrite=True, show_progress=False)
                    calib = load_calibration_set(out)
                    info = set_info.setdefault(set_name, {"examples": [], "covered": []})
                    info["examples"].append(len(calib.manifest["examples"]))
                    if augment:
                        info["covered"].append(calib.manifest["coverage"]["covered"])
                        info["total"] = calib.manifest["coverage"]["total_bins"]
                    ranges = activation_ranges(pipe.denoiser, calib, observer=a.observer)
                    for precision in precisions:
                        q = quantized_copy(pipe.denoiser, {n: PRECISIONS[precision] for n in leaves}, ranges)
                        latent, audio = render(pipe, q, cond, noise, steps=a.steps, guidance=guidance)
                        m = measure(ref_latent, ref_audio, latent, audio, spread=spread, truth=truth,
                                    fd_fp=fd_fp, sample_rate=sr)
                        cell = cells.setdefault((precision, set_name, strategy),
                                                {"metrics": {k: [] for k in METRIC_KEYS}, "t_mean": []})
                        for k in METRIC_KEYS:
                            cell["metrics"][k].append(m.get(k, float("nan")))
                        cell["t_mean"].append(float(calib.t.mean()))
                        print(f"{precision} · {set_name} · {strategy} · seed {seed}: latent SNR "
                              f"{m['latent_snr_db']:.2f} dB, ΔFD {m['dfd']:+.3f} ({time.time() - t0:.0f} s)",
                              file=sys.stderr)
        for precision in precisions:
            for augment in (False, True):
                set_name = "augmented (§5.1)" if augment else "as is"
                for strategy in strategies:
                    rows.append({"precision": precision.upper(), "set": set_name, "strategy": strategy,
                                 **cells[(precision, set_name, strategy)]})

        plain_cov, total_bins = plain_coverage(pipe, data, max_tracks)
        wall = time.time() - t0
        table = markdown(rows)
        aug = set_info.get("augmented (§5.1)", {})
        spread_txt = ", ".join(f"{k} {spread[k]:.3g}" for k in DISTANCES if k in spread)
        notes = (
            f"Checkpoint `{a.checkpoint or ('tiny random (smoke)' if a.smoke else 'demo')}` "
            f"({pipe.config.name}, {sr} Hz), DDIM {a.steps} steps, guidance {guidance}. Quantized: all "
            f"{len(leaves)} Conv1d/Linear leaves of the denoiser (attention projections included), weights "
            "symmetric per output channel, int8 activations affine per tensor with "
            f"`{a.observer}` ranges from the cell's calibration set (`calibration.fakequant`). "
            f"Calibration: K = {a.size} intermediates per set, seeds {seeds[0]}..{seeds[-1]} (cells: mean ± sd "
            f"over seeds), conditioning `{data if a.data else 'synthetic'}` "
            f"({len(load_vocal_clips(pipe, data, max_tracks=max_tracks))} vocals, dataset seed "
            f"{CALIB_DATA_SEED if a.data is None else 'n/a'}; as is: {plain_cov}/{total_bins} coverage bins; "
            f"augmented: {_fmt(aug.get('covered', []), 1)}/{aug.get('total', total_bins)} bins, "
            f"{_fmt(aug.get('examples', []), 1)} examples, I_max {a.coverage_iterations}). "
            f"t̄ calib: mean t (1 = noise) of the drawn intermediates. Evaluation: {a.eval_examples} held-out "
            f"synthetic vocals (dataset seed {EVAL_DATA_SEED}), one {segment_s:.3f} s segment each, noise seed "
            f"{EVAL_NOISE_SEED} (spread: {EVAL_NOISE_SEED + 1}). fp32 seed-to-seed spread: {spread_txt}. "
            f"FD: log-mel Fréchet distance to the true accompaniments; fp32 FD {fd_fp:.3f}; ΔFD = FD − fp32 FD "
            "(near 0 is best; the spread row shows how far FD moves with the noise seed alone).")
        print(table)
        print(f"\n{notes}\nwall time {wall:.0f} s", file=sys.stderr)
        if append:
            append_section(SECTION, command=command, wall_s=wall, notes=notes, table=table,
                           path=BENCHMARKS_MD)
    finally:
        if tmp_work is not None:
            shutil.rmtree(tmp_work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
