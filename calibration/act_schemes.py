"""Which int8 activation scheme each layer needs: one calibrated scale per tensor, or one per frame.

XNNPACK runs int8 activations two ways (targets.executorch): *static*, one scale per tensor fixed
at calibration (the native int8 convolution and GEMM kernels; a static layer writes int8 too), and
*per frame*, a scale computed at run time for each row of a dynamically quantized Linear (a Conv1d
then runs as a Linear over each output frame's unfolded input window, at the price of the
unfolding: slices, transposes and copies that dominate the per-frame programs' time,
BENCHMARKS.md). A diffusion U-Net's activations move with the time step (PTQ4ADM's premise), so
some layers lose too much under one scale per tensor. This module measures, per layer and on a
component's calibration inputs, how much of the component's output each scheme keeps:

* one layer at a time int8, the rest float (the method of PTQ4ADM's per-layer sensitivity), on one
  call of the component: SQNR (dB) = 10·log10(Σ y² / Σ (y − ŷ)²) of its outputs over the inputs.
  A layer's error counts by what reaches the output, which its own output SQNR does not tell
  (the demo's ``conv_in`` keeps 35 dB locally and costs the final latent the most);
* static as lowered: input and output quantized with the min/max observed on *other* calibration
  inputs than those measured, so clipping of values calibration did not cover counts, as it does
  on the device (with the same inputs, the measurement flattered static: the lowered program lost
  far more than the chosen mix predicted, BENCHMARKS.md);
* ``per_frame``: the input window of each output frame quantized on its own range, output float;
* ``per_step``: one run-time range per batch element (one call and CFG branch: one diffusion time
  step), what XNNPACK's dynamically quantized convolution does; measured here as a model only
  (targets.executorch says why ExecuTorch cannot lower it yet).

:func:`choose_schemes` runs a layer per frame where static keeps less than the threshold and per
frame keeps more. The fake quantizers are the schemes' arithmetic (asymmetric int8 with a zero
point, as XNNPACK's qs8/qdu8 kernels take it), not the lowered program, whose parity the export
checks as always.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("static", "per_step", "per_frame")


def quantize_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Asymmetric int8 fake quantization with one range per slice along every axis but ``dim``
    (the range always includes 0, as XNNPACK's dynamic quantization does)."""
    lo = x.amin(dim=dim, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=dim, keepdim=True).clamp(min=0.0)
    return _quantize(x, lo, hi)


