"""Simulated evaluation of a plan (``toolkit evaluate --plan``): the whole pipeline with the plan's
fake quantization (:mod:`calibration.fakequant`), against full precision, on held-out pairs.

The fake-quantized pipeline quantizes the denoiser (the plan's top level) and the VAE decoder (its
``components.vae_decoder`` section) with activation ranges from the PTQ4ADM calibration set: the
denoiser's from the calibration intermediates, the decoder's from the final latents of sampling the
set's conditioning (the same inputs ``toolkit export`` calibrates targets with). The encoder stays
float. Per held-out track (a vocal and its true accompaniment), with the same vocal and seeds:

- paired metrics of the quantized output against the full-precision output (latent SNR, log-mel
  L1, MRSTFT, LSD, loudness difference, SI-SNR), each also relative to the full-precision model's
  own seed-to-seed spread on the same vocal;
- the Fréchet distance over log-mel frame statistics of both models' outputs to the true
  accompaniments, and its change;
- musical agreement (chords, key, tempo) of both models' outputs with the track's labels;
- model bytes under the plan against fp32 (quantizable weights at their width, the rest fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from calibration.fakequant import activation_ranges, observe_ranges, quantized_copy
from calibration.plan import BYTES_PER_WEIGHT, component_assignment
from calibration.sampling import load_calibration_set
from toolkit.checkpoint import Pipeline

DEFAULT_EVAL_TRACKS = 16


def _is_float(p) -> bool:
    return p.weights == "fp32" and p.activations == "fp32"


def quantized_pipeline(pipeline: Pipeline, plan: dict, calib_dir: Path | None, *,
                       observer: str = "minmax") -> Pipeline:
    """A copy of ``pipeline`` whose denoiser and VAE decoder are fake-quantized as ``plan`` says."""
    from calibration.feeds import calibration_feeds
    from toolkit.components import VAEDecoderExport

    den_assign = component_assignment(plan, "denoiser", pipeline.denoiser)
    den_plan = {n: p for n, p in den_assign.items() if not _is_float(p)}
    needs_ranges = any(p.activations in ("int8", "int16") for p in den_plan.values())
    calib = load_calibration_set(Path(calib_dir)) if calib_dir is not None else None
    if needs_ranges and calib is None:
        raise ValueError("the plan quantizes activations: pass --calib DIR (toolkit calibrate)")
    ranges = activation_ranges(pipeline.denoiser, calib, observer=observer) if needs_ranges else None
    denoiser = quantized_copy(pipeline.denoiser, den_plan, ranges, rounding=den_assign.rounding)

    vae = pipeline.family.fold_autoencoder(pipeline.vae).eval()  # quantize the folded weights the device gets
    decoder = VAEDecoderExport(vae, pipeline.config.latent_scale)
    dec_plan = component_assignment(plan, "vae_decoder", decoder) or {}
    dec_plan = {n: p for n, p in dec_plan.items() if not _is_float(p)}
    if dec_plan:
        dec_ranges = None
        if any(p.activations in ("int8", "int16") for p in dec_plan.values()):
            if calib_dir is None:
                raise ValueError("the plan quantizes decoder activations: pass --calib DIR")
            with torch.no_grad():
                dec_ranges = observe_ranges(decoder, calibration_feeds(pipeline, calib_dir, "vae_decoder"),
                                            observer=observer)
        vae = quantized_copy(vae, dec_plan, dec_ranges)  # decoder.* names are the VAE's own
    return dataclasses.replace(pipeline, denoiser=denoiser, vae=vae)


def plan_bytes(pipeline: Pipeline, plan: dict) -> dict:
    """Bytes of each component under ``plan`` and in fp32 (quantizable weights at their width)."""
    from toolkit.components import component_specs

    out = {}
    for name, spec in component_specs(pipeline).items():
        total = sum(p.numel() for p in spec.module.parameters()) * 4 + sum(
            b.numel() * b.element_size() for b in spec.module.buffers())
        assign = component_assignment(plan, name, spec.module) or {}
        planned = total
        for leaf, p in assign.items():
            w = spec.module.get_submodule(leaf).weight.numel()
            planned -= (4 - BYTES_PER_WEIGHT[p.weights]) * w
        out[name] = {"fp32_bytes": int(total), "planned_bytes": int(planned), "ratio": planned / total}
    fp32 = sum(v["fp32_bytes"] for v in out.values())
    planned = sum(v["planned_bytes"] for v in out.values())
    out["total"] = {"fp32_bytes": int(fp32), "planned_bytes": int(planned), "ratio": planned / fp32}
    return out


class _TorchPipe:
    """numpy encode / sample / decode over a (fake-quantized) PyTorch pipeline, for the harness."""

    def __init__(self, pipeline: Pipeline, steps: int, guidance: float):
        self.pipeline, self.steps, self.guidance = pipeline, steps, guidance

    @torch.no_grad()
    def encode(self, audio):
        from toolkit.generate import encode_audio

        return encode_audio(self.pipeline, torch.from_numpy(np.ascontiguousarray(audio))).numpy()

    @torch.no_grad()
    def sample(self, cond, noise):
        from toolkit.generate import sample_latent

        return sample_latent(self.pipeline, torch.from_numpy(cond), torch.from_numpy(np.ascontiguousarray(noise)),
                             steps=self.steps, guidance=self.guidance).numpy()

    @torch.no_grad()
    def decode(self, latent):
        from toolkit.generate import decode_latent

        return decode_latent(self.pipeline, torch.from_numpy(latent)).numpy()


def simulate_reference(pipeline: Pipeline, plan: dict, calib_dir: Path | None, bundle: Path,
                       manifest: dict) -> dict:
    """The aggregate ``runtime_py verify`` would report, from the plan's fake-quantized pipeline on
    the bundle's own reference inputs (for targets whose runtime does not run on this host)."""
    from runtime_py.bundle import load_reference
    from runtime_py.verify import quality_against_reference

    q = quantized_pipeline(pipeline, plan, calib_dir)
    inputs, ref = load_reference(Path(bundle), manifest)
    s = manifest["sampler"]
    _, aggregate = quality_against_reference(_TorchPipe(q, int(s["steps"]), float(s["guidance"])), inputs, ref,
                                             manifest["audio"]["sample_rate"])
    return aggregate


