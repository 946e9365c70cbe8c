"""Quantization plans (ARCHITECTURE.md): a default precision, per-layer overrides by FQN, and the budget.

A preset names the default (``w8a16``, ``w8a8``, ``w4a8``) and keeps the layers the literature
finds fragile at a higher precision (fp16 weights and activations): the first and last
convolutions (PTQ4DM, and PTQ4ADM §6.2 "initial and final U-Net backbone layers are susceptible")
and attention (PTQ4ADM Table 1: "attention layers are at full precision").

With a sensitivity table, :func:`search_plan` then fits the plan to a size budget (``size=0.30``:
the quantized denoiser's bytes at most 30 % of its fp32 bytes) greedily: while over budget, the
step down the weight ladder (fp16 → int8 → int4) with the least loss per byte saved is taken;
the preset's kept-high layers are lowered only once every other layer is at int4. Then, while
bytes remain, the step up with the most loss recovered per byte spent. The loss of a
layer at a precision is the latent-SNR drop it caused alone (the table's ``latent_snr_db``, as
``LOSSLESS_SNR_DB − snr``); fp16 and fp32 count as lossless. Every move is recorded in the plan.

With a sensitivity table and a quality target (``--min-snr-db``, default
``DEFAULT_MIN_SNR_DB``), :func:`refine_with_sensitivity` first decides which layers stay high from
the measurement rather than the literature: every measured layer starts at the preset, the
predicted end-to-end latent SNR is that of independent per-layer errors adding up
(−10·log10 Σ 10^(−SNR_i/10)), and while it is below the target the layer with the largest error
moves one rung up its precision ladder (e.g. W8A8 → W8A16 → fp16). Layers the literature names
but the measurement finds harmless are quantized like the rest; the plan records every move.

The VAE decoder gets its own section (``components.vae_decoder``): the preset's precision with
the first and last convolutions kept high. The encoder runs once per clip and stays float.

``--search autotune`` (:mod:`calibration.autotune`) instead lets neural-compressor's tuning loop pick
the plan: its trials are this module's plans (a registered INC config), each scored end to end
by sampling; ``--rounding gptq`` (:mod:`calibration.gptq`) chooses the integer weights of any plan
from the calibration inputs, and the plan names the file that holds them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from calibration.precision import PRECISIONS, LayerPrecision
from toolkit.atomic import write_text_atomically

FORMAT_VERSION = 1
LOSSLESS_SNR_DB = 100.0  # a layer whose quantization leaves ≥ this latent SNR counts as lossless
BYTES_PER_WEIGHT = {"int4": 0.5, "int8": 1.0, "fp16": 2.0, "fp32": 4.0}
WEIGHT_LADDER = ("int4", "int8", "fp16")  # search moves along this (fp32 only when a preset says so)
HIGH_PRECISION = LayerPrecision("fp16", "fp16", "per_tensor")

# The FQN patterns of the layers a preset keeps at HIGH_PRECISION belong to the model family
# (``toolkit.families.ModelFamily.keep_high``); the default is the SoftAlign family's.
DEFAULT_PRESET = "w8a8"  # what `toolkit plan` starts from when --preset is not given

PRESETS = {name: PRECISIONS[name] for name in ("w8a16", "w8a8", "w4a8")}
# Predicted (mean) latent SNR a refined plan aims at. The prediction matches the measured mean within
# ~1 dB on the demo, but the worst example sits ~6 dB below the mean: 32 dB keeps the worst above the
# 20 dB budget with margin (measured: refined w8a8 at 26 dB → worst 14 dB; at 32 dB → worst 27 dB).
DEFAULT_MIN_SNR_DB = 32.0
# Rungs a refinement moves a layer up, from its preset; fp16 (HIGH_PRECISION) is always last.
PRECISION_LADDER = ("w4a8", "w4a16", "w8a8", "w8a16")
COMPONENT_SECTIONS = ("vae_decoder",)  # components with their own plan section (denoiser: top level)


def parse_budget(text: str | None) -> float | None:
    """``size=0.30`` → 0.30 (fraction of fp32 bytes); None → no budget."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*size\s*=\s*([0-9]*\.?[0-9]+)\s*", text)
    if not m or not 0.0 < float(m.group(1)) <= 1.0:
        raise ValueError(f"budget must look like 'size=0.30' (a fraction of fp32 bytes in (0, 1]), got {text!r}")
    return float(m.group(1))


