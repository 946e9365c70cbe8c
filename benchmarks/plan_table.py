"""Mixed-precision plans on the demo model, evaluated end to end (issue: PTQ4ADM plans).

From one sensitivity table (``toolkit sensitivity``) this makes the plans ``toolkit plan`` makes:
the ``w8a8`` and ``w4a8`` presets as the literature sets them (no table: first/last convolutions
and attention kept fp16), the same presets refined by the table (``--min-snr-db``), and a plan
searched under a size budget (``size=0.30``). Each plan is then evaluated with
``calibration.evaluate_plan.evaluate_plan`` (``toolkit evaluate --plan``) on held-out synthetic
pairs: the fake-quantized pipeline against full precision with the same vocals and seeds.

    OMP_NUM_THREADS=2 python benchmarks/plan_table.py --calib CAL --sensitivity sens.json \\
        --data HELDOUT --out DIR
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
from calibration.plan import make_plan  # noqa: E402
from calibration.sensitivity import layer_sizes  # noqa: E402
from toolkit.checkpoint import load_checkpoint  # noqa: E402
from toolkit.components import component_specs  # noqa: E402


def plans(pipe, sensitivity: dict, source: str, min_snr_db: float) -> dict[str, dict]:
    sizes, fp32 = layer_sizes(pipe.denoiser)
    dec = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    common = {"model": pipe.config.name, "vae_decoder_layers": dec}
    out = {
        "w8a8 (literature)": make_plan("w8a8", sizes, fp32, **common),
        "w4a8 (literature)": make_plan("w4a8", sizes, fp32, **common),
        "w8a8 (refined)": make_plan("w8a8", sizes, fp32, sensitivity=sensitivity, sensitivity_source=source,
                                    min_snr_db=min_snr_db, **common),
        "w4a8 (refined)": make_plan("w4a8", sizes, fp32, sensitivity=sensitivity, sensitivity_source=source,
                                    min_snr_db=min_snr_db, **common),
        "w4a8 size<=0.30": make_plan("w4a8", sizes, fp32, budget=0.30, sensitivity=sensitivity,
                                     sensitivity_source=source, min_snr_db=min_snr_db, **common),
        "w8a8 (refined, 32 dB)": make_plan("w8a8", sizes, fp32, sensitivity=sensitivity, sensitivity_source=source,
                                           min_snr_db=max(min_snr_db, 32.0), **common),
    }
    return out


def row(name: str, plan: dict, ev: dict) -> str:
    p, r, fd, size = ev["paired"], ev["relative_to_spread"], ev["frechet_log_mel"], ev["size"]
    music = ev["musical_agreement"] or {}
    q = music.get("quantized", {})
    f = music.get("fp32", {})
    pred = plan["search"]["predicted_latent_snr_db"]
    return (f"| {name} | {len(plan['overrides'])} | {size['denoiser']['ratio']:.3f} | "
            f"{size['vae_decoder']['ratio']:.3f} | {'' if pred is None else f'{pred:.1f}'} | "
            f"{p['latent_snr_db']:.1f} / {p['latent_snr_db_worst_segment']:.1f} | {p['audio_snr_db']:.1f} | {r['log_mel_l1']['mean']:.2f} / "
            f"{r['log_mel_l1']['worst']:.2f} | {r['mrstft']['worst']:.2f} | {r['lsd_db']['worst']:.2f} | "
            f"{r['loudness_diff_db']['worst']:.2f} | {fd['fp32_to_truth']:.0f} → {fd['quantized_to_truth']:.0f} | "
            f"{f.get('chord_cosine', float('nan')):.3f} → {q.get('chord_cosine', float('nan')):.3f} | "
            f"{f.get('tempo_match', float('nan')):.2f} → {q.get('tempo_match', float('nan')):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded demo")
    ap.add_argument("--calib", type=Path, required=True, help="calibration set (toolkit calibrate)")
    ap.add_argument("--sensitivity", type=Path, required=True, help="sensitivity JSON (toolkit sensitivity)")
    ap.add_argument("--data", type=Path, required=True, help="held-out labelled pairs (toolkit data synth)")
    ap.add_argument("--tracks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--min-snr-db", type=float, default=26.0)
    ap.add_argument("--out", type=Path, required=True, help="directory for the plans and evaluations")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe = load_checkpoint(args.checkpoint)
    sensitivity = json.loads(args.sensitivity.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, plan in plans(pipe, sensitivity, str(args.sensitivity), args.min_snr_db).items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("<=", "le")
        (args.out / f"{slug}.plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        print(f"evaluating {name}", file=sys.stderr)
        ev = evaluate_plan(pipe, plan, args.calib, args.data, steps=args.steps,
                           guidance=pipe.config.default_guidance, max_tracks=args.tracks)
        (args.out / f"{slug}.eval.json").write_text(json.dumps(ev, indent=1) + "\n")
        rows.append(row(name, plan, ev))
    header = ("| plan | overrides | denoiser bytes / fp32 | decoder bytes / fp32 | predicted latent SNR dB | "
              "latent SNR dB (mean / worst segment) | audio SNR dB | log-mel L1 / spread (mean / worst) | MRSTFT / spread (worst) | "
              "LSD / spread (worst) | loudness / spread (worst) | log-mel FD to truth (fp32 → plan) | "
              "chord cosine (fp32 → plan) | tempo match (fp32 → plan) |\n|" + "---|" * 14)
    table = header + "\n" + "\n".join(rows)
    print(table)
    if not args.no_record:
        append_section(
            "Mixed-precision plans on the demo, evaluated end to end",
            command=command_line(__file__), wall_s=time.time() - t0,
            notes=(f"Fake-quantized denoiser and VAE decoder (encoder float), {args.tracks} held-out synthetic "
                   f"pairs, {args.steps} DDIM steps, guidance {pipe.config.default_guidance}, activation ranges "
                   f"from `{args.calib.name}`; sensitivity table `{args.sensitivity}` (one layer at a time, "
                   "latent SNR). 'literature' = preset without a table (first/last conv and attention fp16); "
                   f"'refined' = measured layers start at the preset and the worst move up until the predicted "
                   f"latent SNR (errors adding as independent noise) reaches {args.min_snr_db} dB. Distances "
                   "relative to spread: quantized-vs-fp32 over fp32 seed-vs-seed on the same vocal (budget "
                   "0.25). Bytes: quantizable weights at their planned width, everything else fp32."),
            table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
