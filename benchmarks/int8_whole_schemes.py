"""int8 activation schemes on the whole denoiser, as arithmetic: static, per step, per frame, per layer.

``benchmarks/int8_scheme.py`` measures the lowered ExecuTorch programs; this measures the schemes'
arithmetic (calibration.act_schemes, fake quantization in PyTorch) on the same held-out examples,
including the one ExecuTorch cannot lower yet: *per step*, one run-time range per call and batch
element (one diffusion time step), what XNNPACK's dynamically quantized 2-D convolution would do
(targets.executorch's module doc says where the lowering fails). Every Conv1d / Linear W8A8 with
int8 weights per output channel (transposed convolutions static in every row, as lowered):

* ``static``: input and output at the calibrated min/max (as the static lowering writes int8);
* ``per step``: Conv1d input at one range per batch element; Linear per row (its dynamic kernel);
* ``per frame``: each output frame's input window on its own range (Conv1d as a time-major Linear);
* ``per layer``: targets.executorch.measure_schemes' choice at its threshold (static or per frame).

Held-out synthetic vocals (another seed than the calibration set's), the denoiser's DDIM with
guidance, final latents vs PyTorch fp32 from the same noise: latent SNR (dB) and distance over the
spread (MSE to fp32 / MSE between two fp32 runs that differ only in the noise).

    python benchmarks/int8_whole_schemes.py --calib CAL --examples 8 --steps 8 --guidance 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=Path, required=True, help="calibration set (toolkit calibrate)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the demo")
    p.add_argument("--examples", type=int, default=8, help="held-out examples")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "out" / "int8_whole_schemes.json")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    t0 = time.time()

    import numpy as np
    import torch
    from torch import nn

    import targets.executorch as et
    from benchmarks.int8_scheme import _held_out
    from calibration.act_schemes import (
        fake_quantized,
        observe_output_ranges,
        per_frame_supported,
        per_step_supported,
        static_quantize,
    )
    from calibration.fakequant import observe_ranges, quantizable_leaves
    from calibration.feeds import calibration_feeds
    from calibration.precision import LayerPrecision
    from toolkit.checkpoint import Pipeline, load_checkpoint
    from toolkit.generate import sample_latent

    pipe = load_checkpoint(a.checkpoint)
    guidance = pipe.config.default_guidance if a.guidance is None else a.guidance
    feeds = calibration_feeds(pipe, a.calib, "denoiser")
    leaves = quantizable_leaves(pipe.denoiser)
    names = list(leaves)
    ranges = observe_ranges(pipe.denoiser, feeds, layers=names)
    out_ranges = observe_output_ranges(pipe.denoiser, feeds, names)
    with tempfile.TemporaryDirectory() as tmp:
        cond, noise_a, noise_b = _held_out(pipe, argparse.Namespace(examples=a.examples, seed=a.seed), Path(tmp))
    with torch.no_grad():
        ref_a = sample_latent(pipe, cond, noise_a, steps=a.steps, guidance=guidance).numpy()
        ref_b = sample_latent(pipe, cond, noise_b, steps=a.steps, guidance=guidance).numpy()
    spread = np.mean((ref_a - ref_b) ** 2, axis=(1, 2))

    def model_of(schemes: dict[str, str]) -> nn.Module:
        model = fake_quantized(pipe.denoiser, schemes, ranges)
        for name, scheme in schemes.items():
            if scheme == "static":  # a static int8 layer writes int8: its output at the calibrated range
                lo, hi = out_ranges[name]
                model.get_submodule(name).register_forward_hook(
                    lambda m, i, o, lo=lo, hi=hi: static_quantize(o, lo, hi))
        return model

    measured = et.measure_schemes(pipe.denoiser, {n: LayerPrecision("int8", "int8") for n in names}, feeds)
    rows = {
        "static": {n: "static" for n in names},
        "per step": {n: "per_step" if per_step_supported(m) else "static" for n, m in leaves.items()},
        "per frame": {n: "per_frame" if per_frame_supported(m) else "static" for n, m in leaves.items()},
        f"per layer ({et.SCHEME_THRESHOLD_DB:g} dB)": {n: measured["schemes"].get(n, "static") for n in names},
    }
    results = {}
    for label, schemes in rows.items():
        p_ = Pipeline(config=pipe.config, denoiser=model_of(schemes), vae=pipe.vae, path=pipe.path)
        with torch.no_grad():
            got = sample_latent(p_, cond, noise_a, steps=a.steps, guidance=guidance).numpy()
        err = np.mean((got - ref_a) ** 2, axis=(1, 2))
        snr = 10 * np.log10(np.mean(ref_a ** 2, axis=(1, 2)) / err)
        ratio = err / spread
        results[label] = {"latent_snr_db_mean": float(snr.mean()), "latent_snr_db_worst": float(snr.min()),
                          "distance_over_spread_mean": float(ratio.mean()),
                          "distance_over_spread_worst": float(ratio.max()),
                          "counts": {k: sum(v == k for v in schemes.values())
                                     for k in ("static", "per_step", "per_frame")}}
        print(f"{label}: {results[label]}", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"results": results, "per_layer": measured}, indent=1))
    table = ("| scheme | layers static / per step / per frame | latent SNR dB (mean / worst) | "
             "distance / spread (mean / worst) |\n|---|---|---|---|\n"
             + "\n".join(f"| {k} | {v['counts']['static']} / {v['counts']['per_step']} / {v['counts']['per_frame']} | "
                         f"{v['latent_snr_db_mean']:.1f} / {v['latent_snr_db_worst']:.1f} | "
                         f"{v['distance_over_spread_mean']:.3f} / {v['distance_over_spread_worst']:.3f} |"
                         for k, v in results.items()))
    print(table)
    if a.record:
        append_section(
            "int8 activation schemes on the whole denoiser, as arithmetic (held-out examples)",
            command=command_line(__file__, argv), wall_s=time.time() - t0,
            notes=(f"Checkpoint {pipe.path} ({pipe.config.name}); every one of its {len(names)} quantizable "
                   f"layers W8A8; calibration set `{a.calib}` ({len(feeds)} inputs: static ranges, and "
                   f"the per-layer measurement); {cond.shape[0]} held-out synthetic examples, {a.steps} DDIM "
                   f"steps, guidance {guidance}; fake quantization in PyTorch (calibration.act_schemes), "
                   "not the lowered programs. per layer ran per frame: "
                   + (", ".join(measured["per_frame"]) or "none") + "."),
            table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
