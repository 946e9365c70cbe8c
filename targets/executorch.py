"""ExecuTorch with XNNPACK: ``torch.export`` → ``to_edge_transform_and_lower`` → ``.pte``.

The whole graph goes to XNNPACK: before partitioning, the edge-dialect passes of
:mod:`targets.xnnpack_graph` rewrite every op that the installed executorch's XNNPACK
partitioner does not claim (GroupNorm, split, no-op and broadcast expands, nearest-neighbour
upsampling, casts of constants) into ops it does, and one ``XnnpackPartitioner`` takes float,
static int8 and dynamically quantized (per-frame) ops together. On the SoftAlign denoiser and
the Oobleck VAE that is one or two delegates and nothing outside, fp32 and int8 (it was 40
delegates with 31 portable GroupNorms for the ``paper`` denoiser).

What is lowered is recorded, not assumed (STYLE.md rule 6): ``details["delegation"]`` counts the
call_function ops inside the XNNPACK delegates by op name (``delegated_ops``) and those left
outside them (``non_delegated_ops``; they run on ExecuTorch's portable kernels, with copies
between delegates), and counts the delegates; ``details["graph_passes"]`` says what the passes
rewrote. A component that is not fully delegated still exports; the figures say so.

The program also carries a constant method ``io_names`` (a uint8 tensor holding the UTF-8 JSON
``{"inputs": [...], "outputs": [...]}``), so that a runner can map tensors to names without the
bundle manifest.

Quantized (a plan): PT2E with the XNNPACK quantizer, one config per layer from the plan
(``XNNPACKQuantizer.set_module_name``), calibrated by running the PTQ4ADM calibration inputs
through the prepared graph, converted and lowered with the XNNPACK partitioner. What each plan
entry becomes on XNNPACK:

| plan entry            | applied                                                                  |
| --------------------- | ------------------------------------------------------------------------ |
| int8 w / int8 a       | int8 per-channel weights; activations int8 with one scale per latent frame, |
|                       | computed at run time (``INT8_ACTIVATIONS_ON_XNNPACK = "per_frame"``):     |
|                       | Conv1d runs as a time-major Linear (:func:`conv1d_as_linear`), whose     |
|                       | dynamically quantized XNNPACK kernel quantizes each row. ``"static"``:   |
|                       | one calibrated scale per tensor, and every int8 layer's output is        |
|                       | quantized too. ``"per_layer"``: static or per frame for each layer, by   |
|                       | measurement (:func:`measure_schemes`, recorded in the lowering report).  |
|                       | ConvTranspose1d and grouped convs are always static                      |
| int8 w / fp16-32 a    | the same per-frame int8 activations (``W8A16_ON_XNNPACK = "per_frame"``):  |
|                       | XNNPACK has no int8-weight kernel with float activations; ``"float"``     |
|                       | keeps the layer fp32 at 4× the bytes                                      |
| int4 w                | 4-bit per-channel weights (qmin −8, qmax 7), per-frame int8 activations;   |
|                       | Linear and rewritable Conv1d only, other convs fall back to int8          |
| fp16 / fp32 w         | fp32: one XNNPACK program here is float32 or integer, not half per layer |

Why per frame by default (BENCHMARKS.md, "int8 activation scheme on ExecuTorch" and "int8
activation schemes on the whole denoiser, as arithmetic"): on the distilled demo student, every
layer W8A8, 8 held-out examples, the lowered programs keep 29.2 dB mean / 20.0 dB worst latent
SNR per frame against 16.8 / 12.1 static; a per-layer mix (static where a layer alone keeps the
threshold) kept 17.7 / 13.7 with 7 layers per frame chosen with static measured on the inputs its
ranges came from, and 18.2 / 14.8 with 19 chosen as :func:`measure_schemes` does now (static
as lowered, input and output at ranges from other calibration inputs; as arithmetic that mix
keeps 25.6 / 15.5, so the lowered static layers lose more than the model of them says). A
diffusion U-Net's activations move with the time step (PTQ4ADM's premise): one calibrated scale
per tensor has to cover all of them, a scale computed at run time for each call does not; the
calibrated ranges are then unused, and the lowering report says so for every such layer. The
price is speed: per frame runs each convolution on an unfolded input (slices, a concatenation and
transposes around a Linear), which on the ``paper`` denoiser costs more than its GEMMs.

One scale per call and batch element (per diffusion time step) would keep most of the quality
(26.0 / 21.0 dB as arithmetic on the same examples) on XNNPACK's native int8 convolution with no
unfolding: its dynamically quantized 2-D convolution. ExecuTorch 1.5.1 cannot lower it for this
model family (checked on the installed package): (1) its XNNPACK partitioner and quantizer take
dynamic quantization for 2-D, non-depthwise convolutions only, so a Conv1d has to run as a Conv2d
over (B, C, 1, T); (2) with the reshape to 4-D inside the delegate, the layout pass
(``ChannelsLastTaggedReshapePass.input_to_nhwc``, dynamic-quant branch) walks back from the
dynamic dequantize through ``args[0]`` until it meets a node without a node argument, past the
reshape to the rank-3 tensor, and fails ("required rank 4 tensor to use channels_last format");
(3) with the delegate cut before the quantization chain (an unsqueeze or a one-input cat left
outside, both unsupported there), a two-convolution model lowers and runs, but on the SoftAlign
U-Net the partitioner builds partitions with dependency cycles ("Invalid partition, found
dependency cycles"). The arithmetic is modelled in :mod:`calibration.act_schemes`
(``per_step``) so that the figure above is measured, not assumed.

Positive selection by module name needs ``nn_module_stack`` on the weight ``get_attr`` nodes,
which ``torch.export`` leaves empty (NOTES.md); it is filled from the attribute path before
``prepare_pt2e``. The lowering report is read back from the converted graph (which weights are
dequantized from int8 / int4, which inputs are quantized statically or dynamically), never from
the configuration.

fp16: a ``.half()`` copy of the module behind casts, so the program's inputs and outputs stay
float32. Rank-1 inputs (the per-example timestep ``t``) are not cast: the sinusoidal timestep
embedding multiplies t by 1000 before ``sin``/``cos``, where fp16 rounding alone costs ~25 dB.
"""

