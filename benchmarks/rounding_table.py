"""GPTQ against round-to-nearest, and neural-compressor's autotune against the greedy search (issue 19).

Rounding: the W4A8 preset (``toolkit plan --preset w4a8``; refined by ``--sensitivity`` when
given) and the same plan with fp16 activations (W4A16, weight-only int4), with ``--rounding rtn`` and ``--rounding gptq`` (:mod:`calibration.gptq`: the same plan,
only the integer weights differ). Searches (``--budget``): ``toolkit plan --search greedy`` (needs
``--sensitivity``) and ``--search autotune`` (:mod:`calibration.autotune`) at the same size budget,
with the time each search takes. Every plan is evaluated with
``calibration.evaluate_plan.evaluate_plan`` (``toolkit evaluate --plan``): the fake-quantized
pipeline, GPTQ integers included, against full precision on held-out pairs with the same vocals and
seeds: latent SNR (mean and worst segment), each paired distance over the seed spread (mean / worst),
the change of the log-mel Fréchet distance to the true accompaniments, and the planned bytes.

    OMP_NUM_THREADS=2 python benchmarks/rounding_table.py --calib CAL --data HELDOUT --out DIR \\
        [--sensitivity sens.json --budget 0.30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from calibration.evaluate_plan import evaluate_plan  # noqa: E402
from calibration.fakequant import quantizable_leaves  # noqa: E402
from calibration.gptq import round_plan  # noqa: E402
from calibration.plan import DEFAULT_MIN_SNR_DB, make_plan  # noqa: E402
from calibration.sensitivity import layer_sizes  # noqa: E402
from runtime_py.metrics import DISTANCES  # noqa: E402
from toolkit.checkpoint import load_checkpoint  # noqa: E402
from toolkit.components import component_specs  # noqa: E402



def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def weight_only(plan: dict) -> dict:
    """``plan`` with fp16 activations wherever it has integer ones (W4A8 → W4A16): ``toolkit plan`` has
    no w4a16 preset, and the same weights make the rounding comparison like for like."""
    out = json.loads(json.dumps(plan))
    entries = [out["default"], *out["overrides"].values(), *out["layers"].values()]
    for entry in entries:
        if entry["activations"] in ("int8", "int16"):
            entry["activations"] = "fp16"
    out["name"] = plan["name"].replace("a8", "a16")
    out["search"]["predicted_latent_snr_db"] = None
    return out


def layer_error_summary(plan: dict) -> str:
    """Mean relative layer output error (from the Hessians) of RTN and of GPTQ at the planned widths."""
    entry = ((plan.get("rounding") or {}).get("components") or {}).get("denoiser")
    if not entry:
        return ""
    weights = {n: v["weights"] for n, v in plan["layers"].items()}
    rtn = [row[weights[n]]["relative_output_error_rtn"] for n, row in entry["layers"].items()]
    ours = [row[weights[n]]["relative_output_error"] for n, row in entry["layers"].items()]
    return f"{sum(rtn) / len(rtn):.2e} → {sum(ours) / len(ours):.2e}"


def row(name: str, plan: dict, ev: dict, plan_s: float, eval_s: float) -> str:
    p, r, fd = ev["paired"], ev["relative_to_spread"], ev["frechet_log_mel"]
    dist = " | ".join(f"{r[k]['mean']:.2f} / {r[k]['worst']:.2f}" for k in DISTANCES)
    return (f"| {name} | {plan['rounding']['method']} | {ev['size']['denoiser']['ratio']:.3f} | "
            f"{p['latent_snr_db']:.1f} / {p['latent_snr_db_worst_segment']:.1f} | {dist} | {fd['change']:+.1f} | "
            f"{layer_error_summary(plan)} | {plan_s:.1f} | {eval_s:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the calibration set's, else the demo")
    ap.add_argument("--calib", type=Path, required=True, help="calibration set (toolkit calibrate)")
    ap.add_argument("--data", type=Path, required=True, help="held-out labelled pairs (toolkit data synth)")
    ap.add_argument("--sensitivity", type=Path, default=None,
                    help="sensitivity JSON: refine the presets with it and run the greedy search")
    ap.add_argument("--budget", type=float, default=None,
                    help="size budget (fraction of fp32) for the search comparison (greedy needs --sensitivity)")
    ap.add_argument("--min-snr-db", type=float, default=DEFAULT_MIN_SNR_DB)
    ap.add_argument("--max-trials", type=int, default=12, help="autotune trials at most")
    ap.add_argument("--autotune-examples", type=int, default=4, help="calibration examples sampled per trial")
    ap.add_argument("--gptq-group-size", type=int, default=None)
    ap.add_argument("--tracks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True, help="directory for the plans, roundings and evaluations")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = json.loads((args.calib / "manifest.json").read_text()).get("checkpoint")
    pipe = load_checkpoint(Path(checkpoint) if checkpoint else None)
    sensitivity = json.loads(args.sensitivity.read_text()) if args.sensitivity else None
    source = str(args.sensitivity) if args.sensitivity else None
    sizes, fp32 = layer_sizes(pipe.denoiser)
    dec = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    args.out.mkdir(parents=True, exist_ok=True)

    plans: list[tuple[str, dict, float]] = []  # (name, plan, seconds to make it)
    w4a8 = make_plan("w4a8", sizes, fp32, sensitivity=sensitivity, sensitivity_source=source,
                     min_snr_db=args.min_snr_db, model=pipe.config.name, vae_decoder_layers=dec)
    for preset, base in (("w4a8", w4a8), ("w4a16", weight_only(w4a8))):
        name = f"{preset} ({'refined' if sensitivity else 'literature'})"
        plans.append((name, base, 0.0))
        gptq = json.loads(json.dumps(base))
        t = time.time()
        gptq["rounding"] = round_plan(pipe, gptq, args.calib, args.out / f"{_slug(name)}_gptq.plan.json",
                                      group_size=args.gptq_group_size)
        plans.append((name, gptq, time.time() - t))
    if args.budget is not None:
        from calibration.autotune import autotune_plan

        if sensitivity is not None:
            t = time.time()
            greedy = make_plan("w4a8", sizes, fp32, budget=args.budget, sensitivity=sensitivity,
                               sensitivity_source=source, min_snr_db=args.min_snr_db, model=pipe.config.name,
                               vae_decoder_layers=dec)
            plans.append((f"greedy search, size<={args.budget}", greedy, time.time() - t))
        t = time.time()
        tuned = autotune_plan(pipe, "w4a8", args.calib, budget=args.budget, sensitivity=sensitivity,
                              sensitivity_source=source, min_snr_db=args.min_snr_db, max_trials=args.max_trials,
                              n_eval=args.autotune_examples, vae_decoder_layers=dec)
        plans.append((f"autotune search, size<={args.budget}", tuned, time.time() - t))

    rows = []
    for name, plan, plan_s in plans:
        slug = f"{_slug(name)}_{plan['rounding']['method']}"
        (args.out / f"{slug}.plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        print(f"evaluating {name} ({plan['rounding']['method']})", file=sys.stderr)
        t = time.time()
        ev = evaluate_plan(pipe, plan, args.calib, args.data, steps=args.steps,
                           guidance=pipe.config.default_guidance, max_tracks=args.tracks)
        (args.out / f"{slug}.eval.json").write_text(json.dumps(ev, indent=1) + "\n")
        rows.append(row(name, plan, ev, plan_s, time.time() - t))
    header = ("| plan | rounding | denoiser bytes / fp32 | latent SNR dB (mean / worst segment) | "
              + " | ".join(f"{k} / spread (mean / worst)" for k in DISTANCES)
              + " | log-mel FD change | layer output error RTN → GPTQ (mean, relative) | plan or rounding s | "
                "eval s |\n|" + "---|" * (8 + len(DISTANCES)))
    table = header + "\n" + "\n".join(rows)
    print(table)
    if not args.no_record:
        append_section(
            "GPTQ vs round-to-nearest; autotune vs greedy search",
            command=command_line(__file__), wall_s=time.time() - t0,
            notes=(f"Fake-quantized denoiser and VAE decoder, {args.tracks} held-out pairs, {args.steps} DDIM steps, "
                   f"calibration set `{args.calib}`. GPTQ rows: the same plan as the RTN row above, integers from "
                   "calibration.gptq (Hessians of the denoiser's calibration inputs; the decoder stays RTN). "
                   "'plan or rounding s': GPTQ's rounding time, or the search's time."),
            table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
