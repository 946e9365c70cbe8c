"""How long GPTQ rounding takes on a paper-size denoiser (issue 19), against round-to-nearest.

The ``paper`` SoftAlign denoiser with seeded random weights (timing does not depend on the
weights) and ``--feeds`` seeded random calibration inputs of its deployed shape (CFG batch 2): every
Conv1d / ConvTranspose1d / Linear at the planned width (``--weights``; int4 also rounds its int8
fallback, as ``toolkit plan --rounding gptq`` does). Times :func:`calibration.gptq.round_layers`
with ``method="gptq"`` (Hessians H = 2XXᵀ/N from the feeds, then Algorithm 1 per layer) and with
``method="rtn"`` (the same Hessian pass, for the error figures, then round-to-nearest), so the
difference is the cost of Algorithm 1 itself. Reports the layers' mean relative output error
(‖WX − ŴX‖² / ‖WX‖² from H) of each.

    OMP_NUM_THREADS=2 python benchmarks/gptq_time.py --weights int4 --feeds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from benchmarks.quantized_latency import build_spec, random_inputs  # noqa: E402
from calibration.fakequant import quantizable_leaves  # noqa: E402
from calibration.gptq import round_layers  # noqa: E402
from calibration.precision import LayerPrecision  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="paper", choices=("paper", "demo", "tiny"))
    p.add_argument("--weights", default="int4", choices=("int4", "int8"))
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default: per channel)")
    p.add_argument("--feeds", type=int, default=8, help="calibration inputs (each a CFG batch of 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    t0 = time.time()
    spec = build_spec("denoiser", a.config, seed=a.seed)
    feeds = [random_inputs("denoiser", a.config, seed=a.seed + 1 + i) for i in range(a.feeds)]
    layers = quantizable_leaves(spec.module)
    assignment = {n: LayerPrecision(a.weights, "fp32") for n in layers}
    params = sum(m.weight.numel() for m in layers.values())
    rows = {}
    for method in ("rtn", "gptq"):
        t = time.perf_counter()
        _, figures = round_layers(spec.module, feeds, assignment, method=method, group_size=a.group_size)
        seconds = time.perf_counter() - t
        err = statistics.mean(f[a.weights]["relative_output_error"] for f in figures.values())
        rows[method] = (seconds, err)
        print(f"{method}: {seconds:.1f} s, mean relative output error {err:.2e}", file=sys.stderr)
    table = ("| rounding | seconds (Hessians + rounding, both widths) | mean relative layer output error |\n"
             "|---|---|---|\n"
             + "\n".join(f"| {m} | {s:.1f} | {e:.2e} |" for m, (s, e) in rows.items())
             + f"\n| GPTQ's Algorithm 1 alone | {rows['gptq'][0] - rows['rtn'][0]:.1f} | |")
    print(table)
    if a.record:
        append_section(
            f"GPTQ rounding time on the `{a.config}` denoiser",
            command=command_line(__file__, argv), wall_s=time.time() - t0,
            notes=(f"`{a.config}` SoftAlign with seeded random weights, {len(layers)} layers, {params / 1e6:.1f} M "
                   f"weights, all {a.weights}" + (f" (groups of {a.group_size})" if a.group_size else
                                                  " per output channel")
                   + (" plus the int8 fallback" if a.weights == "int4" else "")
                   + f"; {a.feeds} random calibration inputs of the deployed shape (CFG batch 2), so the "
                   "error figures say nothing about real activations, only the time is meant. "
                   f"torch threads: {torch.get_num_threads()}."),
            table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