from __future__ import annotations

import copy
import json
import operator
from collections import Counter
from pathlib import Path

from targets import TARGETS, ComponentArtifact, check_export_args, replace_into

NAME = "executorch"
FILE_SUFFIX = TARGETS[NAME].file_suffix
BACKEND = "XnnpackBackend"
# Name of the constant method that holds the tensor names (see the module docstring).
IO_NAMES_METHOD = "io_names"


def available() -> str | None:
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # noqa: F401
            XnnpackPartitioner,
        )
    except ImportError as exc:
        return f"executorch with the XNNPACK backend is not installed ({exc})"
    return None


def _op_name(target) -> str:
    """'aten.native_group_norm.default' for an edge op, the qualified name otherwise."""
    name = getattr(target, "__name__", None) or str(target)
    return str(name)


def _is_bookkeeping(node) -> bool:
    # getitem unpacks tuple outputs (of delegates, split, group_norm); it is not an op that runs.
    return node.target is operator.getitem


def delegation_coverage(graph_module) -> dict:
    """Delegated vs non-delegated call_function ops of a lowered edge graph (getitem excluded)."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    outside: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    delegates = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            lowered = getattr(graph_module, node.target, None)
            if isinstance(lowered, LoweredBackendModule):
                delegates += 1
                for inner in lowered.original_module.graph.nodes:
                    if inner.op == "call_function" and not _is_bookkeeping(inner):
                        inside[_op_name(inner.target)] += 1
        elif node.op == "call_function" and not _is_bookkeeping(node):
            name = _op_name(node.target)
            if name != "executorch_call_delegate":
                outside[name] += 1
    delegated, non_delegated = sum(inside.values()), sum(outside.values())
    total = delegated + non_delegated
    return {
        "backend": BACKEND,
        "delegates": delegates,
        "ops_total": total,
        "ops_delegated": delegated,
        "ops_non_delegated": non_delegated,
        "coverage": delegated / total if total else 1.0,
        "fully_delegated": non_delegated == 0 and delegates > 0,
        "non_delegated_ops": dict(sorted(outside.items(), key=lambda kv: (-kv[1], kv[0]))),
        "delegated_ops": dict(sorted(inside.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def half_with_float_io(module):
    """A ``.half()`` copy of ``module`` that takes and returns float32.

    Every submodule holding parameters or buffers casts its floating inputs to its own dtype (a
    forward pre-hook), so values the model computes in float32 on purpose (the timestep embedding,
    √ᾱ_t) enter the fp16 layers without dtype errors. Rank-1 inputs stay float32.
    """
    import torch
    from torch import nn

    def cast_to_own_dtype(mod, args):
        own = next(iter([*mod.parameters(recurse=False), *mod.buffers(recurse=False)]))
        return tuple(a.to(own.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)

    class HalfWithFloatIO(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = copy.deepcopy(inner).eval().half()
            for sub in self.inner.modules():
                if any(True for _ in sub.parameters(recurse=False)) or any(
                        True for _ in sub.buffers(recurse=False)):
                    sub.register_forward_pre_hook(cast_to_own_dtype)

        def forward(self, *args):
            out = self.inner(*(a.half() if a.dim() > 1 else a for a in args))
            if isinstance(out, tuple):
                return tuple(o.float() for o in out)
            return out.float()

    return HalfWithFloatIO(module).eval()


def conv1d_as_linear(module, names):
    """A copy of ``module`` whose Conv1d leaves in ``names`` run as time-major Linear layers.

    The same arithmetic (im2col): the input (B, C, T) is zero-padded, its k dilated taps are
    stacked on the channel axis (B, k·C, T'), transposed to (B, T', k·C) and multiplied by the
    weight laid out tap-major (out, k·C). In this form XNNPACK's dynamically quantized linear
    kernels apply, which quantize each row, here each latent frame, with its own scale at run time
    (per-token activations); the 4-bit linear kernels apply too. The layer keeps its FQN; the
    Linear is its child ``linear``. Only ungrouped, zero-padded convolutions are rewritten.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _Conv1dAsLinear(nn.Module):
        def __init__(self, conv: nn.Conv1d):
            super().__init__()
            k = conv.kernel_size[0]
            self.k, self.stride, self.dilation = k, conv.stride[0], conv.dilation[0]
            self.padding = conv.padding[0]
            self.linear = nn.Linear(k * conv.in_channels, conv.out_channels, bias=conv.bias is not None)
            with torch.no_grad():  # (out, in, k) -> (out, k, in) -> (out, k·in): tap-major
                self.linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1))
                if conv.bias is not None:
                    self.linear.bias.copy_(conv.bias)

        def forward(self, x):
            b, c, length = x.shape
            length += 2 * self.padding
            t_out = (length - self.dilation * (self.k - 1) - 1) // self.stride + 1
            # Tap j reads x[j·d + s·i] for i < t_out. Taken as a step-1 slice of s·t_out samples,
            # viewed (t_out, s) and cut to column 0: XNNPACK slices with step 1 only. The right
            # pad covers the s − 1 samples past the last tap that the view reads.
            extra = max(0, (self.k - 1) * self.dilation + self.stride * t_out - length)
            if self.padding or extra:
                x = F.pad(x, (self.padding, self.padding + extra))
            taps = []
            for j in range(self.k):
                start = j * self.dilation
                tap = x if (start, self.stride * t_out) == (0, x.shape[-1]) else \
                    x[:, :, start: start + self.stride * t_out]  # a whole-range slice is an alias
                if self.stride > 1:
                    tap = tap.reshape(b, c, t_out, self.stride)[..., :1].reshape(b, c, t_out)
                taps.append(tap)
            cols = taps[0] if self.k == 1 else torch.cat(taps, dim=1)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·T', k·C): one row per step
            out = self.linear(rows).reshape(x.shape[0], t_out, -1)
            return out.transpose(1, 2)

    out = copy.deepcopy(module)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        conv = getattr(parent, child)
        if not _rewritable_conv1d(conv):
            raise TypeError(f"{name}: only ungrouped, zero-padded Conv1d layers with numeric padding "
                            "can run as a linear layer")
        setattr(parent, child, _Conv1dAsLinear(conv))
    return out