def default_keep_high() -> tuple[str, ...]:
    from toolkit.families import DEFAULT_FAMILY, get_family

    return get_family(DEFAULT_FAMILY).keep_high


def check_patterns(patterns, layers: list[str], *, source: str, each: bool = True) -> None:
    """Patterns (full match; a ``re:`` prefix is allowed) must select layers: each of them (a
    user's overrides), or with ``each=False`` at least one (a family's keep-high list, some of whose
    entries a config may leave out, e.g. cross-attention). A pattern written for another model
    would otherwise select nothing, silently."""
    dead = [p for p in patterns if not any(re.fullmatch(p.removeprefix("re:"), n) for n in layers)]
    if dead and (each or len(dead) == len(patterns)):
        raise ValueError(f"{source}: {len(dead)} layer patterns match no layer of this model: {dead[:5]} "
                         f"(its layers look like {layers[:3]}); the plan or the family's keep_high patterns "
                         "were written for another model")


def preset_assignment(preset: str, layers: list[str], *,
                      keep_high: tuple[str, ...] | None = None) -> dict[str, LayerPrecision]:
    """Every layer at the preset, those matching ``keep_high`` (default: the SoftAlign family's) at
    HIGH_PRECISION."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    keep_high = default_keep_high() if keep_high is None else tuple(keep_high)
    check_patterns(keep_high, layers, source="keep_high patterns", each=False)
    return {n: (HIGH_PRECISION if any(re.fullmatch(p, n) for p in keep_high) else PRESETS[preset])
            for n in layers}


def planned_bytes(assignment: dict[str, LayerPrecision], sizes: dict[str, dict[str, int]],
                  fp32_bytes: int) -> float:
    """Denoiser bytes under ``assignment``: quantizable weights at their width, everything else
    (biases, norms, embeddings) kept at fp32."""
    quantizable_fp32 = sum(4 * s["weight_params"] for s in sizes.values())
    other = fp32_bytes - quantizable_fp32
    return other + sum(BYTES_PER_WEIGHT[assignment[n].weights] * sizes[n]["weight_params"] for n in sizes)


def layer_loss(name: str, prec: LayerPrecision, sensitivity: dict | None) -> float:
    """The measured latent-SNR drop of quantizing ``name`` alone at ``prec`` (0 for float)."""
    if prec.weights in ("fp16", "fp32"):
        return 0.0
    w = 4 if prec.weights == "int4" else 8
    a = 8 if prec.activations == "int8" else 16
    row = (sensitivity or {}).get("layers", {}).get(name, {})
    # The exact precision, else the same weights with the other activation width (8-bit activations
    # bound the loss of 16-bit ones from above).
    for key in (f"w{w}a{a}", f"w{w}a{24 - a}"):
        if key in row:
            return max(0.0, LOSSLESS_SNR_DB - min(row[key]["latent_snr_db"], LOSSLESS_SNR_DB))
    # Not measured: a proxy that grows as bits drop, so unmeasured layers move last.
    return {"int8": 1.0, "int4": 10.0}[prec.weights] * 1e3


def _with_weights(prec: LayerPrecision, weights: str, default: LayerPrecision) -> LayerPrecision:
    if weights == "fp16":
        return HIGH_PRECISION
    acts = prec.activations if prec.activations != "fp16" or default.activations == "fp16" else default.activations
    return LayerPrecision(weights, acts, "per_channel")


def search_plan(assignment: dict[str, LayerPrecision], sizes: dict[str, dict[str, int]], fp32_bytes: int, *,
                budget: float, sensitivity: dict | None, default: LayerPrecision
                ) -> tuple[dict[str, LayerPrecision], list[dict]]:
    """Greedy fit of ``assignment`` to ``budget`` × fp32 bytes (see module doc); returns it and the moves."""
    assign = dict(assignment)
    limit = budget * fp32_bytes
    moves: list[dict] = []

    def step(name: str, direction: int) -> LayerPrecision | None:
        w = assign[name].weights
        if w not in WEIGHT_LADDER:
            return None
        k = WEIGHT_LADDER.index(w) + direction
        if not 0 <= k < len(WEIGHT_LADDER):
            return None
        return _with_weights(assign[name], WEIGHT_LADDER[k], default)

    def gain(name: str, new: LayerPrecision) -> tuple[float, float]:
        d_bytes = (BYTES_PER_WEIGHT[new.weights] - BYTES_PER_WEIGHT[assign[name].weights]) * sizes[name]["weight_params"]
        d_loss = layer_loss(name, new, sensitivity) - layer_loss(name, assign[name], sensitivity)
        return d_bytes, d_loss

    # Layers above the preset (kept high by the literature, or raised by measurement) go down last.
    protected = {n for n in sizes if (assign[n].weights, assign[n].activations)
                 != (default.weights, default.activations)}
    while planned_bytes(assign, sizes, fp32_bytes) > limit:
        best = None
        lowerable = [n for n in sizes if n not in protected and step(n, -1) is not None]
        for n in lowerable or [n for n in protected if step(n, -1) is not None]:
            new = step(n, -1)
            if new is None:
                continue
            d_bytes, d_loss = gain(n, new)
            if d_bytes >= 0:
                continue
            score = d_loss / -d_bytes
            if best is None or score < best[0]:
                best = (score, n, new, d_bytes, d_loss)
        if best is None:
            break  # nothing left to lower: the budget cannot be met, the plan says so
        _, n, new, d_bytes, d_loss = best
        moves.append({"layer": n, "from": assign[n].to_dict(), "to": new.to_dict(), "bytes": d_bytes,
                      "loss": d_loss, "why": "over budget" + (
                          " (a layer kept high: everything else is already at int4)" if n in protected else "")})
        assign[n] = new
    while True:
        spare = limit - planned_bytes(assign, sizes, fp32_bytes)
        best = None
        for n in sizes:
            new = step(n, +1)
            if new is None:
                continue
            d_bytes, d_loss = gain(n, new)
            if d_bytes <= 0 or d_bytes > spare or d_loss >= 0:
                continue
            score = -d_loss / d_bytes
            if best is None or score > best[0]:
                best = (score, n, new, d_bytes, d_loss)
        if best is None:
            break
        _, n, new, d_bytes, d_loss = best
        moves.append({"layer": n, "from": assign[n].to_dict(), "to": new.to_dict(), "bytes": d_bytes,
                      "loss": d_loss, "why": "budget left"})
        assign[n] = new
    return assign, moves


def _key(prec: LayerPrecision) -> str | None:
    for k, v in PRECISIONS.items():
        if (v.weights, v.activations) == (prec.weights, prec.activations):
            return k
    return None


def _noise(name: str, prec: LayerPrecision, sensitivity: dict) -> float | None:
    """Relative error power of quantizing ``name`` alone at ``prec`` (10^(−SNR/10)); 0 for float."""
    if prec.weights in ("fp16", "fp32"):
        return 0.0
    row = sensitivity.get("layers", {}).get(name, {})
    key = _key(prec)
    if key is None or key not in row:
        return None
    return 10.0 ** (-min(row[key]["latent_snr_db"], LOSSLESS_SNR_DB) / 10.0)


def predicted_snr_db(assign: dict[str, LayerPrecision], sensitivity: dict) -> float:
    """End-to-end latent SNR predicted from one-layer measurements, errors adding as independent."""
    total = sum(_noise(n, p, sensitivity) or 0.0 for n, p in assign.items())
    return LOSSLESS_SNR_DB if total <= 0 else min(LOSSLESS_SNR_DB, -10.0 * math.log10(total))


def refine_with_sensitivity(assign: dict[str, LayerPrecision], preset: str, sensitivity: dict, *,
                            min_snr_db: float) -> tuple[dict[str, LayerPrecision], list[dict]]:
    """Measured, not assumed, high-precision layers (see the module doc). Returns (plan, moves)."""
    base = PRESETS[preset]
    start = PRECISION_LADDER.index(preset) if preset in PRECISION_LADDER else len(PRECISION_LADDER)
    ladder = [PRECISIONS[k] for k in PRECISION_LADDER[start:]] + [HIGH_PRECISION]
    out, moves = dict(assign), []
    for n in out:  # measured layers start at the preset, whatever the literature says
        if _noise(n, base, sensitivity) is not None and out[n] != base:
            moves.append({"layer": n, "from": out[n].to_dict(), "to": base.to_dict(),
                          "why": f"measured: alone at {preset} it keeps "
                                 f"{sensitivity['layers'][n][preset]['latent_snr_db']:.1f} dB latent SNR"})
            out[n] = base
    while predicted_snr_db(out, sensitivity) < min_snr_db:
        worst = max(out, key=lambda n: _noise(n, out[n], sensitivity) or 0.0)
        current = _noise(worst, out[worst], sensitivity) or 0.0
        if current <= 0:
            break
        rung = next((i for i, p in enumerate(ladder) if (p.weights, p.activations)
                     == (out[worst].weights, out[worst].activations)), 0)
        new = next((p for p in ladder[rung + 1:] if (_noise(worst, p, sensitivity) is not None
                                                       and _noise(worst, p, sensitivity) < current)),
                   HIGH_PRECISION)
        moves.append({"layer": worst, "from": out[worst].to_dict(), "to": new.to_dict(),
                      "why": f"largest error ({-10 * math.log10(current):.1f} dB alone); predicted "
                             f"{predicted_snr_db(out, sensitivity):.1f} dB < {min_snr_db} dB target"})
        out[worst] = new
    return out, moves


def component_assignment(plan: dict, component: str, module, *, source: str = "plan") -> dict | None:
    """The plan's precision for every quantizable leaf of ``module`` (FQN → LayerPrecision).

    The denoiser's entries are the plan's top level; other components read
    ``components.<name>``. Overrides match by exact FQN or by a ``re:`` pattern (full match).
    None when the plan has no section for ``component`` (it stays float).
    """
    from calibration.fakequant import quantizable_leaves

    if component == "denoiser":
        section = plan
    else:
        section = (plan.get("components") or {}).get(component)
        if section is None:
            return None
    leaves = quantizable_leaves(module)
    overrides = section.get("overrides", {})
    exact = {k: v for k, v in overrides.items() if not k.startswith("re:")}
    unknown = sorted(set(exact) - set(leaves))
    if unknown:
        raise KeyError(f"{source}: {component} overrides name layers the model does not have: "
                       f"{unknown[:5]}; fix the plan's 'overrides' or make it for this checkpoint")
    if not leaves:
        raise ValueError(f"{source}: {component} has no quantizable layer, so its plan section selects "
                         "nothing; drop the section")
    check_patterns([k for k in overrides if k.startswith("re:")], list(leaves),
                   source=f"{source}: {component} overrides")
    default = LayerPrecision.from_dict(section["default"])
    out = {}
    for name in leaves:
        entry = exact.get(name)
        if entry is None:
            entry = next((v for k, v in overrides.items()
                          if k.startswith("re:") and re.fullmatch(k[3:], name)), None)
        out[name] = LayerPrecision.from_dict(entry) if entry is not None else default
    rounding = None
    if (plan.get("rounding") or {}).get("method", "rtn") != "rtn":
        from calibration.gptq import load_rounding

        rounding = load_rounding(plan, component)
    return PlanAssignment(out, rounding=rounding)


class PlanAssignment(dict):
    """One component's FQN → LayerPrecision, with the integers the plan chose for its weights.

    ``rounding``: {FQN: {width: calibration.gptq.LayerRounding}} when the plan was rounded with
    GPTQ (``toolkit plan --rounding gptq``), else None (round-to-nearest: each target rounds the
    float weights itself). A target applies these integers and scales, never a fresh rounding, or
    refuses the plan.
    """

    def __init__(self, entries, *, rounding: dict | None = None):
        super().__init__(entries)
        self.rounding = rounding


def vae_decoder_section(preset: str, layers: list[str]) -> dict:
    """The decoder's plan section: the preset's weights with fp16 activations (weight-only), first and
    last convolution kept high. Measured on the demo (ONNX Runtime, refined w8a8 plan): int8
    decoder activations alone took the worst LSD to 0.26 of the seed spread (budget 0.25), weight-only
    int8 to 0.14; the decoder's bytes are in its weights either way."""
    keep = [layers[0], layers[-1]] if layers else []
    default = LayerPrecision(PRESETS[preset].weights, "fp16", "per_channel")
    return {"default": default.to_dict(), "overrides": {n: HIGH_PRECISION.to_dict() for n in keep},
            "layers": layers}


