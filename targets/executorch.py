"""ExecuTorch with XNNPACK: ``torch.export`` → ``to_edge_transform_and_lower`` → ``.pte``.

What is lowered is recorded, not assumed (STYLE.md rule 6): ``details["delegation"]`` counts the
call_function ops inside the XNNPACK delegates and those left outside them (which run on
ExecuTorch's portable kernels, with layout copies between delegates), names the ones left outside,
and counts the delegates. A component that is not fully delegated still exports; the figures say so.

The program also carries a constant method ``io_names`` (a uint8 tensor holding the UTF-8 JSON
``{"inputs": [...], "outputs": [...]}``), so that a runner can map tensors to names without the
bundle manifest.

Quantized (a plan): PT2E with the XNNPACK quantizer, one config per layer from the plan
(``XNNPACKQuantizer.set_module_name``), calibrated by running the PTQ4ADM calibration inputs
through the prepared graph, converted and lowered with the XNNPACK partitioner. What each plan
entry becomes on XNNPACK:

| plan entry            | applied                                                                  |
| --------------------- | ------------------------------------------------------------------------ |
| int8 w / int8 a       | static int8: per-channel symmetric weights, per-tensor activations        |
| int8 w / fp16-32 a    | fp32 (``W8A16_ON_XNNPACK = "float"``): XNNPACK has no int8-weight kernel  |
|                       | with float activations. The alternative, ``"dynamic"`` (int8 weights,     |
|                       | int8 activations quantized per call; Conv1d run as Conv2d (1×k), which   |
|                       | NOTES.md shows the dynamic quantizer needs), keeps the bytes small but    |
|                       | quantizes exactly the activations a refined plan raised because int8     |
|                       | hurt them: on the demo's refined w8a8 plan it gave 13.5 dB worst latent   |
|                       | SNR against the 20 dB budget, so float is the default                     |
| int4 w (Linear)       | 4-bit per-channel weights (qmin −8, qmax 7), dynamic int8 activations     |
| int4 w (Conv)         | int8 weights: XNNPACK's 4-bit kernels cover linear only                   |
| fp16 / fp32 w         | fp32: one XNNPACK program here is float32 or integer, not half per layer  |

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

from targets import ComponentArtifact, check_export_args, replace_into

NAME = "executorch"
FILE_SUFFIX = ".pte"
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


def conv1d_as_conv2d(module, names):
    """A copy of ``module`` whose Conv1d leaves in ``names`` run as Conv2d with a (1, k) kernel.

    The same arithmetic, in the form XNNPACK's dynamic quantizer annotates (it wants 4-D weights).
    The layer keeps its FQN; the Conv2d is its child ``conv``.
    """
    import torch
    from torch import nn

    class _Conv1dAs2d(nn.Module):
        def __init__(self, conv: nn.Conv1d):
            super().__init__()
            self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                                  stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                                  dilation=(1, conv.dilation[0]), groups=conv.groups,
                                  bias=conv.bias is not None)
            with torch.no_grad():
                self.conv.weight.copy_(conv.weight.unsqueeze(2))
                if conv.bias is not None:
                    self.conv.bias.copy_(conv.bias)

        def forward(self, x):
            return self.conv(x.unsqueeze(2)).squeeze(2)

    out = copy.deepcopy(module)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        conv = getattr(parent, child)
        if not isinstance(conv, nn.Conv1d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(f"{name}: only zero-padded Conv1d layers with numeric padding can be rewritten")
        setattr(parent, child, _Conv1dAs2d(conv))
    return out


def _fill_get_attr_module_stack(graph_module) -> None:
    """Give weight/bias ``get_attr`` nodes the ``nn_module_stack`` of their owner (NOTES.md)."""
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and "." in str(node.target) and not node.meta.get("nn_module_stack"):
            parts = str(node.target).split(".")[:-1]
            node.meta["nn_module_stack"] = {
                f"fill_{i}": (".".join(parts[:i + 1]), object) for i in range(len(parts))}


# How a W8A16 entry (int8 weights, float activations) lowers to XNNPACK: "float" or "dynamic" (see
# the module doc for why float is the default).
W8A16_ON_XNNPACK = "float"


def _layer_kinds(module, plan) -> dict[str, tuple[str, str | None]]:
    """Per plan layer: the XNNPACK scheme applied (see the module doc) and why it differs."""
    from torch import nn

    kinds = {}
    for name, want in plan.items():
        leaf = module.get_submodule(name)
        linear = isinstance(leaf, nn.Linear)
        if want.weights in ("fp16", "fp32"):
            kinds[name] = ("float", None if want.weights == "fp32" else
                           "fp32: one XNNPACK program is float32 or integer, not half per layer")
        elif want.weights == "int4" and linear:
            kinds[name] = ("int4_dynamic", None if want.activations == "int8" else
                           "int8 dynamic activations: XNNPACK's 4-bit kernels take int8 activations")
        elif want.weights == "int4" and want.activations == "int8":
            kinds[name] = ("int8_static", f"int8 weights: XNNPACK has no 4-bit {type(leaf).__name__} kernel "
                                          "(linear only)")
        elif want.activations == "int8":
            kinds[name] = ("int8_static", None)
        elif W8A16_ON_XNNPACK == "dynamic":
            kinds[name] = ("int8_dynamic", "dynamic int8 activations: XNNPACK has no int8-weight kernel "
                                           f"with {want.activations} activations")
        else:
            kinds[name] = ("float", f"fp32: XNNPACK has no {want.weights}-weight kernel with "
                                    f"{want.activations} activations, and dynamic int8 activations cost "
                                    "more quality than the plan allows (see W8A16_ON_XNNPACK)")
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
    kinds = _layer_kinds(module, plan)
    dynamic_convs = [n for n, (k, _) in kinds.items() if k == "int8_dynamic"
                     and isinstance(module.get_submodule(n), nn.Conv1d)]
    module = conv1d_as_conv2d(module, dynamic_convs).eval()
    configs = {
        "int8_static": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False),
        "int8_dynamic": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True),
        "int4_dynamic": get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True,
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
    return torch.export.export(converted, tuple(spec.example_inputs)), kinds


def _float_layers_read_float(graph_module, float_layers: set[str]) -> None:
    """Feed float layers the float tensor, not a quantize → dequantize copy of it.

    The quantizer shares quantization parameters across ``cat`` with its quantized neighbours, so
    a layer the plan keeps float can find its input already rounded to int8; XNNPACK then refuses
    a float-weight convolution behind a dequantize. The plan says float: read the float value.
    """
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not any(k in str(node.target) for k in ("conv", "linear")):
            continue
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if not stack or stack[-1] not in float_layers:
            continue
        dq = node.args[0]
        if (getattr(dq, "op", None) == "call_function" and "dequantize_per_tensor" in str(dq.target)
                and getattr(dq.args[0], "op", None) == "call_function"
                and "quantize_per_tensor" in str(dq.args[0].target)):
            node.replace_input_with(dq, dq.args[0].args[0])
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
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from targets import lowering_report, plan_label

    lowering = None
    if plan is not None and any(p.weights in ("int8", "int4") for p in plan.values()):
        if precision != "fp32":
            raise ValueError(f"{NAME}: a quantization plan is applied to the fp32 model; drop --precision fp16")
        exported, kinds = quantize_pt2e(spec, plan, calib)
        got = _applied_from_graph(exported, plan)
        reasons = {n: why for n, (_, why) in kinds.items()}
        lowering = lowering_report(plan, {n: (got[n], reasons[n]) for n in plan})
        lowering["schemes"] = {n: k for n, (k, _) in kinds.items()}
    else:
        module = spec.module.eval() if precision == "fp32" else half_with_float_io(spec.module)
        exported = torch.export.export(module, tuple(spec.example_inputs))
    names = json.dumps({"inputs": list(spec.input_names), "outputs": list(spec.output_names)})
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
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
            "quantizer": None if lowering is None else "torchao PT2E + XNNPACKQuantizer (per module name)",
            "calibration_inputs": None if lowering is None else len(calib or []),
            "lowering": lowering,
            "partitioner": "XnnpackPartitioner",
            "io_dtype": "float32",
            "io_names_method": IO_NAMES_METHOD,
            "fp16_kept_float32": [n for n, t in zip(spec.input_names, spec.example_inputs)
                                  if precision == "fp16" and t.dim() <= 1],
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