def static_quantize(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric int8 fake quantization over one calibrated range [lo, hi] (widened to hold 0)."""
    return _quantize(x, torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0)))


def _quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale) - 128
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def quantize_per_step(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 fake quantization with one range per batch element (one call's tensor for
    one diffusion time step and CFG branch), computed at run time: what XNNPACK's dynamically
    quantized convolution does with its input (one set of parameters per image)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(dim=1).clamp(max=0.0).reshape(-1, *([1] * (x.dim() - 1)))
    hi = flat.amax(dim=1).clamp(min=0.0).reshape(-1, *([1] * (x.dim() - 1)))
    return _quantize(x, lo, hi)


def per_step_supported(leaf: nn.Module) -> bool:
    """Layers the per-step model covers, those XNNPACK's dynamically quantized convolution would
    take: ungrouped Conv1d (as a 2-D convolution) and Linear (its dynamic kernel quantizes each
    row, which is finer still). targets.executorch does not lower this scheme (its module doc)."""
    return type(leaf) is nn.Linear or (type(leaf) is nn.Conv1d and leaf.groups == 1
                                       and not isinstance(leaf.padding, str))


def rewritable_conv1d(leaf: nn.Module) -> bool:
    """An ungrouped, zero-padded Conv1d with numeric padding: what targets.executorch can run as
    a time-major Linear (per frame)."""
    return (type(leaf) is nn.Conv1d and leaf.groups == 1 and leaf.padding_mode == "zeros"
            and not isinstance(leaf.padding, str))


def per_frame_supported(leaf: nn.Module) -> bool:
    """Layers targets.executorch can run per frame: Linear, and :func:`rewritable_conv1d` ones."""
    return type(leaf) is nn.Linear or rewritable_conv1d(leaf)


def per_frame_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with each output frame's input window quantized to int8 with its own range.

    The window of output frame t is x[:, :, t·s + j·d] for the k taps j (all channels), as the
    time-major Linear of targets.executorch reads it. Its range is the min/max over those taps of
    the per-sample channel extremes; the sum runs tap by tap, so memory stays that of the input.
    """
    (k,), (s,), (d,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    x = F.pad(x, (p, p))
    t_out = (x.shape[-1] - d * (k - 1) - 1) // s + 1
    taps = [x[:, :, j * d: j * d + s * (t_out - 1) + 1: s] for j in range(k)]  # each (B, C, T_out)
    lo = torch.stack([t.amin(dim=1) for t in taps]).amin(dim=0).clamp(max=0.0)[:, None, :]
    hi = torch.stack([t.amax(dim=1) for t in taps]).amax(dim=0).clamp(min=0.0)[:, None, :]
    y = None
    for j, tap in enumerate(taps):
        part = torch.einsum("oc,bct->bot", conv.weight[:, :, j], _quantize(tap, lo, hi))
        y = part if y is None else y + part
    if conv.bias is not None:
        y = y + conv.bias[None, :, None]
    return y


def per_frame_forward(leaf: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer with per-frame int8 input: a Linear's rows, a Conv1d's output-frame windows."""
    if type(leaf) is nn.Linear:
        return leaf(quantize_rows(x, dim=-1))
    return per_frame_conv1d(leaf, x)


class PerFrame(nn.Module):
    """A leaf whose input is quantized per frame (keeps the leaf as ``inner``)."""

    def __init__(self, leaf: nn.Module):
        super().__init__()
        self.inner = leaf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame_forward(self.inner, x)


def _int8_weights_(leaf: nn.Module) -> nn.Module:
    """``leaf`` with its weight rounded to int8 per output channel, in place."""
    from calibration.fakequant import fake_quantize_weight

    with torch.no_grad():
        leaf.weight.copy_(fake_quantize_weight(leaf.weight, 8, per_channel=True))
    return leaf


def fake_quantized(model: nn.Module, schemes: dict[str, str], ranges: dict[str, tuple[float, float]]) -> nn.Module:
    """A copy of ``model`` whose named leaves have int8 per-channel weights and int8 input under
    the given scheme (``static``: the calibrated ``ranges``; ``per_frame``: run-time ranges)."""
    q = copy.deepcopy(model)
    for name, scheme in schemes.items():
        if scheme not in SCHEMES:
            raise ValueError(f"{name}: scheme must be one of {SCHEMES}, got {scheme!r}")
        leaf = _int8_weights_(q.get_submodule(name))
        if scheme == "static":
            lo, hi = ranges[name]
            leaf.register_forward_pre_hook(lambda m, inp, lo=lo, hi=hi: (static_quantize(inp[0], lo, hi), *inp[1:]))
            continue
        if scheme == "per_step":
            if not per_step_supported(leaf):
                raise TypeError(f"{name}: {type(leaf).__name__} has no per-step lowering")
            if type(leaf) is nn.Linear:  # rows: the dynamic linear kernel's own granularity
                leaf.register_forward_pre_hook(lambda m, inp: (quantize_rows(inp[0], dim=-1), *inp[1:]))
            else:
                leaf.register_forward_pre_hook(lambda m, inp: (quantize_per_step(inp[0]), *inp[1:]))
            continue
        if not per_frame_supported(leaf):
            raise TypeError(f"{name}: {type(leaf).__name__} has no per-frame lowering")
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child, PerFrame(leaf))
    return q.eval()


def _db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def _outputs(model: nn.Module, feeds: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    outs = []
    for feed in feeds:
        y = model(*feed)
        outs.append(torch.cat([o.reshape(-1) for o in y]) if isinstance(y, tuple) else y.reshape(-1))
    return outs


@torch.no_grad()
def observe_output_ranges(model: nn.Module, feeds: Iterable[tuple[torch.Tensor, ...]],
                          layers: Iterable[str]) -> dict[str, tuple[float, float]]:
    """The min/max of each named layer's output over ``model(*feed)``."""
    out = {n: (math.inf, -math.inf) for n in layers}

    def hook(name):
        def post(module, inputs, output):
            lo, hi = out[name]
            out[name] = (min(lo, float(output.min())), max(hi, float(output.max())))
        return post

    from calibration.fakequant import run_hooked

    run_hooked(model, feeds, [model.get_submodule(n).register_forward_hook(hook(n)) for n in out])
    return out


@torch.no_grad()
def one_layer_sqnr(model: nn.Module, feeds: Iterable[tuple[torch.Tensor, ...]], layers: Iterable[str], *,
                   range_feeds: Iterable[tuple[torch.Tensor, ...]] | None = None,
                   threshold_db: float | None = None, progress: bool = False) -> dict[str, dict[str, float | None]]:
    """Per layer: SQNR (dB) of the model's output over ``feeds`` when only that layer is int8,
    against the float model.

    The method of PTQ4ADM's per-layer sensitivity (one layer quantized at a time, the rest full
    precision), on one call of the component rather than a whole trajectory: a layer's error
    counts by what reaches the output, which its own output SQNR does not tell (the demo's
    ``conv_in`` keeps 35 dB locally and costs the final latent the most).

    * ``static``: what the static XNNPACK lowering runs: int8 weights per output channel, the
      input quantized with one calibrated range, and the output too (a static int8 convolution
      writes int8). The ranges are the min/max over ``range_feeds`` (default ``feeds``), as PT2E's
      observers record them; measured on other feeds than the ranges came from, clipping of
      inputs the calibration did not cover counts, as it does on the device.
    * ``per_frame``: the same weights, the input quantized per output frame at run time, the
      output float (a dynamically quantized Linear writes float). With ``threshold_db``, measured
      only for layers whose static SQNR is below it (None where not measured or not lowerable).
    """
    from calibration.fakequant import observe_ranges

    feeds = list(feeds)
    layers = list(layers)
    range_feeds = feeds if range_feeds is None else list(range_feeds)
    ranges = observe_ranges(model, range_feeds, layers=layers)
    out_ranges = observe_output_ranges(model, range_feeds, layers)
    reference = _outputs(model, feeds)
    signal = sum(float(r.double().pow(2).sum()) for r in reference)

    def sqnr_with(name: str, scheme: str) -> float:
        leaf = model.get_submodule(name)
        q = _int8_weights_(copy.deepcopy(leaf))
        (lo, hi), (out_lo, out_hi) = ranges[name], out_ranges[name]

        def replace(module, inputs, output):
            x = inputs[0]
            if scheme == "static":
                return static_quantize(q(static_quantize(x, lo, hi)), out_lo, out_hi)
            return per_frame_forward(q, x)

        handle = leaf.register_forward_hook(replace)
        try:
            got = _outputs(model, feeds)
        finally:
            handle.remove()
        noise = sum(float((r - g).double().pow(2).sum()) for r, g in zip(reference, got))
        return _db(signal, noise)

    out = {}
    todo = layers
    if progress:
        from tqdm import tqdm

        todo = tqdm(layers, desc="int8 scheme per layer", unit="layer", leave=False)
    for name in todo:
        static = sqnr_with(name, "static")
        measure_pf = per_frame_supported(model.get_submodule(name)) and (
            threshold_db is None or static < threshold_db)
        out[name] = {"static": static, "per_frame": sqnr_with(name, "per_frame") if measure_pf else None}
    return out


def choose_schemes(measured: dict[str, dict[str, float | None]], *,
                   threshold_db: float) -> dict[str, str]:
    """Per frame where static keeps less than ``threshold_db`` of local SQNR and per frame keeps
    more; static everywhere else."""
    out = {}
    for name, m in measured.items():
        per_frame = m.get("per_frame")
        out[name] = ("per_frame" if m["static"] < threshold_db and per_frame is not None
                     and per_frame > m["static"] else "static")
    return out