def evaluate_plan(pipeline: Pipeline, plan: dict, calib_dir: Path | None, data_dir: Path, *, steps: int,
                  guidance: float, seed: int = 0, max_tracks: int | None = DEFAULT_EVAL_TRACKS,
                  show_progress: bool = True) -> dict:
    """The evaluation of the module doc, as a JSON-ready dict."""
    from tqdm import tqdm

    from calibration.quality import log_mel_frechet
    from runtime_py import metrics
    from toolkit.data.music import AGREEMENT_FIELDS, agreement
    from toolkit.data.stems import list_tracks, load_track
    from toolkit.generate import generate_accompaniment

    q = quantized_pipeline(pipeline, plan, calib_dir)
    tracks = list_tracks(Path(data_dir))[:max_tracks]
    if not tracks:
        raise ValueError(f"{data_dir}: no tracks to evaluate on (toolkit data synth --out {data_dir})")
    sr = pipeline.sample_rate
    rows, fp32_audio, q_audio, truth = [], [], [], []
    music = {"fp32": [], "quantized": []}
    for path in tqdm(tracks, desc="evaluate plan", disable=not show_progress, file=sys.stderr):
        track = load_track(path, sample_rate=sr, channels=pipeline.audio_channels)
        ref_lat, test_lat = [], []
        # Segments of the training length: the calibration set, the sensitivity table and the
        # "worst segment" figure are all per training-length segment.
        ref = generate_accompaniment(pipeline, track.vocals, steps=steps, guidance=guidance, seed=seed,
                                     latents=ref_lat, mode="segments")
        other = generate_accompaniment(pipeline, track.vocals, steps=steps, guidance=guidance, seed=seed + 1,
                                       mode="segments")
        test = generate_accompaniment(q, track.vocals, steps=steps, guidance=guidance, seed=seed, latents=test_lat,
                                      mode="segments")
        dist = metrics.paired_audio_metrics(ref, test, sr)
        spread = metrics.paired_audio_metrics(ref, other, sr)
        seg_snr = [metrics.capped_snr_db(metrics.snr_db(a, b)) for a, b in zip(ref_lat, test_lat)]
        rows.append({"track": track.name, **dist, "seed_spread": spread,
                     "relative_to_spread": metrics.relative_to_spread(dist, spread),
                     "latent_snr_db": float(np.mean(seg_snr)), "latent_snr_db_worst_segment": float(min(seg_snr)),
                     "audio_snr_db": metrics.snr_db(ref, test)})
        fp32_audio.append(ref)
        q_audio.append(test)
        truth.append(track.accompaniment)
        if track.labels and "chords" in track.labels:
            for key, audio in (("fp32", ref), ("quantized", test)):
                music[key].append(agreement(audio, sr, track.labels))

    def mean(items, key):
        vals = [r[key] for r in items if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    fd_fp32 = log_mel_frechet(fp32_audio, truth, sr)
    fd_q = log_mel_frechet(q_audio, truth, sr)
    paired = {k: mean(rows, k) for k in (*metrics.DISTANCES, "si_snr_db", "audio_snr_db", "latent_snr_db")}
    paired["latent_snr_db_worst_segment"] = float(min(r["latent_snr_db_worst_segment"] for r in rows))
    relative = {k: {"mean": float(np.mean([r["relative_to_spread"][k] for r in rows])),
                    "worst": float(np.max([r["relative_to_spread"][k] for r in rows]))}
                for k in metrics.DISTANCES}
    return {
        "type": "plan_evaluation", "plan": plan.get("name"), "model": pipeline.config.name,
        "tracks": len(rows), "steps": steps, "guidance": guidance, "seed": seed,
        "calibration_set": str(calib_dir) if calib_dir is not None else None,
        "paired": paired, "relative_to_spread": relative,
        "frechet_log_mel": {"fp32_to_truth": fd_fp32, "quantized_to_truth": fd_q, "change": fd_q - fd_fp32},
        "musical_agreement": {k: {m: mean(v, m) for m in AGREEMENT_FIELDS}
                              for k, v in music.items()} if music["fp32"] else None,
        "size": plan_bytes(pipeline, plan),
        "per_track": rows,
    }


def _evaluate_plan_command(args: argparse.Namespace, pipeline: Pipeline) -> dict:
    plan_path = Path(args.plan)
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{plan_path}: not a readable plan JSON ({exc}); make one with toolkit plan") from None
    if plan.get("type") != "quantization_plan":
        raise ValueError(f"{plan_path}: field 'type' is {plan.get('type')!r}, not 'quantization_plan'; "
                         "make one with toolkit plan")
    steps = args.steps or pipeline.config.default_steps
    guidance = pipeline.config.default_guidance if args.guidance is None else args.guidance
    return evaluate_plan(pipeline, plan, Path(args.calib) if args.calib else None, Path(args.data), steps=steps,
                         guidance=guidance, seed=args.seed, max_tracks=args.max_tracks or DEFAULT_EVAL_TRACKS)
