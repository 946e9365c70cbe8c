"""Simulated (fake) quantization of named denoiser layers, for sensitivity analysis and plan checks.

A layer is a leaf of ``toolkit.families.QUANTIZABLE_TYPES`` (convolutions 1-D and 2-D, transposed
or not, and Linear), named by its FQN; naming a composite module (an attention
block) quantizes every leaf inside it. Per precision:

- weights int8 / int4: symmetric, per output channel, integers in [−(2^(b−1) − 1), 2^(b−1) − 1]
  (zero point 0: the form TensorRT and XNNPACK take), fake-quantized once in a copy of the model;
- activations int8: the layer's input, affine per tensor, its range from the calibration
  intermediates (``minmax`` or ``percentile`` observer), fake-quantized in a forward pre-hook;
- activations fp16 (the "A16" of W8A16 / W4A16: weight-only integer kernels with half-precision
  activations, as Core ML and TensorRT run them): rounded to float16 and back.

Nothing here changes the original model: :func:`quantized_copy` returns a new one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from calibration.precision import ACTIVATION_DTYPES, PRECISIONS, WEIGHT_DTYPES, LayerPrecision  # noqa: F401
from toolkit.families import QUANTIZABLE_TYPES, quantizable_leaves  # noqa: F401  (re-exported)

WEIGHT_BITS = {"int8": 8, "int4": 4}
ACTIVATION_BITS = {"int8": 8, "int16": 16}
OBSERVERS = ("minmax", "percentile")
DEFAULT_PERCENTILE = 99.99
MAX_OBSERVED_VALUES = 200_000  # per layer, for the percentile observer (a seeded subsample)


def resolve_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """FQNs (leaves or composites) → the leaves they cover; an unknown name is an error."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            raise KeyError(f"no module named {name!r} in {type(model).__name__}")
        out.update(quantizable_leaves(modules[name], name))
    return out


def fake_quantize_weight(w: torch.Tensor, bits: int, *, per_channel: bool = True) -> torch.Tensor:
    """Symmetric fake quantization; per output channel (dim 0) or per tensor."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
        amax = amax.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        amax = w.detach().abs().amax()
    scale = torch.clamp(amax, min=1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def fake_palettize_weight(w: torch.Tensor, bits: int, *, iterations: int = 25) -> torch.Tensor:
    """Every weight replaced by the nearest of 2^bits values fitted by 1-D k-means (Lloyd) over the
    tensor, initialised at evenly spaced quantiles: what Core ML's kmeans palettization stores
    (a look-up table per tensor and bits-wide indices)."""
    flat = w.detach().reshape(-1).double()
    k = min(2 ** bits, flat.numel())
    centers = torch.quantile(flat, torch.linspace(0, 1, k, dtype=torch.float64))
    for _ in range(iterations):
        assign = torch.bucketize(flat, (centers[1:] + centers[:-1]) / 2)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, flat)
        counts = torch.bincount(assign, minlength=k).double()
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers).sort().values
    assign = torch.bucketize(flat, (centers[1:] + centers[:-1]) / 2)
    return centers[assign].reshape(w.shape).to(w.dtype)


def fake_quantize_activation(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Affine per-tensor fake quantization of ``x`` to ``bits`` over [lo, hi] (which includes 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = max(hi - lo, 1e-12) / levels
    zero_point = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def _calibration_batches(calib, *, guidance: float, folded: bool, batch: int, pair: bool | None = None,
                         limit: int | None = None):
    """(x, t, cond) batches of ``batch`` intermediates, both CFG branches in one call when ``pair``.

    ``pair`` defaults to "guidance is applied" (unfolded, scale ≠ 1), with the unconditional branch
    zeroed; a paired call without guidance repeats the conditioning (the deployed batch-2 shape).
    """
    cfg = not folded and guidance != 1.0
    pair = cfg if pair is None else pair
    n = calib.x_t.shape[0] if limit is None else min(limit, calib.x_t.shape[0])
    for s in range(0, n, batch):
        e = min(s + batch, n)
        x, t, c = calib.x_t[s:e], calib.t[s:e], calib.cond[s:e]
        if pair:
            yield torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, torch.zeros_like(c) if cfg else c])
        else:
            yield x, t, c


def denoiser_feeds(calib, *, batch: int, guidance: float | None = None, folded: bool | None = None,
                   limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The calibration intermediates as denoiser inputs (x, t, cond) of the deployed batch.

    ``batch`` 2: each intermediate with both CFG branches in one call ([x, x], [t, t], [c, 0]), as
    the device runs an unfolded model; ``batch`` 1: the conditional input alone (folded guidance).
    """
    if batch not in (1, 2):
        raise ValueError(f"denoiser batch must be 1 or 2, got {batch}")
    guidance = calib.manifest["guidance"] if guidance is None else guidance
    folded = calib.manifest.get("guidance_folded", False) if folded is None else folded
    return list(_calibration_batches(calib, guidance=guidance, folded=folded, batch=1, pair=batch == 2,
                                     limit=limit))


