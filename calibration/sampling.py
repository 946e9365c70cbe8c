"""Activation-aware calibration sampling: PTQ4ADM §5.2, Algorithm 2, and the calibration-set verb.

For every conditioning example the full-precision pipeline runs the DDIM trajectory it will run
on the device (CFG batch included). Forward hooks on the denoiser's Conv1d, Linear and attention
modules record, for each layer l and sampler step i, the variance σ²_{l,i} of the layer's output
over every element of the step's batch. Then, in the paper's words adapted to time:

1. σ²_l = mean_i σ²_{l,i}; a layer is informative when σ²_l ≥ τ_var, τ_var = ``tau_fraction`` × max_l σ²_l
   (the paper's "10 % of the maximum"); if none qualifies (an absolute ``tau_var`` set too high),
   τ_var is halved until one does, and the number of halvings is recorded.
2. P_l = σ̂²_l / Σ_j σ̂²_j over the informative layers, σ̂²_l = σ²_l / Σ σ²: the layer sampling
   probabilities.
3. Each of the K intermediates draws a layer from P_l, then a step from that layer's share of its
   own variance over time, q_{l,i} = σ²_{l,i} / Σ_j σ²_{l,j}, and an example; the intermediate is
   (x_t, t, cond) of that example at that step. The marginal over steps, p_i = Σ_l P_l q_{l,i},
   is what the statistics file reports.

Baselines: ``uniform`` (p_i = 1 / steps, Q-Diffusion) and ``normal`` (PTQ4DM: t ~ N(0.4, 0.4)
on t ∈ [0, 1], clamped to the grid's ends, each step taking the mass nearest to it).

The calibration set (ARCHITECTURE.md) is a directory written atomically: ``manifest.json``,
``intermediates.safetensors`` (x_t, t, cond, step, example, layer), ``conditioning.safetensors``
(every example's conditioning latent and initial noise, for evaluations that reuse them),
``layer_stats.json`` and ``coverage.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibration.coverage import augment_audio, report_json_safe
from toolkit.atomic import atomic_directory
from toolkit.checkpoint import Pipeline
from toolkit.data.stems import list_tracks, load_track
from toolkit.diffusion import guided_denoiser, make_table, sample_ddim
from toolkit.generate import encode_audio
from toolkit.families import QUANTIZABLE_TYPES

FORMAT_VERSION = 1
STRATEGIES = ("activation-aware", "uniform", "normal")
TAU_FRACTION = 0.1  # PTQ4ADM §5.2: τ_var "often as a fraction (e.g., 10%) of the maximum variance"
TAU_REDUCTION = 0.5  # the fallback multiplies τ_var by this until a layer qualifies
MAX_TAU_REDUCTIONS = 200
NORMAL_MEAN, NORMAL_STD = 0.4, 0.4  # PTQ4DM: t ~ N(0.4 T, 0.4 T)
MANIFEST = "manifest.json"
INTERMEDIATES = "intermediates.safetensors"
CONDITIONING = "conditioning.safetensors"
LAYER_STATS = "layer_stats.json"
COVERAGE = "coverage.json"
def hooked_layers(denoiser: nn.Module, attention_types: tuple[type, ...] = ()) -> dict[str, nn.Module]:
    """The modules whose activations Algorithm 2 watches, by FQN: every quantizable leaf
    (``toolkit.families.QUANTIZABLE_TYPES``) and the family's attention blocks."""
    types = QUANTIZABLE_TYPES + tuple(attention_types)
    return {name: m for name, m in denoiser.named_modules() if name and isinstance(m, types)}


# --- Algorithm 2, as pure functions of the variance table -----------------------------------


@dataclass(frozen=True)
class LayerSelection:
    tau_var: float  # the threshold finally used
    reductions: int  # how many times the fallback lowered it
    qualifying: tuple[int, ...]  # indices of layers with σ²_l ≥ τ_var
    layer_probability: np.ndarray  # P_l over all layers (0 for the non-qualifying)