def make_plan(preset: str, sizes: dict[str, dict[str, int]], fp32_bytes: int, *, budget: float | None = None,
              sensitivity: dict | None = None, sensitivity_source: str | None = None, model: str | None = None,
              min_snr_db: float = DEFAULT_MIN_SNR_DB, vae_decoder_layers: list[str] | None = None,
              keep_high: tuple[str, ...] | None = None) -> dict:
    """The plan JSON (ARCHITECTURE.md): default, overrides by FQN, sensitivity figures and budget.

    ``keep_high``: the model family's patterns of layers a preset keeps high (default: SoftAlign's);
    a pattern that matches no layer is an error.
    """
    default = PRESETS[preset] if preset in PRESETS else None
    keep_high = default_keep_high() if keep_high is None else tuple(keep_high)
    assign = preset_assignment(preset, list(sizes), keep_high=keep_high)
    moves: list[dict] = []
    if sensitivity is not None:
        assign, moves = refine_with_sensitivity(assign, preset, sensitivity, min_snr_db=min_snr_db)
    if budget is not None:
        assign, budget_moves = search_plan(assign, sizes, fp32_bytes, budget=budget, sensitivity=sensitivity,
                                           default=default)
        moves += budget_moves
    total = planned_bytes(assign, sizes, fp32_bytes)
    overrides = {n: p.to_dict() for n, p in assign.items() if p != default}
    figures = None
    if sensitivity is not None:
        figures = {"source": sensitivity_source, "settings": sensitivity.get("settings"),
                   "metric": "latent_snr_db", "layers": {
                       n: {k: v for k, v in row.items() if isinstance(v, dict)}
                       for n, row in sensitivity.get("layers", {}).items()}}
    return {
        "format_version": FORMAT_VERSION,
        "type": "quantization_plan",
        "name": preset,
        "model": model,
        "default": default.to_dict(),
        "overrides": overrides,
        "kept_high_patterns": list(keep_high),
        "budget": {"size": budget, "fp32_bytes": int(fp32_bytes), "planned_bytes": int(round(total)),
                   "size_ratio": total / fp32_bytes,
                   "met": None if budget is None else bool(total <= budget * fp32_bytes + 1e-9)},
        "search": {"method": ("greedy over measured one-layer losses" if budget is not None or sensitivity
                              else None),
                   "min_snr_db": min_snr_db if sensitivity is not None else None,
                   "predicted_latent_snr_db": predicted_snr_db(assign, sensitivity) if sensitivity else None,
                   "moves": moves},
        "sensitivity": figures,
        "layers": {n: {**assign[n].to_dict(), "weight_params": sizes[n]["weight_params"]} for n in sizes},
        "components": ({"vae_decoder": vae_decoder_section(preset, vae_decoder_layers)}
                       if vae_decoder_layers is not None else {}),
        # How the integer weights are chosen: "rtn" (each target rounds to nearest) or "gptq" (the
        # integers are in files this section names; calibration.gptq.round_plan fills it in).
        "rounding": {"method": "rtn"},
    }