def _rewritable_conv1d(leaf) -> bool:
    from calibration.act_schemes import rewritable_conv1d

    return rewritable_conv1d(leaf)


def _fill_get_attr_module_stack(graph_module) -> None:
    """Give weight/bias ``get_attr`` nodes the ``nn_module_stack`` of their owner (NOTES.md)."""
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and "." in str(node.target) and not node.meta.get("nn_module_stack"):
            parts = str(node.target).split(".")[:-1]
            node.meta["nn_module_stack"] = {
                f"fill_{i}": (".".join(parts[:i + 1]), object) for i in range(len(parts))}


# How int8 activations lower to XNNPACK: "per_frame" (the default: dynamic, one scale per latent
# frame, every layer), "per_layer" (each W8A8 layer measured on the calibration inputs, one layer
# at a time: static where it keeps SCHEME_THRESHOLD_DB of the component's output SQNR, per frame
# where it does not; calibration.act_schemes) or "static" (one calibrated scale per tensor, every
# layer; every int8 layer's output quantized too). See the module doc for the figures behind the
# default.
INT8_ACTIVATIONS_ON_XNNPACK = "per_frame"
INT8_SCHEMES = ("per_frame", "per_layer", "static")
# One-layer component-output SQNR (dB) under static int8 (input and output quantized with ranges
# from other calibration inputs than the ones measured) below which "per_layer" runs a layer per
# frame. On the demo student 21 of 51 layers fall below it (benchmarks/int8_layer_scheme.py).
SCHEME_THRESHOLD_DB = 40.0
# Calibration inputs the per-layer measurement runs (each layer costs one or two calls per input);
# the static ranges come from the other half of the calibration inputs.
SCHEME_FEEDS = 16
# How a W8A16 entry (int8 weights, float activations) lowers: "per_frame" (int8 activations per time
# step, dynamic; XNNPACK has no 16-bit activation kernel) or "float" (fp32, 4× the bytes).
W8A16_ON_XNNPACK = "per_frame"
DYNAMIC_ACTIVATIONS_REASON = ("int8 activations quantized at run time with one scale per call and latent frame "
                              "(dynamic); the calibrated ranges are not used "
                              "(INT8_ACTIVATIONS_ON_XNNPACK = {scheme!r}{why})")