def select_layers(layer_variance: np.ndarray, *, tau_fraction: float = TAU_FRACTION,
                  tau_var: float | None = None) -> LayerSelection:
    """Steps 1, 2 and 5 of Algorithm 2: the informative layers and P_l.

    ``tau_var`` (absolute) overrides ``tau_fraction`` × max σ²_l. While no layer reaches τ_var it is
    multiplied by ``TAU_REDUCTION`` (the paper's fallback, so the loop always ends).
    """
    var = np.asarray(layer_variance, dtype=np.float64)
    if var.ndim != 1 or var.size == 0:
        raise ValueError(f"layer_variance must be a non-empty vector, got shape {var.shape}")
    if not np.all(np.isfinite(var)) or np.any(var < 0):
        raise ValueError("layer variances must be finite and non-negative")
    if not np.any(var > 0):
        raise ValueError("every layer has zero activation variance: nothing to calibrate on")
    tau = float(tau_fraction * var.max()) if tau_var is None else float(tau_var)
    reductions = 0
    while not np.any(var >= tau):
        if reductions >= MAX_TAU_REDUCTIONS:  # unreachable for finite positive variances
            raise RuntimeError("tau_var fallback did not converge")
        tau *= TAU_REDUCTION
        reductions += 1
    mask = var >= tau
    normalised = var / var.sum()  # σ̂²_l
    p = np.where(mask, normalised, 0.0)
    return LayerSelection(tau, reductions, tuple(int(i) for i in np.flatnonzero(mask)), p / p.sum())


def activation_aware_probabilities(step_variance: np.ndarray, *, tau_fraction: float = TAU_FRACTION,
                                   tau_var: float | None = None) -> tuple[np.ndarray, np.ndarray, LayerSelection]:
    """(p_i over steps, q_{l,i} per layer over steps, selection) from σ²_{l,i} (layers × steps)."""
    v = np.asarray(step_variance, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"step_variance must be (layers, steps), got {v.shape}")
    sel = select_layers(v.mean(axis=1), tau_fraction=tau_fraction, tau_var=tau_var)
    totals = v.sum(axis=1, keepdims=True)
    q = np.where(totals > 0, v / np.where(totals > 0, totals, 1.0), 1.0 / v.shape[1])
    p = sel.layer_probability @ q
    return p / p.sum(), q, sel


def uniform_probabilities(steps: int) -> np.ndarray:
    return np.full(steps, 1.0 / steps)


def normal_probabilities(t_grid: np.ndarray, *, mean: float = NORMAL_MEAN, std: float = NORMAL_STD) -> np.ndarray:
    """PTQ4DM's t ~ N(mean, std) clamped to the grid: each step gets the mass nearest to its t."""
    from scipy.stats import norm

    t = np.asarray(t_grid, dtype=np.float64)
    order = np.argsort(t)
    ts = t[order]
    edges = np.concatenate([[-np.inf], (ts[1:] + ts[:-1]) / 2, [np.inf]])  # clamping: tails go to the ends
    mass = np.diff(norm.cdf(edges, loc=mean, scale=std))
    p = np.empty_like(mass)
    p[order] = mass
    return p / p.sum()