def run_hooked(model: nn.Module, feeds: Iterable[tuple[torch.Tensor, ...]], handles: list) -> None:
    """``model(*feed)`` for every feed with the observing ``handles`` registered; removes them after."""
    try:
        for feed in feeds:
            model(*feed)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_ranges(model: nn.Module, feeds: Iterable[tuple[torch.Tensor, ...]], *,
                   layers: Iterable[str] | None = None, observer: str = "minmax",
                   percentile: float = DEFAULT_PERCENTILE, seed: int = 0) -> dict[str, tuple[float, float]]:
    """The input range of every quantizable leaf of ``model`` over ``model(*feed)`` for the feeds.

    ``minmax``: the extremes; ``percentile``: the (100 − p, p) percentiles of a seeded subsample
    of at most ``MAX_OBSERVED_VALUES`` values per layer (clips rare outliers).
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    leaves = resolve_layers(model, layers) if layers is not None else quantizable_leaves(model)
    lo = {n: np.inf for n in leaves}
    hi = {n: -np.inf for n in leaves}
    samples: dict[str, list[np.ndarray]] = {n: [] for n in leaves}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def pre(module, inputs):
            x = inputs[0].detach()
            lo[name] = min(lo[name], float(x.min()))
            hi[name] = max(hi[name], float(x.max()))
            if observer == "percentile":
                flat = x.reshape(-1)
                if flat.numel() > MAX_OBSERVED_VALUES // 4:
                    flat = flat[torch.randint(flat.numel(), (MAX_OBSERVED_VALUES // 4,), generator=gen)]
                samples[name].append(flat.to(torch.float64).numpy())
        return pre

    run_hooked(model, feeds, [m.register_forward_pre_hook(hook(n)) for n, m in leaves.items()])
    if observer == "minmax":
        return {n: (lo[n], hi[n]) for n in leaves}
    out = {}
    for n in leaves:
        values = np.concatenate(samples[n])
        if values.size > MAX_OBSERVED_VALUES:
            values = np.random.default_rng(seed).choice(values, MAX_OBSERVED_VALUES, replace=False)
        out[n] = (float(np.percentile(values, 100 - percentile)), float(np.percentile(values, percentile)))
    return out


def activation_ranges(model: nn.Module, calib, *, layers: Iterable[str] | None = None,
                      observer: str = "minmax", percentile: float = DEFAULT_PERCENTILE,
                      guidance: float | None = None, folded: bool | None = None, batch: int = 16,
                      seed: int = 0) -> dict[str, tuple[float, float]]:
    """The input range of every quantizable denoiser leaf over the calibration intermediates."""
    guidance = calib.manifest["guidance"] if guidance is None else guidance
    folded = calib.manifest.get("guidance_folded", False) if folded is None else folded
    return observe_ranges(model, _calibration_batches(calib, guidance=guidance, folded=folded, batch=batch),
                          layers=layers, observer=observer, percentile=percentile, seed=seed)


def quantized_copy(model: nn.Module, assignment: dict[str, LayerPrecision],
                   ranges: dict[str, tuple[float, float]] | None = None, *,
                   rounding: dict | None = None) -> nn.Module:
    """A deep copy of ``model`` with each named layer (leaf or composite) fake-quantized.

    Integer activations need ``ranges`` for every leaf they cover (from :func:`activation_ranges`).
    ``rounding`` ({leaf FQN: {width: calibration.gptq.LayerRounding}}, default: the assignment's
    own ``rounding`` when it is a ``calibration.plan.PlanAssignment``): those layers get the plan's
    chosen integers times their scales (GPTQ) instead of round-to-nearest.
    """
    if rounding is None:
        rounding = getattr(assignment, "rounding", None)
    q = copy.deepcopy(model)
    for name, prec in assignment.items():
        for leaf_name, leaf in resolve_layers(q, [name]).items():
            chosen = (rounding or {}).get(leaf_name, {}).get(prec.weights)
            if chosen is not None:
                with torch.no_grad():
                    leaf.weight.copy_(chosen.dequantize())
            elif prec.weights in WEIGHT_BITS and prec.granularity == "palette":
                with torch.no_grad():
                    leaf.weight.copy_(fake_palettize_weight(leaf.weight, WEIGHT_BITS[prec.weights]))
            elif prec.weights in WEIGHT_BITS:
                with torch.no_grad():
                    leaf.weight.copy_(fake_quantize_weight(leaf.weight, WEIGHT_BITS[prec.weights],
                                                           per_channel=prec.granularity == "per_channel"))
            elif prec.weights == "fp16":
                with torch.no_grad():
                    leaf.weight.copy_(leaf.weight.half().float())
            if prec.activations in ACTIVATION_BITS:
                if ranges is None or leaf_name not in ranges:
                    raise KeyError(f"{leaf_name}: {prec.activations} activations need a calibrated range; "
                                   "pass ranges from activation_ranges(model, calib)")
                lo, hi = ranges[leaf_name]
                bits = ACTIVATION_BITS[prec.activations]
                leaf.register_forward_pre_hook(
                    lambda m, inputs, lo=lo, hi=hi, bits=bits:
                    (fake_quantize_activation(inputs[0], lo, hi, bits), *inputs[1:]))
            elif prec.activations == "fp16":
                leaf.register_forward_pre_hook(lambda m, inputs: (inputs[0].half().float(), *inputs[1:]))
    return q.eval()


@torch.no_grad()
def denoiser_sqnr_db(reference: nn.Module, test: nn.Module, calib, *, guidance: float | None = None,
                     batch: int = 16) -> float:
    """SQNR (dB) of ``test``'s v-prediction against ``reference``'s on the calibration intermediates."""
    from runtime_py.metrics import snr_db

    guidance = calib.manifest["guidance"] if guidance is None else guidance
    folded = calib.manifest.get("guidance_folded", False)
    ref, out = [], []
    for x, t, c in _calibration_batches(calib, guidance=guidance, folded=folded, batch=batch):
        ref.append(reference(x, t, c).numpy())
        out.append(test(x, t, c).numpy())
    return snr_db(np.concatenate(ref), np.concatenate(out))