def _plan_command(args: argparse.Namespace) -> int:
    from calibration.fakequant import quantizable_leaves
    from calibration.sensitivity import layer_sizes
    from toolkit.checkpoint import load_checkpoint
    from toolkit.components import component_specs

    sensitivity = json.loads(Path(args.sensitivity).read_text()) if args.sensitivity else None
    checkpoint = args.checkpoint
    if sensitivity is not None:
        if not sensitivity.get("complete", True):
            raise ValueError(f"{args.sensitivity}: the sensitivity table is incomplete; resume it first "
                             "(toolkit sensitivity ... --resume)")
        calib_dir = sensitivity.get("settings", {}).get("calib")
        if checkpoint is None and calib_dir:  # the checkpoint the table was measured on
            calib_manifest = Path(calib_dir) / "manifest.json"
            if calib_manifest.is_file():
                checkpoint = json.loads(calib_manifest.read_text()).get("checkpoint")
    needs_calib = args.rounding == "gptq" or args.search == "autotune"
    if needs_calib and args.calib is None:
        raise ValueError("--rounding gptq and --search autotune need --calib DIR (toolkit calibrate): GPTQ's "
                         "Hessians and autotune's trials run the calibration inputs")
    if checkpoint is None and args.calib is not None and (Path(args.calib) / "manifest.json").is_file():
        checkpoint = json.loads((Path(args.calib) / "manifest.json").read_text()).get("checkpoint")
    pipe = load_checkpoint(Path(checkpoint) if checkpoint else None)
    from toolkit.families import check_quantizable

    check_quantizable(pipe.denoiser, source=f"{pipe.path or pipe.config.name} denoiser")
    sizes, fp32_bytes = layer_sizes(pipe.denoiser)
    if sensitivity is not None and set(sensitivity["layers"]) - set(sizes):
        raise ValueError(f"{args.sensitivity}: measured on another model (layers "
                         f"{sorted(set(sensitivity['layers']) - set(sizes))[:3]} are not in "
                         f"{pipe.path}); pass --checkpoint")
    decoder_layers = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    if args.search == "autotune":
        from calibration.autotune import autotune_plan  # imports neural-compressor

        plan = autotune_plan(pipe, args.preset, Path(args.calib), budget=parse_budget(args.budget),
                             sensitivity=sensitivity, sensitivity_source=args.sensitivity,
                             min_snr_db=args.min_snr_db, max_trials=args.max_trials,
                             n_eval=args.eval_examples, vae_decoder_layers=decoder_layers)
    else:
        plan = make_plan(args.preset, sizes, fp32_bytes, budget=parse_budget(args.budget), sensitivity=sensitivity,
                         sensitivity_source=args.sensitivity, model=pipe.config.name, min_snr_db=args.min_snr_db,
                         vae_decoder_layers=decoder_layers, keep_high=pipe.family.keep_high)
    if args.rounding == "gptq":
        from calibration.gptq import round_plan

        plan["rounding"] = round_plan(pipe, plan, Path(args.calib), Path(args.out),
                                      group_size=args.gptq_group_size, percdamp=args.gptq_percdamp)
    out = write_text_atomically(Path(args.out), json.dumps(plan, indent=1) + "\n")
    print(json.dumps({"out": str(out), "default": plan["default"], "overrides": len(plan["overrides"]),
                      "budget": plan["budget"], "moves": len(plan["search"]["moves"]),
                      "predicted_latent_snr_db": plan["search"]["predicted_latent_snr_db"],
                      "rounding": {k: v for k, v in plan["rounding"].items() if k in ("method", "seconds")}},
                     indent=2))
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """``toolkit plan``: register on the CLI's sub-parsers (sets ``func``)."""
    s = subparsers.add_parser("plan", help="per-layer precision plan from a preset, sensitivity and a size budget")
    s.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="starting precision of every layer; the model family's first/last convolutions and "
                        "attention start at fp16 (with --sensitivity or --budget the search moves from here)")
    s.add_argument("--sensitivity", default=None, help="sensitivity JSON (toolkit sensitivity) to search with")
    s.add_argument("--budget", default=None,
                   help="size=F: denoiser bytes at most F x fp32 (e.g. size=0.30; lower: smaller, lossier)")
    s.add_argument("--min-snr-db", type=float, default=DEFAULT_MIN_SNR_DB,
                   help="with --sensitivity: predicted latent SNR to reach by raising the worst layers "
                        "(higher: closer to fp32, bigger and slower)")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint for the layer list (default: the sensitivity table's, else demo)")
    s.add_argument("--calib", default=None,
                   help="calibration set (toolkit calibrate); needed by --rounding gptq and --search autotune")
    s.add_argument("--rounding", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: each target rounds the weights to nearest; gptq: integers chosen by GPTQ on the "
                        "calibration inputs, written next to the plan and applied by every target (slower to "
                        "plan, lower layer output error)")
    s.add_argument("--gptq-group-size", type=int, default=None,
                   help="with --rounding gptq: one int4 scale per group of this many input columns "
                        "(default: one per output channel; targets that take only per-channel int4 refuse groups)")
    s.add_argument("--gptq-percdamp", type=float, default=0.01,
                   help="with --rounding gptq: dampening, as a fraction of the Hessian's mean diagonal")
    s.add_argument("--search", choices=("greedy", "autotune"), default="greedy",
                   help="greedy: over measured one-layer losses (needs --sensitivity to be data-driven); "
                        "autotune: neural-compressor's accuracy-aware tuning loop, one sampled evaluation per "
                        "trial (slower, measures plans end to end)")
    s.add_argument("--max-trials", type=int, default=12, help="with --search autotune: trials at most")
    s.add_argument("--eval-examples", type=int, default=4,
                   help="with --search autotune: calibration examples sampled per trial")
    s.add_argument("--out", required=True, help="plan JSON to write")
    s.set_defaults(func=_plan_command)
    return s