NO_INTEGER_WEIGHTS_REASON = ("fp32: the plan has no integer weights for this component, and one XNNPACK program "
                             "is float32 or integer, not half per layer")
# The schemes that run int8 activations per latent frame (Conv1d rewritten as a Linear).
FRAME_KINDS = ("int8_frame", "int4_frame")


def _layer_kinds(module, plan, schemes: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """Per plan layer: the XNNPACK scheme applied (see the module doc) and why it differs.

    ``schemes``: the per-layer activation scheme of W8A8 layers ("static" / "per_frame", from
    :func:`measure_schemes`) when ``INT8_ACTIVATIONS_ON_XNNPACK`` is "per_layer".
    """
    from torch import nn

    if INT8_ACTIVATIONS_ON_XNNPACK not in INT8_SCHEMES:
        raise ValueError(f"INT8_ACTIVATIONS_ON_XNNPACK must be one of {INT8_SCHEMES}, "
                         f"got {INT8_ACTIVATIONS_ON_XNNPACK!r}")

    kinds = {}
    for name, want in plan.items():
        leaf = module.get_submodule(name)
        linear = isinstance(leaf, nn.Linear)
        per_frame = linear or _rewritable_conv1d(leaf)
        kind_name = type(leaf).__name__
        if want.weights in ("fp16", "fp32"):
            kinds[name] = ("float", None if want.weights == "fp32" else
                           "fp32: one XNNPACK program is float32 or integer, not half per layer")
        elif want.weights == "int4" and per_frame:
            kinds[name] = ("int4_frame", None if want.activations == "int8" else
                           "int8 activations per latent frame: XNNPACK's 4-bit kernels take int8 "
                           "activations")
        elif want.weights == "int4":
            kinds[name] = ("int8_static", f"int8 weights: XNNPACK has no 4-bit {kind_name} kernel "
                                          "(linear, and convolutions run as linear, only)")
        elif want.activations == "int8" and per_frame and (
                INT8_ACTIVATIONS_ON_XNNPACK == "per_frame" or (schemes or {}).get(name) == "per_frame"):
            kinds[name] = ("int8_frame", None)
        elif want.activations == "int8":
            kinds[name] = ("int8_static", None)
        elif W8A16_ON_XNNPACK == "per_frame" and per_frame:
            kinds[name] = ("int8_frame", f"int8 activations, one scale per latent frame at run time: "
                                        f"XNNPACK has no int8-weight kernel with {want.activations} "
                                        "activations")
        else:
            kinds[name] = ("float", f"fp32: XNNPACK has no {want.weights}-weight kernel with "
                                    f"{want.activations} activations (W8A16_ON_XNNPACK = "
                                    f"{W8A16_ON_XNNPACK!r}, {kind_name})")
    return kinds


def quantize_pt2e(spec, plan: dict, calib: list):
    """The plan applied with PT2E + XNNPACKQuantizer, calibrated; returns (exported program, kinds)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torch import nn
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = spec.module.eval()
    measured = None
    if INT8_ACTIVATIONS_ON_XNNPACK == "per_layer":
        measured = measure_schemes(module, plan, calib or [tuple(spec.example_inputs)])
    kinds = _layer_kinds(module, plan, None if measured is None else measured["schemes"])
    stepped = [n for n, (k, _) in kinds.items() if k in FRAME_KINDS
               and isinstance(module.get_submodule(n), nn.Conv1d)]
    module = conv1d_as_linear(module, stepped).eval()
    configs = {
        "int8_static": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False),
        "int8_frame": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True),
        "int4_frame": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True,
                                                       weight_qmin=-8, weight_qmax=7),
    }
    quantizer = XNNPACKQuantizer()
    for name, (kind, _) in kinds.items():
        if kind in configs:
            quantizer.set_module_name(name, configs[kind])
    graph = torch.export.export(module, tuple(spec.example_inputs)).module()
    _fill_get_attr_module_stack(graph)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for inputs in calib or [tuple(spec.example_inputs)]:
            prepared(*inputs)
    converted = convert_pt2e(prepared)
    _float_layers_read_float(converted, {n for n, (k, _) in kinds.items() if k == "float"})
    _frame_layers_read_float(converted, set(stepped))
    inject_rounding(converted, plan, kinds)  # GPTQ plans: the plan's integers, not the observers'
    return torch.export.export(converted, tuple(spec.example_inputs)), kinds, measured


def measure_schemes(module, plan: dict, calib: list, *, threshold_db: float | None = None,
                    feeds: int | None = None) -> dict:
    """Which W8A8 layers run static and which per frame, measured (calibration.act_schemes).

    One layer at a time int8 (the rest float): the component's output SQNR with that layer static
    (input and output quantized with the min/max over every other calibration input) on up to
    ``feeds`` of the remaining ones, and, where that is below ``threshold_db``, per frame. With a
    single calibration input the ranges come from the input measured. Returns the record the
    manifest keeps: threshold, inputs used, per-layer dB and the chosen scheme.
    """
    from calibration.act_schemes import (
        choose_schemes,
        one_layer_sqnr,
        per_frame_supported,
    )

    threshold_db = SCHEME_THRESHOLD_DB if threshold_db is None else threshold_db
    feeds = SCHEME_FEEDS if feeds is None else feeds
    layers = [n for n, p in plan.items() if p.weights == "int8" and p.activations == "int8"
              and per_frame_supported(module.get_submodule(n))]
    calib = list(calib)
    range_feeds, measured_feeds = (calib[0::2], calib[1::2][:feeds]) if len(calib) > 1 else (calib, calib)
    measured = one_layer_sqnr(module, measured_feeds, layers, range_feeds=range_feeds,
                              threshold_db=threshold_db) if layers else {}
    schemes = choose_schemes(measured, threshold_db=threshold_db)
    return {"method": "one layer at a time int8 (static: input and output at calibrated ranges), the "
                      "component's output SQNR over calibration inputs other than the ranges' "
                      "(calibration.act_schemes.one_layer_sqnr)",
            "threshold_db": threshold_db, "inputs": len(measured_feeds), "range_inputs": len(range_feeds),
            "per_frame": sorted(n for n, k in schemes.items() if k == "per_frame"),
            "layers": {n: {"static_db": _round_db(m["static"]), "per_frame_db": _round_db(m["per_frame"]),
                           "scheme": schemes[n]} for n, m in measured.items()},
            "schemes": schemes}


def _round_db(value: float | None) -> float | None:
    import math

    if value is None:
        return None
    return round(value, 2) if math.isfinite(value) else None


# --- GPTQ rounding (calibration.gptq): begin ----------------------------------------------------


def inject_rounding(graph_module, plan, kinds: dict) -> dict[str, str]:
    """Put the plan's chosen integer weights and scales (``plan.rounding``, a GPTQ plan's) into the
    converted graph in place of the ones its observers rounded; returns {FQN: width applied}.

    After ``convert_pt2e`` every integer weight is a frozen int8 constant read by
    ``dequantize_per_channel(q, scale, zero_point, axis, qmin, qmax)``; those constants are replaced
    (a Conv1d run as a time-major Linear takes the integers tap-major, as :func:`conv1d_as_linear`
    lays out its weight). The width comes from the graph (qmin −8: int4), so a layer XNNPACK runs at
    int8 where the plan asked int4 gets the plan's int8 rounding. A rounded layer whose weight is not
    dequantized per channel, or a rounding this grid cannot hold (per-group scales), is an error:
    never a silent re-rounding. RTN plans (no ``rounding``) are left as converted.
    """
    from calibration.gptq import rounding_for

    rounding = getattr(plan, "rounding", None)
    if not rounding:
        return {}
    applied: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not any(k in str(node.target) for k in ("conv", "linear")):
            continue
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        owner = next((p for p in reversed(stack) if p in plan), None)
        if owner is None or owner not in rounding or kinds[owner][0] == "float":
            continue
        dq = node.args[1]
        if getattr(dq, "op", None) != "call_function" or "dequantize_per_channel" not in str(dq.target):
            raise RuntimeError(f"{NAME}: {owner} has a GPTQ rounding but its weight is not dequantized per "
                               f"channel in the converted graph ({kinds[owner][0]}); cannot apply it")
        q_node, scale_node, _, axis, qmin, qmax = dq.args[:6]
        width = "int4" if qmin == -8 else "int8"
        chosen = rounding_for(rounding, owner, width, target=NAME)
        if chosen.group_size is not None:
            raise ValueError(f"{NAME}: {owner}'s rounding has one scale per group of {chosen.group_size}; "
                             "XNNPACK's quantizer here is per channel (plan with --gptq-group-size unset)")
        q = chosen.q
        if stack and stack[-1] == f"{owner}.linear":  # Conv1d as a time-major Linear: (out, k·in)
            q = q.permute(0, 2, 1).reshape(q.shape[0], -1)
            channel = 0
        else:
            channel = chosen.channel_axis
        old_q, old_scale = getattr(graph_module, q_node.target), getattr(graph_module, scale_node.target)
        if tuple(q.shape) != tuple(old_q.shape) or axis != channel or old_scale.shape != chosen.scale.shape:
            raise RuntimeError(f"{NAME}: {owner}: the rounding's integers {tuple(q.shape)} (axis {channel}) do "
                               f"not fit the converted weight {tuple(old_q.shape)} (axis {axis})")
        if int(q.min()) < qmin or int(q.max()) > qmax:
            raise RuntimeError(f"{NAME}: {owner}: rounding integers outside [{qmin}, {qmax}]")
        setattr(graph_module, q_node.target, q.to(old_q.dtype).contiguous())
        setattr(graph_module, scale_node.target, chosen.scale.to(old_scale.dtype).contiguous())
        applied[owner] = width
    missing = [n for n in rounding if n in plan and kinds.get(n, ("float",))[0] != "float" and n not in applied]
    if missing:
        raise RuntimeError(f"{NAME}: no integer weight found in the converted graph for rounded layers {missing[:5]}")
    return applied


# --- GPTQ rounding: end -------------------------------------------------------------------------


def _float_layers_read_float(graph_module, float_layers: set[str]) -> None:
    """Float layers read and write float tensors, not quantize → dequantize copies of them.

    The quantizer shares quantization parameters across ``cat`` with its quantized neighbours, so
    a layer the plan keeps float can find its input already rounded to int8, or its output rounded
    on the way into a quantized ``cat`` (the U-Net's upsampling convs). XNNPACK then refuses a
    float-weight convolution behind a dequantize, or fuses the output quantize into it and fails to
    create it ("Failed to create convolution node ... xnn_status_invalid_parameter"). The plan
    says float: the layer reads the float value, and its consumers read its float output.
    """
    def is_call(n, name: str) -> bool:
        return getattr(n, "op", None) == "call_function" and name in str(n.target)

    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or not any(k in str(node.target) for k in ("conv", "linear")):
            continue
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if not stack or stack[-1] not in float_layers:
            continue
        dq = node.args[0]
        if is_call(dq, "dequantize_per_tensor") and is_call(dq.args[0], "quantize_per_tensor"):
            node.replace_input_with(dq, dq.args[0].args[0])
            changed = True
        for q in [u for u in node.users if is_call(u, "quantize_per_tensor")]:
            for dq_out in [u for u in q.users if is_call(u, "dequantize_per_tensor")]:
                dq_out.replace_all_uses_with(node)
                changed = True
    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()


def _frame_layers_read_float(graph_module, frame_layers: set[str]) -> None:
    """A per-frame layer's unfolding reads float tensors, not static quantize → dequantize copies.

    Beside static int8 layers, the quantizer can hand a per-frame layer (a Conv1d run as a
    time-major Linear) an input that a static neighbour's quantization shares, e.g. the U-Net
    input ``cat([x, cond])`` read by a static ``vocal.conv_in`` and a per-frame ``conv_in``. The
    unfolding's first op (the zero pad) then takes int8 in and gives float out, which XNNPACK
    refuses ("Failed to create StaticConstantPad node ... xnn_status_invalid_parameter"). The
    layer quantizes its rows itself at run time: its ops read the float value. Dynamic
    quantization (scales computed in the graph) is left alone, and so is the output of a static
    int8 convolution or linear: XNNPACK takes such a layer only when every user of its output is
    its quantize (bypassing it left the static ``downsample.0`` of the tiny U-Net outside the
    delegate, and its weight's ``dequantize_per_channel`` without a kernel).
    """
    import torch

    def is_static(n, name: str) -> bool:
        return (getattr(n, "op", None) == "call_function" and name in str(n.target)
                and not isinstance(n.args[1], torch.fx.Node))

    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if not stack or not any(p == f or p.startswith(f + ".") for p in stack[-1:] for f in frame_layers):
            continue
        for arg in list(node.all_input_nodes):
            if is_static(arg, "dequantize_per_tensor") and is_static(arg.args[0], "quantize_per_tensor"):
                source = arg.args[0].args[0]
                if getattr(source, "op", None) == "call_function" and any(
                        k in str(source.target) for k in ("conv", "linear")):
                    continue  # a static int8 layer writes int8: XNNPACK wants only quantize users there
                node.replace_input_with(arg, source)
                changed = True
    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()


def _applied_from_graph(exported, plan: dict) -> dict:
    """Per plan layer, what the converted graph really does (read from its q/dq nodes)."""
    from calibration.precision import LayerPrecision

    weight_bits: dict[str, str] = {}
    act: dict[str, str] = {}
    for node in exported.graph_module.graph.nodes:
        if node.op != "call_function" or not any(k in str(node.target) for k in ("conv", "linear")):
            continue
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        owner = next((p for p in reversed(stack) if p in plan), None)
        if owner is None:
            continue
        x, w = node.args[0], node.args[1]
        if getattr(w, "op", None) == "call_function" and "dequantize" in str(w.target):
            qmin = w.args[-3] if len(w.args) >= 3 else None
            weight_bits[owner] = "int4" if qmin == -8 else "int8"
        if getattr(x, "op", None) == "call_function" and "dequantize" in str(x.target):
            act[owner] = "int8"
    out = {}
    for name in plan:
        got = LayerPrecision(weight_bits.get(name, "fp32"), act.get(name, "fp32"),
                             "per_channel" if name in weight_bits else "per_tensor")
        out[name] = got
    return out


def export(spec, *, precision: str, plan: dict | None, calib: list | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    from targets import lowering_report, plan_label
    from targets.xnnpack_graph import whole_graph_passes

    lowering = None
    quantized = plan is not None and any(p.weights in ("int8", "int4") for p in plan.values())
    if quantized:
        if precision != "fp32":
            raise ValueError(f"{NAME}: a quantization plan is applied to the fp32 model; drop --precision fp16")
        exported, kinds, measured = quantize_pt2e(spec, plan, calib)
        got = _applied_from_graph(exported, plan)
        reasons = {n: why for n, (_, why) in kinds.items()}

        def why_dynamic(name: str) -> str:
            if measured is None or name not in measured["layers"]:
                return ""
            m = measured["layers"][name]
            return (f": static keeps {m['static_db']} dB of the output SQNR alone, below "
                    f"{measured['threshold_db']:g}; per frame {m['per_frame_db']} dB")

        # A plan's int8 activations mean the calibrated ranges; the per-frame scheme computes its
        # scales at run time instead: same types, another scheme, so not honoured, and said why.
        dynamic = {n: DYNAMIC_ACTIVATIONS_REASON.format(scheme=INT8_ACTIVATIONS_ON_XNNPACK, why=why_dynamic(n))
                   for n, (k, _) in kinds.items() if k in FRAME_KINDS and plan[n].activations == "int8"}
        lowering = lowering_report(plan, {n: (got[n], reasons[n]) for n in plan}, departures=dynamic)
        lowering["schemes"] = {n: k for n, (k, _) in kinds.items()}
        lowering["int8_activations"] = INT8_ACTIVATIONS_ON_XNNPACK
        if measured is not None:
            lowering["scheme_measurement"] = {k: v for k, v in measured.items() if k != "schemes"}
    else:
        if plan is not None:  # a plan with no integer weights: every layer runs float, and says so
            from calibration.precision import LayerPrecision

            fp32 = LayerPrecision("fp32", "fp32", "per_tensor")
            lowering = lowering_report(plan, {n: (fp32, None if p.weights == "fp32" and p.activations == "fp32"
                                                  else NO_INTEGER_WEIGHTS_REASON) for n, p in plan.items()})
            lowering["schemes"] = {n: "float" for n in plan}
        module = spec.module.eval() if precision == "fp32" else half_with_float_io(spec.module)
        exported = torch.export.export(module, tuple(spec.example_inputs))
    names = json.dumps({"inputs": list(spec.input_names), "outputs": list(spec.output_names)})
    # Everything XNNPACK can run, in as few delegates as the graph allows: the graph passes of
    # targets.xnnpack_graph rewrite the ops XNNPACK's partitioner does not claim (GroupNorm,
    # split, expand, nearest upsampling, casts of constants) into ones it does, and one
    # partitioner takes float, static int8 and dynamically quantized (per-frame) ops together.
    pass_manager, rewrites = whole_graph_passes()
    partitioners = [XnnpackPartitioner()]
    edge = to_edge_transform_and_lower(
        exported,
        transform_passes=pass_manager,
        partitioner=partitioners,
        constant_methods={IO_NAMES_METHOD: torch.tensor(list(names.encode()), dtype=torch.uint8)},
    )
    coverage = delegation_coverage(edge.exported_program().graph_module)
    program = edge.to_executorch()

    name = f"{spec.name}{FILE_SUFFIX}"
    replace_into(Path(out_dir), lambda tmp: tmp.write_bytes(program.buffer), name)
    return ComponentArtifact(
        component=spec.name,
        path=name,
        precision=precision if lowering is None else plan_label(
            {n: _precision_of(e["applied"]) for n, e in lowering["layers"].items()}),
        details={
            "executorch_version": _version("executorch"),
            "quantizer": None if not quantized else "torchao PT2E + XNNPACKQuantizer (per module name)",
            "calibration_inputs": None if not quantized else len(calib or []),
            "lowering": lowering,
            "partitioner": " + ".join(type(p).__name__ + ("(per op)" if p.per_op_mode else "")
                                      for p in partitioners),
            "io_dtype": "float32",
            "io_names_method": IO_NAMES_METHOD,
            "fp16_kept_float32": [n for n, t in zip(spec.input_names, spec.example_inputs)
                                  if precision == "fp16" and t.dim() <= 1],
            "graph_passes": dict(sorted(rewrites.items())),
            "delegation": coverage,
        },
    )


def _precision_of(d: dict):
    from calibration.precision import LayerPrecision

    return LayerPrecision.from_dict(d)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
