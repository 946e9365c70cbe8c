"""``toolkit export``: one self-describing bundle per target (DESIGN.md's Bundle contract).

A bundle holds ``manifest.json``, the three component files, and ``reference/``: a few vocal
inputs with, for two seeds each, the initial noise and the full-precision PyTorch outputs (final
latents and audio), so a device can judge paired distances against the model's own seed spread.
Parity against PyTorch is part of export: each component runs through its target's runtime where
that runtime runs here, and the figures go into the manifest. The bundle is written to a
temporary directory and renamed when complete.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

import toolkit
from runtime_py import metrics
from runtime_py.bundle import FORMAT_VERSION, MANIFEST, hash_tree, validate_manifest
from toolkit.atomic import atomic_directory
from toolkit.checkpoint import Pipeline
from toolkit.components import COMPONENTS, component_specs, denoiser_batch
from toolkit.data.synth import synth_pair_at_rate
from toolkit.diffusion import make_table
from toolkit.generate import decode_latent, encode_audio, sample_latent

# Host-side parity floors (SQNR of the target's output against PyTorch's, dB), per precision.
MIN_PARITY_SQNR_DB = {"fp32": 60.0, "fp16": 25.0}
# Default quality budgets that runtime_py enforces on the device, per precision.
DEFAULT_QUALITY_BUDGET = {
    "fp32": {"latent_snr_db_min": 40.0, "max_relative_to_spread": 0.25},
    "fp16": {"latent_snr_db_min": 20.0, "max_relative_to_spread": 0.25},
}
REFERENCE_SEEDS = (0, 1)
REFERENCE_EXAMPLES = 2


class ParityError(RuntimeError):
    """A component's output on its target runtime is too far from PyTorch's."""


def bundle_name(model: str, target: str, precision: str) -> str:
    """``<model>-<target>[-<precision>]``; fp32 is the unsuffixed default."""
    return f"{model}-{target}" + ("" if precision == "fp32" else f"-{precision}")


def make_reference(pipeline: Pipeline, *, steps: int, guidance: float, examples: int,
                   seeds: tuple[int, ...]) -> tuple[dict, dict]:
    """Full-precision outputs for ``examples`` synthetic vocals × ``seeds`` initial noises."""
    # The synthesizer writes at least a second (one melody note); longer than a segment is cropped.
    seconds = max(1.0, pipeline.segment_samples / pipeline.sample_rate)
    vocals = np.stack([
        synth_pair_at_rate(20_000 + i, seconds=seconds, sample_rate=pipeline.sample_rate,
                   channels=pipeline.audio_channels)[0][:, :pipeline.segment_samples]
        for i in range(examples)]).astype(np.float32)
    noise = np.stack([
        np.stack([torch.randn(pipeline.latent_shape, generator=torch.Generator().manual_seed(
            1000 * i + s)).numpy() for s in seeds]) for i in range(examples)]).astype(np.float32)
    vocal_latent, latents, audio = [], [], []
    with torch.no_grad():
        for i in range(examples):
            cond = encode_audio(pipeline, torch.from_numpy(vocals[i:i + 1]))
            vocal_latent.append(cond[0].numpy())
            lat_i, aud_i = [], []
            for j in range(len(seeds)):
                lat = sample_latent(pipeline, cond, torch.from_numpy(noise[i, j:j + 1]), steps=steps,
                                    guidance=guidance)
                lat_i.append(lat[0].numpy())
                aud_i.append(decode_latent(pipeline, lat)[0].numpy())
            latents.append(np.stack(lat_i)); audio.append(np.stack(aud_i))
    inputs = {"vocals": vocals, "noise": noise}
    outputs = {"vocal_latent": np.stack(vocal_latent), "latents": np.stack(latents),
               "audio": np.stack(audio)}
    return inputs, outputs


def _io(names, tensors) -> list[dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, tensors)]


def check_parity(target: str, spec, path: Path, precision: str) -> dict:
    """Run the exported component on its runtime here and compare with PyTorch."""
    from runtime_py.runners import load_runner, runtime_unavailable

    runtime = target
    why = runtime_unavailable(target)
    if why is not None and target == "tensorrt" and path.suffix == ".onnx":
        runtime, why = "onnx", runtime_unavailable("onnx")  # the TensorRT graph, run by ONNX Runtime
    if why is not None:
        return {"status": "not run", "reason": why}
    runner = load_runner(runtime, path)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
    got = next(iter(runner.run(feeds).values()))
    with torch.no_grad():
        want = spec.module(*spec.example_inputs).numpy()
    sqnr = metrics.snr_db(want, got)
    floor = MIN_PARITY_SQNR_DB[precision]
    return {"status": "pass" if sqnr >= floor else "fail", "runtime": runtime,
            "sqnr_db": sqnr, "min_sqnr_db": floor,
            "max_abs_diff": float(np.max(np.abs(want - got)))}


def export_bundle(
    pipeline: Pipeline,
    *,
    target: str,
    out_root: Path,
    precision: str = "fp32",
    steps: int | None = None,
    guidance: float | None = None,
    plan: dict | None = None,
    calib: Path | None = None,
    quality_budget: dict | None = None,
    force: bool = False,
    overwrite: bool = True,
) -> Path:
    """Export every component of ``pipeline`` to ``target`` and write the bundle; returns its path."""
    from runtime_py.runners import runtime_version
    from targets import get_target

    if precision not in MIN_PARITY_SQNR_DB:
        raise ValueError(f"precision must be one of {sorted(MIN_PARITY_SQNR_DB)}, got {precision!r}")
    module = get_target(target)
    why = module.available()
    if why is not None:
        raise RuntimeError(f"target {target} cannot export here: {why}")
    steps = steps or pipeline.config.default_steps
    guidance = pipeline.config.default_guidance if guidance is None else guidance
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / bundle_name(pipeline.config.name, target, precision)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        specs = component_specs(pipeline)
        components = {}
        for name in COMPONENTS:
            spec = specs[name]
            artifact = module.export(spec, precision=precision, plan=plan, calib=calib, out_dir=tmp)
            parity = check_parity(target, spec, tmp / artifact.path, precision)
            if parity["status"] == "fail" and not force:
                raise ParityError(f"{target} {name}: SQNR {parity['sqnr_db']:.1f} dB against PyTorch is "
                                  f"below {parity['min_sqnr_db']} dB; pass force to keep it anyway")
            with torch.no_grad():
                outs = spec.module(*spec.example_inputs)
            components[name] = {
                "path": artifact.path, "precision": artifact.precision,
                "inputs": _io(spec.input_names, spec.example_inputs),
                "outputs": _io(spec.output_names, (outs,)),
                "details": artifact.details, "parity": parity,
            }
        if hasattr(module, "write_extras"):
            module.write_extras(tmp, components)
        ref_dir = tmp / "reference"
        ref_dir.mkdir()
        inputs, outputs = make_reference(pipeline, steps=steps, guidance=guidance,
                                         examples=REFERENCE_EXAMPLES, seeds=REFERENCE_SEEDS)
        np.savez(ref_dir / "inputs.npz", **inputs)
        np.savez(ref_dir / "outputs.npz", **outputs)
        table = make_table(pipeline.config.schedule, steps)
        manifest = {
            "format_version": FORMAT_VERSION, "toolkit_version": toolkit.__version__,
            "model": pipeline.config.name, "target": target, "precision": precision,
            "runtime": {"name": target, "version_at_export": runtime_version(target)},
            "exported_on": {"platform": platform.platform(), "torch": torch.__version__},
            "sampler": {"kind": "ddim", "parameterization": "v", "steps": steps,
                        **table.to_dict(), "guidance": guidance,
                        "guidance_folded": pipeline.config.guidance_folded,
                        "denoiser_batch": denoiser_batch(pipeline)},
            "audio": {"sample_rate": pipeline.sample_rate, "channels": pipeline.audio_channels,
                      "segment_samples": pipeline.segment_samples},
            "components": components,
            "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz",
                          "examples": REFERENCE_EXAMPLES, "seeds": list(REFERENCE_SEEDS),
                          "computed_with": "PyTorch fp32 (toolkit.generate)"},
            "quality_budget": quality_budget or DEFAULT_QUALITY_BUDGET[precision],
            "plan": plan,
            "source_checkpoint": str(pipeline.path) if pipeline.path else None,
        }
        manifest["files"] = hash_tree(tmp)
        validate_manifest(manifest, source=str(final / MANIFEST))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
    return final