def draw_intermediates(rng: np.random.Generator, *, size: int, n_examples: int, step_probability: np.ndarray,
                       layer_probability: np.ndarray | None = None,
                       layer_step_probability: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """K draws of (step, example, layer or -1): layer ~ P_l then step ~ q_l, or step ~ p directly."""
    out = []
    order = rng.permutation(n_examples)
    for k in range(size):
        example = int(order[k % n_examples])  # round robin: every example contributes
        if layer_probability is not None and layer_step_probability is not None:
            layer = int(rng.choice(layer_probability.size, p=layer_probability))
            step = int(rng.choice(layer_step_probability.shape[1], p=layer_step_probability[layer]))
        else:
            layer = -1
            step = int(rng.choice(step_probability.size, p=step_probability))
        out.append((step, example, layer))
    return out


# --- running the trajectory with hooks -------------------------------------------------------


class VarianceRecorder:
    """Forward hooks that accumulate Σx, Σx², n per (layer, sampler step) in float64."""

    def __init__(self, layers: dict[str, nn.Module], steps: int):
        self.names = list(layers)
        self.steps = steps
        self.step = 0
        self.sum = np.zeros((len(self.names), steps))
        self.sumsq = np.zeros((len(self.names), steps))
        self.count = np.zeros((len(self.names), steps))
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers.values())]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            y = output.detach().to(torch.float64)
            self.sum[index, self.step] += float(y.sum())
            self.sumsq[index, self.step] += float((y * y).sum())
            self.count[index, self.step] += y.numel()
        return hook

    def variance(self) -> np.ndarray:
        n = np.maximum(self.count, 1)
        mean = self.sum / n
        return np.maximum(self.sumsq / n - mean**2, 0.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_trajectories(pipeline: Pipeline, cond: torch.Tensor, noise: torch.Tensor, *, steps: int,
                     guidance: float, batch: int = 8, show_progress: bool = False
                     ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """DDIM for every example: returns z (E, steps, C, L) at the input of each step, σ²_{l,i}, names."""
    from tqdm import tqdm

    table = make_table(pipeline.config.schedule, steps)
    layers = hooked_layers(pipeline.denoiser, pipeline.family.attention_types)
    recorder = VarianceRecorder(layers, steps)
    states = torch.empty((cond.shape[0], steps, *cond.shape[1:]), dtype=cond.dtype)
    try:
        starts = range(0, cond.shape[0], batch)
        for s in tqdm(starts, desc="trajectories", disable=not show_progress, file=sys.stderr):
            c = cond[s:s + batch]
            base = guided_denoiser(pipeline.denoiser, c, guidance, folded=pipeline.config.guidance_folded)
            counter = {"i": 0}

            def denoise(z, t, base=base, counter=counter, s=s):
                i = counter["i"]
                recorder.step = i
                states[s:s + z.shape[0], i] = z
                counter["i"] = i + 1
                return base(z, t)

            sample_ddim(denoise, noise[s:s + batch], table)
    finally:
        recorder.remove()
    return states, recorder.variance(), recorder.names


# --- conditioning -----------------------------------------------------------------------------


def _segment(audio: np.ndarray, segment_samples: int) -> np.ndarray:
    """The middle ``segment_samples`` of (C, N) audio (zero-padded when shorter)."""
    c, n = audio.shape
    if n <= segment_samples:
        out = np.zeros((c, segment_samples), dtype=np.float32)
        out[:, :n] = audio
        return out
    start = (n - segment_samples) // 2
    return np.ascontiguousarray(audio[:, start:start + segment_samples], dtype=np.float32)


@torch.no_grad()
def conditioning_latents(pipeline: Pipeline, clips: list[np.ndarray]) -> torch.Tensor:
    """Mono clips → (E, C, L) conditioning latents of their middle segment."""
    seg = [_segment(np.repeat(np.asarray(c, np.float32)[None], pipeline.audio_channels, axis=0),
                    pipeline.segment_samples) for c in clips]
    return torch.cat([encode_audio(pipeline, torch.from_numpy(s)[None]) for s in seg])


MIN_VOCAL_S = 1.0  # the coverage features' onset statistics average over a 1 s window


def load_vocal_clips(pipeline: Pipeline, data_dir: Path, *, max_tracks: int | None = None
                     ) -> list[tuple[str, np.ndarray]]:
    """Every track's mono vocal; every unreadable or too short track is reported at once, by file."""
    from toolkit.data.stems import StemsError

    out, bad = [], []
    for path in list_tracks(data_dir)[:max_tracks]:
        try:
            track = load_track(path, sample_rate=pipeline.sample_rate, channels=pipeline.audio_channels)
        except (StemsError, OSError, ValueError) as exc:
            bad.append(str(exc))
            continue
        seconds = track.vocals.shape[-1] / pipeline.sample_rate
        if seconds < MIN_VOCAL_S:
            bad.append(f"{Path(path) / 'vocals.wav'}: {seconds:.2f} s long; calibration needs at least "
                       f"{MIN_VOCAL_S:g} s of vocal per track")
            continue
        out.append((track.name, track.vocals.mean(axis=0)))
    if bad:
        raise ValueError(f"{data_dir}: {len(bad)} track(s) cannot be used:\n  " + "\n  ".join(bad))
    return out


# --- the verb ----------------------------------------------------------------------------------


def _write_dir_atomically(out_dir: Path, write, *, overwrite: bool) -> Path:
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        write(tmp)
    return Path(out_dir)


def calibrate(
    pipeline: Pipeline,
    data_dir: Path,
    *,
    strategy: str,
    size: int,
    steps: int,
    seed: int,
    out_dir: Path,
    guidance: float | None = None,
    tau_fraction: float = TAU_FRACTION,
    tau_var: float | None = None,
    max_tracks: int | None = None,
    coverage_iterations: int = 8,
    augment: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Build the calibration set of ARCHITECTURE.md from the vocals of ``data_dir`` (see module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if size < 1 or steps < 1:
        raise ValueError(f"size and steps must be >= 1, got size={size}, steps={steps}")
    if Path(out_dir).exists() and not overwrite:  # before the expensive part
        raise FileExistsError(f"{out_dir} exists; choose another --out or remove it")
    t0 = time.time()
    guidance = pipeline.config.default_guidance if guidance is None else float(guidance)
    clips = load_vocal_clips(pipeline, Path(data_dir), max_tracks=max_tracks)
    if augment:
        examples, cov_report = augment_audio(clips, pipeline.sample_rate,
                                             max_iterations=coverage_iterations, seed=seed)
        names, audio = [e.name for e in examples], [e.audio for e in examples]
    else:
        names, audio = [n for n, _ in clips], [a for _, a in clips]
        cov_report = {"modality": "audio", "skipped": "augmentation disabled"}
    cond = conditioning_latents(pipeline, audio)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(audio), *pipeline.latent_shape), generator=generator)
    states, variance, layer_names = run_trajectories(pipeline, cond, noise, steps=steps,
                                                     guidance=guidance, show_progress=show_progress)
    table = make_table(pipeline.config.schedule, steps)
    t_grid = np.asarray(table.t[:-1])
    rng = np.random.default_rng(seed)
    p_aa, q, selection = activation_aware_probabilities(variance, tau_fraction=tau_fraction, tau_var=tau_var)
    if strategy == "activation-aware":
        p = p_aa
        draws = draw_intermediates(rng, size=size, n_examples=len(audio), step_probability=p,
                                   layer_probability=selection.layer_probability, layer_step_probability=q)
    else:
        p = uniform_probabilities(steps) if strategy == "uniform" else normal_probabilities(t_grid)
        draws = draw_intermediates(rng, size=size, n_examples=len(audio), step_probability=p)
    step_idx = torch.tensor([d[0] for d in draws], dtype=torch.int64)
    ex_idx = torch.tensor([d[1] for d in draws], dtype=torch.int64)
    intermediates = {
        "x_t": states[ex_idx, step_idx].contiguous(),
        "t": torch.tensor([t_grid[d[0]] for d in draws], dtype=torch.float32),
        "cond": cond[ex_idx].contiguous(),
        "step": step_idx,
        "example": ex_idx,
        "layer": torch.tensor([d[2] for d in draws], dtype=torch.int64),
    }
    stats = {
        "format_version": FORMAT_VERSION,
        "layers": layer_names,
        "t": t_grid.tolist(),
        "variance": {n: variance[i].tolist() for i, n in enumerate(layer_names)},
        "layer_variance": {n: float(variance[i].mean()) for i, n in enumerate(layer_names)},
        "tau_fraction": tau_fraction if tau_var is None else None,
        "tau_var": selection.tau_var,
        "tau_reductions": selection.reductions,
        "qualifying_layers": [layer_names[i] for i in selection.qualifying],
        "layer_probability": {layer_names[i]: float(selection.layer_probability[i]) for i in selection.qualifying},
        "step_probability": {"activation-aware": p_aa.tolist(), "uniform": uniform_probabilities(steps).tolist(),
                             "normal": normal_probabilities(t_grid).tolist()},
        "strategy": strategy,
        "drawn_steps": np.bincount(step_idx.numpy(), minlength=steps).tolist(),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "type": "calibration_set",
        "strategy": strategy,
        "size": size,
        "steps": steps,
        "guidance": guidance,
        "guidance_folded": pipeline.config.guidance_folded,
        "seed": seed,
        "model": pipeline.config.name,
        "checkpoint": str(pipeline.path) if pipeline.path is not None else None,
        "latent_shape": list(pipeline.latent_shape),
        "sample_rate": pipeline.sample_rate,
        "segment_samples": pipeline.segment_samples,
        "data": str(data_dir),
        "examples": names,
        "files": {"intermediates": INTERMEDIATES, "conditioning": CONDITIONING,
                  "layer_stats": LAYER_STATS, "coverage": COVERAGE},
        "intermediates": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                          for k, v in intermediates.items()},
        "coverage": {k: cov_report.get(k) for k in ("covered", "total_bins", "full_coverage", "redundancy",
                                                    "iterations")},
        "seconds": None,
    }

    def write(tmp: Path) -> None:
        from toolkit.atomic import save_safetensors

        save_safetensors(intermediates, tmp / INTERMEDIATES, metadata={"strategy": strategy})
        save_safetensors({"cond": cond.contiguous(), "noise": noise.contiguous()}, tmp / CONDITIONING)
        (tmp / LAYER_STATS).write_text(json.dumps(stats, indent=1) + "\n")
        (tmp / COVERAGE).write_text(json.dumps(report_json_safe(cov_report), indent=1) + "\n")
        manifest["seconds"] = round(time.time() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return _write_dir_atomically(Path(out_dir), write, overwrite=overwrite)


@dataclass(frozen=True)
class CalibrationSet:
    path: Path
    manifest: dict
    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    conditioning: torch.Tensor  # every example's conditioning latent (E, C, L)
    noise: torch.Tensor  # every example's initial noise (E, C, L)


def load_calibration_set(path: Path) -> CalibrationSet:
    from safetensors.torch import load_file

    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{mf}: not a calibration set (run toolkit calibrate first)")
    manifest = json.loads(mf.read_text())
    if manifest.get("type") != "calibration_set" or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mf}: not a calibration set of format {FORMAT_VERSION}")
    inter = load_file(str(path / manifest["files"]["intermediates"]))
    conditioning = load_file(str(path / manifest["files"]["conditioning"]))
    return CalibrationSet(path, manifest, inter["x_t"], inter["t"], inter["cond"],
                          conditioning["cond"], conditioning["noise"])


# --- CLI ---------------------------------------------------------------------------------------


def _calibrate_command(args: argparse.Namespace) -> int:
    from toolkit.checkpoint import load_checkpoint

    pipe = load_checkpoint(args.checkpoint)
    steps = args.steps or pipe.config.default_steps
    out = calibrate(pipe, Path(args.data), strategy=args.strategy, size=args.size, steps=steps,
                    seed=args.seed, out_dir=Path(args.out), guidance=args.guidance,
                    tau_fraction=args.tau_fraction, max_tracks=args.max_tracks,
                    coverage_iterations=args.coverage_iterations, augment=args.augment,
                    overwrite=args.overwrite)
    manifest = json.loads((out / MANIFEST).read_text())
    stats = json.loads((out / LAYER_STATS).read_text())
    print(json.dumps({"out": str(out), "strategy": manifest["strategy"], "size": manifest["size"],
                      "steps": manifest["steps"], "examples": len(manifest["examples"]),
                      "coverage": manifest["coverage"], "tau_var": stats["tau_var"],
                      "tau_reductions": stats["tau_reductions"],
                      "qualifying_layers": len(stats["qualifying_layers"]),
                      "drawn_steps": stats["drawn_steps"]}, indent=2))
    return 0


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """``toolkit calibrate``: register on the CLI's sub-parsers (sets ``func``)."""
    s = subparsers.add_parser("calibrate", help="build a calibration set (PTQ4ADM coverage + activation-aware sampling)")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--data", required=True, help="stems folder whose vocals are the conditioning set")
    s.add_argument("--strategy", choices=STRATEGIES, default="activation-aware",
                   help="how timesteps are drawn: activation-aware (PTQ4ADM), uniform (Q-Diffusion), "
                        "normal (PTQ4DM)")
    s.add_argument("--size", type=int, default=256, help="intermediates K (more: better ranges, bigger set)")
    s.add_argument("--steps", type=int, default=None, help="DDIM steps of the trajectory (default: the checkpoint's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    s.add_argument("--tau-fraction", type=float, default=TAU_FRACTION,
                   help="τ_var as a fraction of the largest layer variance (lower: more layers vote)")
    s.add_argument("--max-tracks", type=int, default=None, help="use only the first N tracks")
    s.add_argument("--coverage-iterations", type=int, default=8, help="I_max of the coverage loop")
    s.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="coverage-driven augmentation of the conditioning set (off: the tracks as they are)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="calibration set directory to write")
    s.set_defaults(func=_calibrate_command)
    return s
