"""Quantization plans (DESIGN.md): a default precision, per-layer overrides by FQN, and the budget.

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
``SNR_CAP_DB − snr``); fp16 and fp32 count as lossless. Every move is recorded in the plan.

neural-compressor's accuracy-aware tuning is not used: it searches by re-running an evaluation
function per trial over its own quantized models, which here would redo the sensitivity sweep
with less control; the greedy search over measured one-layer losses is the work it would do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from calibration.precision import PRECISIONS, LayerPrecision

FORMAT_VERSION = 1
SNR_CAP_DB = 100.0  # a layer whose quantization leaves ≥ this latent SNR counts as lossless
BYTES_PER_WEIGHT = {"int4": 0.5, "int8": 1.0, "fp16": 2.0, "fp32": 4.0}
WEIGHT_LADDER = ("int4", "int8", "fp16")  # search moves along this (fp32 only when a preset says so)
HIGH_PRECISION = LayerPrecision("fp16", "fp16", "per_tensor")

# FQN patterns of the layers a preset keeps at HIGH_PRECISION (SoftAlign U-Net names).
KEEP_HIGH = (
    r"conv_in",  # first conv of the denoiser
    r"vocal\.conv_in",  # first conv of the conditioning stream
    r"conv_out",  # last conv
    r"attn(\..*)?",  # soft alignment attention (bottleneck)
    r".*\.cross(\..*)?",  # cross-attention to the vocal
)

PRESETS = {name: PRECISIONS[name] for name in ("w8a16", "w8a8", "w4a8")}


def parse_budget(text: str | None) -> float | None:
    """``size=0.30`` → 0.30 (fraction of fp32 bytes); None → no budget."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*size\s*=\s*([0-9]*\.?[0-9]+)\s*", text)
    if not m or not 0.0 < float(m.group(1)) <= 1.0:
        raise ValueError(f"budget must look like 'size=0.30' (a fraction of fp32 bytes in (0, 1]), got {text!r}")
    return float(m.group(1))


def is_kept_high(name: str) -> bool:
    return any(re.fullmatch(p, name) for p in KEEP_HIGH)


def preset_assignment(preset: str, layers: list[str]) -> dict[str, LayerPrecision]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return {n: (HIGH_PRECISION if is_kept_high(n) else PRESETS[preset]) for n in layers}


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
            return max(0.0, SNR_CAP_DB - min(row[key]["latent_snr_db"], SNR_CAP_DB))
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

    protected = {n for n in sizes if is_kept_high(n)}
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
                          " (a kept-high layer: everything else is already at int4)" if n in protected else "")})
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


def make_plan(preset: str, sizes: dict[str, dict[str, int]], fp32_bytes: int, *, budget: float | None = None,
              sensitivity: dict | None = None, sensitivity_source: str | None = None, model: str | None = None
              ) -> dict:
    """The plan JSON (DESIGN.md): default, overrides by FQN, sensitivity figures and budget."""
    default = PRESETS[preset] if preset in PRESETS else None
    assign = preset_assignment(preset, list(sizes))
    moves: list[dict] = []
    if budget is not None:
        assign, moves = search_plan(assign, sizes, fp32_bytes, budget=budget, sensitivity=sensitivity,
                                    default=default)
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
        "kept_high_patterns": list(KEEP_HIGH),
        "budget": {"size": budget, "fp32_bytes": int(fp32_bytes), "planned_bytes": int(round(total)),
                   "size_ratio": total / fp32_bytes,
                   "met": None if budget is None else bool(total <= budget * fp32_bytes + 1e-9)},
        "search": {"method": "greedy over measured one-layer losses" if budget is not None else None,
                   "moves": moves},
        "sensitivity": figures,
        "layers": {n: {**assign[n].to_dict(), "weight_params": sizes[n]["weight_params"]} for n in sizes},
    }


def _plan_command(args: argparse.Namespace) -> int:
    sensitivity = json.loads(Path(args.sensitivity).read_text()) if args.sensitivity else None
    if sensitivity is not None and args.checkpoint is None:
        sizes = {n: {"weight_params": r["weight_params"], "bias_params": r.get("bias_params", 0)}
                 for n, r in sensitivity["layers"].items()}
        fp32_bytes, model = int(sensitivity["fp32_bytes"]), sensitivity["settings"].get("model")
        if not sensitivity.get("complete", True):
            raise ValueError(f"{args.sensitivity}: the sensitivity table is incomplete; resume it first "
                             "(toolkit sensitivity ... --resume) or pass --checkpoint")
    else:
        from calibration.sensitivity import layer_sizes
        from toolkit.checkpoint import load_checkpoint

        pipe = load_checkpoint(args.checkpoint)
        sizes, fp32_bytes = layer_sizes(pipe.denoiser)
        model = pipe.config.name
    plan = make_plan(args.preset, sizes, fp32_bytes, budget=parse_budget(args.budget), sensitivity=sensitivity,
                     sensitivity_source=args.sensitivity, model=model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "default": plan["default"], "overrides": len(plan["overrides"]),
                      "budget": plan["budget"], "moves": len(plan["search"]["moves"])}, indent=2))
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """``toolkit plan``: register on the CLI's sub-parsers (sets ``func``)."""
    s = subparsers.add_parser("plan", help="per-layer precision plan from a preset, sensitivity and a size budget")
    s.add_argument("--preset", choices=sorted(PRESETS), required=True,
                   help="default precision; first/last conv and attention stay fp16")
    s.add_argument("--sensitivity", default=None, help="sensitivity JSON (toolkit sensitivity) to search with")
    s.add_argument("--budget", default=None,
                   help="size=F: denoiser bytes at most F x fp32 (e.g. size=0.30; lower: smaller, lossier)")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint for the layer list (default: the sensitivity table's, else demo)")
    s.add_argument("--out", required=True, help="plan JSON to write")
    s.set_defaults(func=_plan_command)
    return s
