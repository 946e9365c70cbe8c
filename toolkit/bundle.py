"""``toolkit export``: one self-describing bundle per target (ARCHITECTURE.md's Bundle contract).

A bundle holds ``manifest.json``, the three component files, and ``reference/`` (see
:mod:`toolkit.reference`). Parity against PyTorch is part of export (:mod:`toolkit.parity`); a
quantized bundle is judged against its quality budget on this host before it is kept
(:mod:`toolkit.quality_gate`). The bundle is written to a temporary directory and renamed when
complete; what a killed export left behind is removed by the next export into the same folder.

Quantized bundles (``plan`` + ``calib``): each component's share of the plan is resolved by FQN
(``calibration.plan.component_assignment``; the encoder stays float unless the plan has a section
for it), its calibration inputs come from the PTQ4ADM calibration set
(:func:`calibration.feeds.calibration_feeds`), and the target writes a lowering report. The
bundle's name and the manifest's ``precision`` describe what the target *applied*: a plan that a
target lowered only in part is named ``<plan>-partial``, one it lowered to no integer layer at
all ``fp32-from-<plan>``; the requested plan stays in ``requested_precision`` and ``plan``.

Long audio (``frames``): every component is exported at that many latent frames (the whole latent
in one pass), the reference is that long, and the model part of the bundle's name says so
(``<model>-<frames>f[-litefocus]``). With ``litefocus`` the denoiser takes its compensation set as
an int64 input and the manifest's ``attention`` field says how a device draws it per call
(:func:`toolkit.components.attention_record`); the reference is sampled with the same draws.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import toolkit
from runtime_py.bundle import (FORMAT_VERSION, MANIFEST, hash_tree, manifest_digest, validate_manifest)
from toolkit.atomic import promote, remove_stale_partials, staging_directory
from toolkit.checkpoint import Pipeline
from toolkit.components import COMPONENTS, attention_record, check_export_length, component_specs, denoiser_batch
from toolkit.diffusion import make_table
from toolkit.export_errors import ParityError, QualityBudgetError
from toolkit.models.litefocus import LiteFocusConfig
from toolkit.parity import MIN_PARITY_SQNR_DB, MIN_QUANTIZED_PARITY_SQNR_DB, check_parity
from toolkit.quality_gate import DEFAULT_QUALITY_BUDGET, QUANTIZED_QUALITY_BUDGET, host_quality_check
from toolkit.reference import REFERENCE_EXAMPLES, REFERENCE_SEEDS, make_reference


def _io(names, tensors) -> list[dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, tensors)]


def lowering_differences(components: dict) -> list[dict]:
    """Every planned layer a target did not lower as requested: component, layer, both, and why."""
    out = []
    for comp_name, comp in components.items():
        layers = ((comp.get("details") or {}).get("lowering") or {}).get("layers") or {}
        for layer, rec in layers.items():
            if not rec["honoured"]:
                out.append({"component": comp_name, "layer": layer, "requested": rec["requested"],
                            "applied": rec["applied"], "why": rec["why"]})
    return out


INTEGER_TYPES = ("int4", "int8", "int16")


def applied_label(requested: str, components: dict, *, plan: dict | None) -> str:
    """The bundle's precision label from what the targets applied (see the module doc).

    The label names the integer quantization: it keeps the plan's name when every integer weight
    and activation the plan asked for was applied at that width (a float layer run in fp32 rather
    than fp16 is in the lowering report, not the name), ``<plan>-partial`` when some were not, and
    ``fp32-from-<plan>`` when no layer runs with integers at all.
    """
    if plan is None:
        return requested
    records = [rec for comp in components.values()
               for rec in (((comp.get("details") or {}).get("lowering") or {}).get("layers") or {}).values()]
    missed = [r for r in records for kind in ("weights", "activations")
              if r["requested"][kind] in INTEGER_TYPES and r["applied"][kind] != r["requested"][kind]]
    if not missed:
        return requested
    integer = any(r["applied"][kind] in INTEGER_TYPES for r in records for kind in ("weights", "activations"))
    return f"{requested}-partial" if integer else f"fp32-from-{requested}"


# Targets whose exported denoiser takes LiteFocus's int64 compensation-index input and whose runtime
# runs here or is known to: Core ML takes int32 inputs only, and TensorRT's handling of the int64
# gather input is unverified (no GPU here), so a LiteFocus bundle for them is refused, not guessed.
LITEFOCUS_TARGETS = ("executorch", "onnx")


def bundle_model_name(model: str, frames: int, training_frames: int, litefocus: LiteFocusConfig | None) -> str:
    """The model part of a bundle's name: ``<model>`` at the training length, else
    ``<model>-<frames>f`` and ``-litefocus`` when its attention is LiteFocus."""
    if frames == training_frames:
        return model
    return f"{model}-{frames}f" + ("-litefocus" if litefocus is not None else "")


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
    progress: bool = False,
    frames: int | None = None,
    litefocus: LiteFocusConfig | None = None,
) -> Path:
    """Export every component of ``pipeline`` to ``target`` and write the bundle; returns its path.

    ``frames``: latent frames the bundle runs at (default: the training length); ``litefocus``: the
    denoiser's global attention beyond the training length (its C an input, see the module doc).

    ``progress``: a bar on stderr over the export's stages (each component's lowering and parity,
    the reference trajectories, the host quality check of a plan).
    """
    from runtime_py.runners import runtime_version
    from targets import EXPORT_PRECISIONS, TARGETS, get_target

    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"precision must be one of {EXPORT_PRECISIONS}, got {precision!r}")
    training_frames = pipeline.latent_shape[1]
    frames = training_frames if frames is None else int(frames)
    check_export_length(pipeline, frames, litefocus)
    if litefocus is not None and target not in LITEFOCUS_TARGETS:
        raise ValueError(f"--attention litefocus: target {target} is not supported (its denoiser would take the "
                         f"int64 compensation indices as an input: Core ML takes int32 inputs only, TensorRT's "
                         f"int64 gather is unverified here); export --target {' or '.join(LITEFOCUS_TARGETS)}, "
                         f"or --attention dense for {target}")
    if plan is not None and frames != training_frames:
        raise ValueError(f"--plan with --frames {frames}: the calibration set and the plan's sensitivity were "
                         f"measured at the training length ({training_frames} frames); export a long bundle in "
                         "float (--precision fp32 or fp16), or a quantized one at the training length")
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
    requested = precision if plan is None else str(plan.get("name") or "plan")
    entry = TARGETS[target]
    model_name = bundle_model_name(pipeline.config.name, frames, training_frames, litefocus)
    if not overwrite and (out_root / entry.bundle_name(model_name, requested)).exists():
        raise FileExistsError(f"{out_root / entry.bundle_name(model_name, requested)} exists; "
                              "choose another output or remove it")
    remove_stale_partials(out_root)
    from tqdm import tqdm

    bar = tqdm(total=len(COMPONENTS) + 1 + (plan is not None), unit="stage", disable=not progress,
               file=sys.stderr, leave=False, desc=f"{target} export")
    with staging_directory(out_root, prefix=entry.bundle_name(model_name, requested)) as tmp, bar:
        specs = component_specs(pipeline, frames=frames, litefocus=litefocus)
        components = {}
        for name in COMPONENTS:
            bar.set_postfix_str(f"lowering {name}")
            spec = specs[name]
            layer_plan = feeds = None
            if plan is not None:
                from calibration.feeds import calibration_feeds
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
                                      floor=MIN_QUANTIZED_PARITY_SQNR_DB)
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
            bar.update()
        if hasattr(module, "write_extras"):
            module.write_extras(tmp, components)
        label = applied_label(requested, components, plan=plan)
        ref_dir = tmp / "reference"
        ref_dir.mkdir()
        bar.set_postfix_str(f"reference: {REFERENCE_EXAMPLES} examples × {len(REFERENCE_SEEDS)} seeds × {steps} steps")
        inputs, outputs = make_reference(pipeline, steps=steps, guidance=guidance, examples=REFERENCE_EXAMPLES,
                                         seeds=REFERENCE_SEEDS, frames=frames, litefocus=litefocus)
        np.savez(ref_dir / "inputs.npz", **inputs)
        np.savez(ref_dir / "outputs.npz", **outputs)
        bar.update()
        table = make_table(pipeline.config.schedule, steps)
        manifest = {
            "format_version": FORMAT_VERSION, "toolkit_version": toolkit.__version__,
            "model": pipeline.config.name, "family": pipeline.config.family, "target": target,
            "precision": label, "requested_precision": requested,
            "runtime": {"name": target, "distribution": TARGETS[target].runtime_distribution,
                        "version_at_export": runtime_version(target)},
            "exported_on": {"platform": platform.platform(), "torch": torch.__version__},
            "sampler": {"kind": "ddim", "parameterization": "v", "steps": steps,
                        **table.to_dict(), "guidance": guidance,
                        "guidance_folded": pipeline.config.guidance_folded,
                        "denoiser_batch": denoiser_batch(pipeline)},
            "audio": {"sample_rate": pipeline.sample_rate, "channels": pipeline.audio_channels,
                      "segment_samples": specs["vae_encoder"].example_inputs[0].shape[-1]},
            "latent": {"frames": frames, "training_frames": training_frames},
            "attention": attention_record(pipeline, frames, litefocus),
            "components": components,
            "lowering_differences": lowering_differences(components),
            "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz",
                          "examples": REFERENCE_EXAMPLES, "seeds": list(REFERENCE_SEEDS),
                          "computed_with": "PyTorch fp32 (toolkit.generate)" + (
                              ", LiteFocus with the compensation draws of 'attention'" if litefocus else "")},
            "quality_budget": quality_budget or (QUANTIZED_QUALITY_BUDGET if plan is not None
                                                 else DEFAULT_QUALITY_BUDGET[precision]),
            "plan": plan,
            "calibration_set": str(calib) if calib is not None else None,
            "source_checkpoint": str(pipeline.path) if pipeline.path else None,
        }
        manifest["files"] = hash_tree(tmp)
        final = out_root / entry.bundle_name(model_name, label)
        _write_manifest(tmp, manifest, source=str(final / MANIFEST))
        if plan is not None:
            bar.set_postfix_str("host quality check")
            manifest["host_check"] = host_quality_check(pipeline, tmp, manifest, plan=plan, calib=calib)
            _write_manifest(tmp, manifest, source=str(final / MANIFEST))
            bar.update()
            if manifest["host_check"]["status"] == "fail" and not force:
                lines = [f"{l['metric']} = {l['value']:.3g} (limit {l['limit']})"
                         for l in manifest["host_check"]["lines"] if not l["pass"]]
                raise QualityBudgetError(
                    f"{target} bundle for plan {requested!r} breaks its quality budget on this host "
                    f"({manifest['host_check']['how']}): " + "; ".join(lines)
                    + ". Raise the plan's precision (toolkit plan --sensitivity ... --min-snr-db), loosen "
                      "--quality-budget, or pass --force to keep it anyway")
        promote(tmp, final, overwrite=overwrite)
    return final


def _write_manifest(bundle: Path, manifest: dict, *, source: str) -> None:
    """Validate ``manifest``, seal it with its digest and write it into ``bundle``."""
    manifest.pop("manifest_sha256", None)
    validate_manifest(manifest, source=source)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (Path(bundle) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float) + "\n")


def export_summary(manifest: dict) -> list[str]:
    """A few lines a person reads after ``toolkit export``: applied vs requested precision, every
    departure from the plan with its reason (grouped), parity, and what the host check was."""
    lines = [f"precision applied: {manifest['precision']}"
             + ("" if manifest.get("requested_precision") in (None, manifest["precision"])
                else f" (requested {manifest['requested_precision']})")]
    diffs = manifest.get("lowering_differences") or []
    if diffs:
        from collections import Counter

        reasons = Counter((d["component"], d["why"]) for d in diffs)
        lines.append(f"{len(diffs)} planned layers not lowered as requested:")
        lines += [f"  {comp}: {n} layers: {why}" for (comp, why), n in reasons.most_common()]
    parity = {name: (f"{c['parity']['sqnr_db']:.1f} dB" if "sqnr_db" in c["parity"] else c["parity"]["status"])
              for name, c in manifest["components"].items()}
    lines.append("parity SQNR against PyTorch: " + ", ".join(f"{k} {v}" for k, v in parity.items()))
    check = manifest.get("host_check")
    if check:
        lines.append(f"host quality check: {check['status']} — {check['kind']}: {check['how']}")
    return lines


def _plan_is_weight_only(plan: dict) -> bool:
    """True when no section of ``plan`` quantizes activations (then no calibration set is needed)."""
    sections = [plan, *(plan.get("components") or {}).values()]
    entries = [s["default"] for s in sections] + [o for s in sections for o in s.get("overrides", {}).values()]
    return all(e.get("activations") not in ("int8", "int16") for e in entries)
