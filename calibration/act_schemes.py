"""Which int8 activation scheme each layer needs: one calibrated scale per tensor, or one per frame.

XNNPACK runs int8 activations two ways (targets.executorch): *static*, one scale per tensor fixed
at calibration (the native int8 convolution and GEMM kernels, fast and threaded), and *per frame*,
a scale computed at run time for each row of a dynamically quantized Linear (a Conv1d then runs
as a Linear over each output frame's unfolded input window, at the price of the unfolding: slices,
transposes and copies that dominate the per-frame programs' time, BENCHMARKS.md). A diffusion
U-Net's activations move with the time step (PTQ4ADM's premise), so some layers lose too much
under one scale per tensor; most do not (``benchmarks/int8_layer_scheme.py``: 44 of the demo's
51 layers keep >= 40 dB of final-latent SNR alone under static). This module measures, per layer
and on the calibration inputs the export is given, how much of the layer's output each scheme
keeps, and chooses per frame only where static loses:

* local SQNR (dB) of a layer = 10·log10(Σ y² / Σ (y − ŷ)²) over the calibration feeds, with
  ``y`` the layer's output with int8 weights and float input, ``ŷ`` the same layer with its input
  quantized by the scheme. Accumulated in forward hooks of one float pass per feed, so no
  intermediate is kept (the SAO decoder's last layers see 300 k frames × 128 channels);
* a layer runs per frame when its static local SQNR is below ``threshold_db`` and per frame keeps
  more; every other int8 layer runs static. The default threshold is the one that selects the same
  layers as the end-to-end one-layer-at-a-time measurement on the demo (BENCHMARKS.md).

The fake quantizers here are the schemes' arithmetic (asymmetric int8 with a zero point, as
XNNPACK's qs8/qdu8 kernels take it), not the lowered program; the lowered program's parity is
checked by the export as always.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("static", "per_frame")
# Static local SQNR (dB) below which a layer runs per frame. Chosen on the demo student: it is
# the value that picks out the layers whose one-layer final-latent SNR under static is below
# 40 dB (benchmarks/int8_layer_scheme.py records both measurements side by side).
DEFAULT_THRESHOLD_DB = 30.0


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


def per_frame_supported(leaf: nn.Module) -> bool:
    """Layers targets.executorch can run per frame: Linear, and ungrouped zero-padded Conv1d."""
    return type(leaf) is nn.Linear or (type(leaf) is nn.Conv1d and leaf.groups == 1
                                       and leaf.padding_mode == "zeros" and not isinstance(leaf.padding, str))


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


def _int8_weights(leaf: nn.Module) -> nn.Module:
    from calibration.fakequant import fake_quantize_weight

    q = copy.deepcopy(leaf)
    with torch.no_grad():
        q.weight.copy_(fake_quantize_weight(q.weight, 8, per_channel=True))
    return q


def fake_quantized(model: nn.Module, schemes: dict[str, str], ranges: dict[str, tuple[float, float]]) -> nn.Module:
    """A copy of ``model`` whose named leaves have int8 per-channel weights and int8 input under
    the given scheme (``static``: the calibrated ``ranges``; ``per_frame``: run-time ranges)."""
    from calibration.fakequant import fake_quantize_weight

    q = copy.deepcopy(model)
    for name, scheme in schemes.items():
        if scheme not in SCHEMES:
            raise ValueError(f"{name}: scheme must be one of {SCHEMES}, got {scheme!r}")
        leaf = q.get_submodule(name)
        with torch.no_grad():
            leaf.weight.copy_(fake_quantize_weight(leaf.weight, 8, per_channel=True))
        if scheme == "static":
            lo, hi = ranges[name]
            leaf.register_forward_pre_hook(lambda m, inp, lo=lo, hi=hi: (static_quantize(inp[0], lo, hi), *inp[1:]))
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
def one_layer_sqnr(model: nn.Module, feeds: Iterable[tuple[torch.Tensor, ...]], layers: Iterable[str],
                   ranges: dict[str, tuple[float, float]] | None = None, *,
                   threshold_db: float | None = None, progress: bool = False) -> dict[str, dict[str, float | None]]:
    """Per layer: SQNR (dB) of the model's output over ``feeds`` when only that layer is int8
    (weights per output channel, input static or per frame), against the float model.

    The method of PTQ4ADM's per-layer sensitivity (one layer quantized at a time, the rest full
    precision), on one call of the component rather than a whole trajectory: a layer's error
    counts by what reaches the output, which its own output SQNR does not tell (the demo's
    ``conv_in`` keeps 35 dB locally and costs the final latent the most). ``ranges``: the static
    ranges (default: the min/max of each layer's input over ``feeds``, what PT2E's observers
    record). With ``threshold_db``, per frame is measured only for layers whose static SQNR is below it.
    """
    from calibration.fakequant import observe_ranges

    feeds = list(feeds)
    layers = list(layers)
    if ranges is None:
        ranges = observe_ranges(model, feeds, layers=layers)
    reference = _outputs(model, feeds)
    signal = sum(float(r.double().pow(2).sum()) for r in reference)

    def sqnr_with(name: str, scheme: str) -> float:
        leaf = model.get_submodule(name)
        q = _int8_weights(leaf)
        lo, hi = ranges[name]

        def replace(module, inputs, output):
            x = inputs[0]
            return q(static_quantize(x, lo, hi)) if scheme == "static" else per_frame_forward(q, x)

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
                   threshold_db: float = DEFAULT_THRESHOLD_DB) -> dict[str, str]:
    """Per frame where static keeps less than ``threshold_db`` of local SQNR and per frame keeps
    more; static everywhere else."""
    out = {}
    for name, m in measured.items():
        per_frame = m.get("per_frame")
        out[name] = ("per_frame" if m["static"] < threshold_db and per_frame is not None
                     and per_frame > m["static"] else "static")
    return out
