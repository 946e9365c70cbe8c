"""ExecuTorch with XNNPACK: ``torch.export`` → ``to_edge_transform_and_lower`` → ``.pte``.

What is lowered is recorded, not assumed (STYLE.md rule 6): ``details["delegation"]`` counts the
call_function ops inside the XNNPACK delegates and those left outside them (which run on
ExecuTorch's portable kernels, with layout copies between delegates), names the ones left outside,
and counts the delegates. A component that is not fully delegated still exports; the figures say so.

The program also carries a constant method ``io_names`` (a uint8 tensor holding the UTF-8 JSON
``{"inputs": [...], "outputs": [...]}``), so that a runner can map tensors to names without the
bundle manifest.

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


def export(spec, *, precision: str, plan: dict | None, calib: Path | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

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
        precision=precision,
        details={
            "executorch_version": _version("executorch"),
            "partitioner": "XnnpackPartitioner",
            "io_dtype": "float32",
            "io_names_method": IO_NAMES_METHOD,
            "fp16_kept_float32": [n for n, t in zip(spec.input_names, spec.example_inputs)
                                  if precision == "fp16" and t.dim() <= 1],
            "delegation": coverage,
        },
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
