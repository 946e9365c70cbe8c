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
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from calibration.fakequant import activation_ranges, fake_quantize_weight, quantizable_leaves  # noqa: E402
from calibration.sampling import load_calibration_set  # noqa: E402
from runtime_py.metrics import capped_snr_db, snr_db  # noqa: E402
from toolkit.checkpoint import Pipeline, load_checkpoint  # noqa: E402
from toolkit.generate import sample_latent  # noqa: E402


def quantize_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Asymmetric int8 fake quantization with one range per slice along every axis but ``dim``
    (the range always includes 0, as XNNPACK's dynamic quantization does)."""
    lo = x.amin(dim=dim, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=dim, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale) - 128
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    return (q - zero) * scale


def static_quantize(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = round(-lo / scale) - 128
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


class PerFrameConv1d(nn.Module):
    """A Conv1d run as targets.executorch lowers it per frame: a Linear over each output frame's
    unfolded input window, that window quantized to int8 with its own range."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        (k,), (s,), (d,), (p,) = c.kernel_size, c.stride, c.dilation, c.padding
        x = F.pad(x, (p, p))
        span = d * (k - 1) + 1
        win = x.unfold(-1, span, s)[..., ::d]  # (B, C, T_out, k)
        win = win.permute(0, 2, 1, 3).reshape(x.shape[0], win.shape[2], -1)  # (B, T_out, C·k)
        win = quantize_rows(win, dim=-1)
        y = win @ c.weight.reshape(c.out_channels, -1).T
        if c.bias is not None:
            y = y + c.bias
        return y.transpose(1, 2)


class PerFrameLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(quantize_rows(x, dim=-1))


def per_frame_supported(leaf: nn.Module) -> bool:
    return type(leaf) is nn.Linear or (type(leaf) is nn.Conv1d and leaf.groups == 1
                                       and leaf.padding_mode == "zeros" and not isinstance(leaf.padding, str))


def quantized(model: nn.Module, schemes: dict[str, str], ranges: dict) -> nn.Module:
    """A copy of ``model`` whose named leaves have int8 per-channel weights and int8 activations
    under the given scheme (``static`` or ``per_frame``)."""
    import copy

    q = copy.deepcopy(model)
    for name, scheme in schemes.items():
        leaf = q.get_submodule(name)
        with torch.no_grad():
            leaf.weight.copy_(fake_quantize_weight(leaf.weight, 8, per_channel=True))
        if scheme == "static":
            lo, hi = ranges[name]
            leaf.register_forward_pre_hook(lambda m, inp, lo=lo, hi=hi: (static_quantize(inp[0], lo, hi), *inp[1:]))
            continue
        parent, _, child = name.rpartition(".")
        holder = q.get_submodule(parent) if parent else q
        setattr(holder, child, PerFrameConv1d(leaf) if isinstance(leaf, nn.Conv1d) else PerFrameLinear(leaf))
    return q.eval()


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
               "static": latent_snr(pipe, quantized(pipe.denoiser, {name: "static"}, ranges), cond, noise, ref,
                                    steps=steps, guidance=guidance)}
        if per_frame_supported(leaf):
            row["per_frame"] = latent_snr(pipe, quantized(pipe.denoiser, {name: "per_frame"}, ranges), cond, noise,
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
        whole[label] = {"latent_snr_db": latent_snr(pipe, quantized(pipe.denoiser, schemes, ranges), cond, noise,
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
