"""``toolkit export``: one self-describing bundle per target (DESIGN.md's Bundle contract).

A bundle holds ``manifest.json``, the three component files, and ``reference/``: a few vocal
inputs with, for two seeds each, the initial noise and the full-precision PyTorch outputs (final
latents and audio), so a device can judge paired distances against the model's own seed spread.
Parity against PyTorch is part of export: each component runs through its target's runtime where
that runtime runs here, and the figures go into the manifest. The bundle is written to a
temporary directory and renamed when complete.

Quantized bundles (``plan`` + ``calib``): each component's share of the plan is resolved by FQN
(``calibration.plan.component_assignment``; the encoder stays float unless the plan has a section
for it), its calibration inputs come from the PTQ4ADM calibration set (:func:`calibration_feeds`),
and the target writes a lowering report. The manifest carries the quantized quality budget
(``QUANTIZED_QUALITY_BUDGET`` unless overridden), and before the bundle is renamed into place the
host runs the very check the device will run (``runtime_py.verify``) where the target's runtime
runs here, else the plan's fake-quantized PyTorch simulation on the same reference inputs; a
bundle that already breaks its budget on the host is refused with the figures unless ``force``.
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
from toolkit.export_errors import ParityError, QualityBudgetError
from toolkit.generate import decode_latent, encode_audio, sample_latent

# Host-side parity floors (SQNR of the target's output against PyTorch's, dB), per precision.
MIN_PARITY_SQNR_DB = {"fp32": 60.0, "fp16": 25.0}
# Default quality budgets that runtime_py enforces on the device, per precision.
DEFAULT_QUALITY_BUDGET = {
    "fp32": {"latent_snr_db_min": 40.0, "max_relative_to_spread": 0.25},
    "fp16": {"latent_snr_db_min": 20.0, "max_relative_to_spread": 0.25},
}
# Quantized bundles (issue: quantized lowering): every paired audio distance to full precision at
# most 25 % of the full-precision seed-to-seed spread, and latent SNR >= 20 dB.
QUANTIZED_QUALITY_BUDGET = {"latent_snr_db_min": 20.0, "max_relative_to_spread": 0.25}
# Host-side parity floor of a quantized component against fp32 PyTorch, on a calibration input
# (SQNR, dB), per target: a lowering that breaks a layer (wrong scale, axis, zero point) lands far
# below; the end-to-end budget, not this floor, judges whether the plan is good enough.
MIN_QUANTIZED_PARITY_SQNR_DB = {"executorch": 15.0, "onnx": 15.0, "tensorrt": 15.0, "coreml": 15.0}
MAX_CALIBRATION_FEEDS = 128  # calibration inputs per component (intermediates beyond are not used)
DECODER_CALIBRATION_EXAMPLES = 16  # final latents sampled for the VAE decoder's calibration
REFERENCE_SEEDS = (0, 1)
REFERENCE_EXAMPLES = 2


def calibration_feeds(pipeline: Pipeline, calib_dir: Path, component: str, *,
                      limit: int = MAX_CALIBRATION_FEEDS) -> list[tuple[torch.Tensor, ...]]:
    """Calibration inputs of one component, in its export signature, from a calibration set.

    denoiser: the PTQ4ADM intermediates (x_t, t, cond), both CFG branches per call when the
    model is not folded; vae_decoder: the final latents of full-precision sampling from the set's
    conditioning examples and stored noise (what the decoder sees on the device).
    """
    from calibration.fakequant import denoiser_feeds
    from calibration.sampling import load_calibration_set

    calib = load_calibration_set(Path(calib_dir))
    if tuple(calib.manifest["latent_shape"]) != tuple(pipeline.latent_shape):
        raise ValueError(f"{calib_dir}: calibration set latents {calib.manifest['latent_shape']} do not "
                         f"match the model's {list(pipeline.latent_shape)}; calibrate this checkpoint")
    if component == "denoiser":
        return denoiser_feeds(calib, batch=denoiser_batch(pipeline), limit=limit,
                              folded=pipeline.config.guidance_folded)
    if component == "vae_decoder":
        n = min(DECODER_CALIBRATION_EXAMPLES, calib.conditioning.shape[0])
        latents = sample_latent(pipeline, calib.conditioning[:n], calib.noise[:n],
                                steps=int(calib.manifest["steps"]), guidance=float(calib.manifest["guidance"]))
        return [(latents[i:i + 1],) for i in range(n)]
    raise ValueError(f"{component}: no calibration inputs for this component (the calibration set holds "
                     "latents); keep it float by leaving it out of the plan")


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


def check_parity(target: str, spec, path: Path, precision: str, *, inputs=None,
                 floor: float | None = None) -> dict:
    """Run the exported component on its runtime here and compare with PyTorch (fp32).

    ``inputs`` default to the spec's example inputs; ``floor`` to the precision's.
    """
    from runtime_py.runners import load_runner, runtime_unavailable

    runtime = target
    why = runtime_unavailable(target)
    if why is not None and target == "tensorrt" and path.suffix == ".onnx":
        runtime, why = "onnx", runtime_unavailable("onnx")  # the TensorRT graph, run by ONNX Runtime
    if why is not None:
        return {"status": "not run", "reason": why}
    runner = load_runner(runtime, path)
    inputs = tuple(spec.example_inputs) if inputs is None else tuple(inputs)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    got = next(iter(runner.run(feeds).values()))
    with torch.no_grad():
        want = spec.module(*inputs).numpy()
    sqnr = metrics.snr_db(want, got)
    floor = MIN_PARITY_SQNR_DB[precision] if floor is None else floor
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
    if (plan is None) != (calib is None) and not (plan is not None and _plan_is_weight_only(plan)):
        raise ValueError("a quantized export needs both --plan (toolkit plan) and --calib (toolkit calibrate)"
                         if plan is not None else "--calib without --plan quantizes nothing; pass a plan too")
    if plan is not None and precision != "fp32":
        raise ValueError("a plan sets every layer's precision; leave --precision at fp32")
    label = precision if plan is None else str(plan.get("name") or "plan")
    final = out_root / bundle_name(pipeline.config.name, target, label)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        specs = component_specs(pipeline)
        components = {}
        for name in COMPONENTS:
            spec = specs[name]
            layer_plan = feeds = None
            if plan is not None:
                from calibration.plan import component_assignment

                layer_plan = component_assignment(plan, name, spec.module, source="plan")
                if layer_plan is not None and all(p.weights == "fp32" and p.activations == "fp32"
                                                  for p in layer_plan.values()):
                    layer_plan = None
                if layer_plan is not None and calib is not None:
                    feeds = calibration_feeds(pipeline, calib, name)
            artifact = module.export(spec, precision=precision, plan=layer_plan, calib=feeds, out_dir=tmp)
            if layer_plan is None:
                parity = check_parity(target, spec, tmp / artifact.path, precision)
            else:
                parity = check_parity(target, spec, tmp / artifact.path, precision,
                                      inputs=feeds[-1] if feeds else None,
                                      floor=MIN_QUANTIZED_PARITY_SQNR_DB[target])
                parity["inputs"] = "last calibration input" if feeds else "example inputs"
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
            "quality_budget": quality_budget or (QUANTIZED_QUALITY_BUDGET if plan is not None
                                                 else DEFAULT_QUALITY_BUDGET[precision]),
            "plan": plan,
            "calibration_set": str(calib) if calib is not None else None,
            "source_checkpoint": str(pipeline.path) if pipeline.path else None,
        }
        manifest["files"] = hash_tree(tmp)
        validate_manifest(manifest, source=str(final / MANIFEST))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
        if plan is not None:
            manifest["host_check"] = host_quality_check(pipeline, tmp, manifest, plan=plan, calib=calib)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
            if manifest["host_check"]["status"] == "fail" and not force:
                lines = [f"{l['metric']} = {l['value']:.3g} (limit {l['limit']})"
                         for l in manifest["host_check"]["lines"] if not l["pass"]]
                raise QualityBudgetError(
                    f"{target} bundle for plan {label!r} breaks its quality budget on this host "
                    f"({manifest['host_check']['how']}): " + "; ".join(lines)
                    + ". Raise the plan's precision (toolkit plan --sensitivity ... --min-snr-db), loosen "
                      "--quality-budget, or pass --force to keep it anyway")
    return final


def _plan_is_weight_only(plan: dict) -> bool:
    """True when no section of ``plan`` quantizes activations (then no calibration set is needed)."""
    sections = [plan, *(plan.get("components") or {}).values()]
    entries = [s["default"] for s in sections] + [o for s in sections for o in s.get("overrides", {}).values()]
    return all(e.get("activations") not in ("int8", "int16") for e in entries)


def host_quality_check(pipeline: Pipeline, bundle: Path, manifest: dict, *, plan: dict,
                       calib: Path | None) -> dict:
    """The budget judged on this host before the bundle is kept (see the module doc)."""
    from runtime_py.bundle import load_reference
    from runtime_py.runners import runtime_unavailable
    from runtime_py.verify import Pipeline as DevicePipeline
    from runtime_py.verify import judge, quality_against_reference

    why = runtime_unavailable(manifest["target"])
    if why is None:  # the device's own quality check, on this host's runtime
        inputs, ref = load_reference(bundle, manifest)
        _, aggregate = quality_against_reference(DevicePipeline(bundle, manifest, threads=None), inputs, ref,
                                                 manifest["audio"]["sample_rate"])
        how = f"runtime_py's quality check with {manifest['target']} on this host"
    else:
        from calibration.evaluate_plan import simulate_reference

        aggregate = simulate_reference(pipeline, plan, calib, bundle, manifest)
        how = f"fake-quantized PyTorch simulation of the plan ({manifest['target']} cannot run here: {why})"
    lines = judge(aggregate, manifest["quality_budget"])
    return {"how": how, "status": "pass" if all(line["pass"] for line in lines) else "fail",
            "aggregate": aggregate, "lines": lines}
