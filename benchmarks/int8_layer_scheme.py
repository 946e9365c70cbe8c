"""Which layers need which int8 activation scheme: static per-tensor or per latent frame (issue 16)?

``benchmarks/int8_scheme.py`` compares the two ExecuTorch schemes on the whole denoiser. This
breaks the comparison down per layer, one layer at a time (the method of
:mod:`calibration.sensitivity`): a copy of the denoiser with only that layer's input activation
quantized to int8 (weights int8 per output channel in both cases) samples the calibration set's
first ``--examples`` conditioning latents from their stored noise, and the final latents are
compared with full precision (latent SNR, dB):

* ``static``: one calibrated range per tensor (the calibration set's min/max, as
  ``toolkit sensitivity`` and the ExecuTorch static lowering use);
* ``per_frame``: what XNNPACK's dynamically quantized kernels do after targets.executorch rewrites
  a Conv1d as a time-major Linear: the unfolded input window of each output frame (C_in × kernel
  values) gets its own asymmetric int8 range at run time; a Linear's each token row likewise.
  Transposed convolutions have no per-frame lowering (they stay static in ExecuTorch) and are
  measured static only.

A layer "needs per frame" when its static SNR is below ``--threshold`` dB and per frame lifts it
above. Then three whole-denoiser fake-quantized runs (every layer int8) score the schemes
together: all static, all per frame, and the mix that uses per frame only where a layer needs it.

    python benchmarks/int8_layer_scheme.py --calib CAL [--examples 2] [--threshold 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from calibration.act_schemes import fake_quantized, per_frame_supported  # noqa: E402
from calibration.fakequant import activation_ranges, quantizable_leaves  # noqa: E402
from calibration.sampling import load_calibration_set  # noqa: E402
from runtime_py.metrics import capped_snr_db, snr_db  # noqa: E402
from toolkit.checkpoint import Pipeline, load_checkpoint  # noqa: E402
from toolkit.generate import sample_latent  # noqa: E402


@torch.no_grad()
def latent_snr(pipe: Pipeline, model: nn.Module, cond, noise, ref, *, steps: int, guidance: float) -> float:
    p = Pipeline(config=pipe.config, denoiser=model, vae=pipe.vae, path=pipe.path)
    got = sample_latent(p, cond, noise, steps=steps, guidance=guidance).numpy()
    return float(np.mean([capped_snr_db(snr_db(r, g)) for r, g in zip(ref, got)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--calib", type=Path, required=True, help="calibration set (toolkit calibrate)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the calibration set's, else the demo")
    p.add_argument("--examples", type=int, default=2, help="conditioning latents sampled per measurement")
    p.add_argument("--threshold", type=float, default=40.0,
                   help="one-layer latent SNR (dB) below which a layer is said to need another scheme")
    p.add_argument("--out", type=Path, default=REPO / "out" / "int8_layer_scheme.json")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    t0 = time.time()
    calib = load_calibration_set(a.calib)
    checkpoint = a.checkpoint or calib.manifest.get("checkpoint")
    pipe = load_checkpoint(Path(checkpoint) if checkpoint else None)
    steps, guidance = int(calib.manifest["steps"]), float(calib.manifest["guidance"])
    n = min(a.examples, calib.conditioning.shape[0])
    cond, noise = calib.conditioning[:n], calib.noise[:n]
    with torch.no_grad():
        ref = sample_latent(pipe, cond, noise, steps=steps, guidance=guidance).numpy()
    ranges = activation_ranges(pipe.denoiser, calib)
    leaves = quantizable_leaves(pipe.denoiser)
    rows = {}
    from tqdm import tqdm

    for name in tqdm(list(leaves), desc="layers", file=sys.stderr):
        leaf = leaves[name]
        row = {"type": type(leaf).__name__,
               "static": latent_snr(pipe, fake_quantized(pipe.denoiser, {name: "static"}, ranges), cond, noise, ref,
                                    steps=steps, guidance=guidance)}
        if per_frame_supported(leaf):
            row["per_frame"] = latent_snr(pipe, fake_quantized(pipe.denoiser, {name: "per_frame"}, ranges), cond, noise,
                                          ref, steps=steps, guidance=guidance)
        rows[name] = row
    needs = [n_ for n_, r in rows.items() if r["static"] < a.threshold and r.get("per_frame", -1) > r["static"]]
    whole = {}
    for label, pick in (("all static", lambda n_: "static"),
                        ("all per frame (static where unsupported)",
                         lambda n_: "per_frame" if "per_frame" in rows[n_] else "static"),
                        (f"mixed: per frame for the {len(needs)} layers under {a.threshold:g} dB static",
                         lambda n_: "per_frame" if n_ in needs else "static")):
        schemes = {n_: pick(n_) for n_ in rows}
        whole[label] = {"latent_snr_db": latent_snr(pipe, fake_quantized(pipe.denoiser, schemes, ranges), cond, noise,
                                                    ref, steps=steps, guidance=guidance),
                        "per_frame_layers": sum(s == "per_frame" for s in schemes.values())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"layers": rows, "needs_per_frame": needs, "whole": whole,
                                 "settings": {"calib": str(a.calib), "examples": n, "steps": steps,
                                              "guidance": guidance, "threshold_db": a.threshold}}, indent=1))
    worst = sorted(rows.items(), key=lambda kv: kv[1]["static"])[:12]
    table = ("| layer | type | static dB | per frame dB |\n|---|---|---|---|\n"
             + "\n".join(f"| `{k}` | {r['type']} | {r['static']:.1f} | "
                         + (f"{r['per_frame']:.1f}" if "per_frame" in r else "— (static only)") + " |"
                         for k, r in worst)
             + "\n\n| whole denoiser, every layer int8 | per-frame layers | latent SNR dB |\n|---|---|---|\n"
             + "\n".join(f"| {k} | {v['per_frame_layers']} | {v['latent_snr_db']:.1f} |" for k, v in whole.items()))
    print(table)
    static_ok = sum(r["static"] >= a.threshold for r in rows.values())
    print(f"{static_ok}/{len(rows)} layers keep >= {a.threshold:g} dB static; need per frame: {needs}", file=sys.stderr)
    if a.record:
        append_section(
            "int8 activation scheme per layer: static per tensor vs per latent frame",
            command=command_line(__file__, argv), wall_s=time.time() - t0,
            notes=(f"Checkpoint {pipe.path} ({pipe.config.name}); calibration set `{a.calib}`; {n} conditioning "
                   f"latents from their stored noise, {steps} steps, guidance {guidance}. One layer at a time int8 "
                   "(weights per output channel; activations static with the calibrated min/max, or per frame as "
                   "XNNPACK's dynamic kernels quantize the unfolded window of each output frame), the rest fp32; "
                   "final-latent SNR against fp32. The 12 layers worst under static are listed. "
                   f"{static_ok} of {len(rows)} layers keep ≥ {a.threshold:g} dB under static; "
                   f"{len(needs)} need per frame ({', '.join(needs) or 'none'}). Fake quantization in PyTorch, "
                   "not the lowered program: the schemes' arithmetic, not XNNPACK's kernels."),
            table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
