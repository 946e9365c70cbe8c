"""Core ML: ``torch.export`` → ``run_decompositions({})`` → ``ct.convert`` → ``.mlpackage``.

Converts and saves on Linux; prediction needs macOS (``runtime_py.runners``). The deployment target
is iOS 18 / macOS 15 (needed by per-block int4 weight compression later). Inputs and outputs are
float32 for both precisions, so a device feeds the same arrays as every other target.

fp16 (``compute_precision`` float16): every op runs in fp16 except those computed from rank-1
inputs and constants alone: the timestep path (sinusoidal embedding of t · 1000, the time MLP,
FiLM projections, √ᾱ_t). In fp16 the embedding's arguments round by up to 0.5 rad at t ≈ 1,
which alone drops the embedding to ~25 dB SQNR; kept in fp32 it costs a few (B, d) ops.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from targets import ComponentArtifact, check_export_args, replace_into

NAME = "coreml"
FILE_SUFFIX = ".mlpackage"
DEPLOYMENT_TARGET = "iOS18"  # ct.target.iOS18 == macOS15


def available() -> str | None:
    try:
        import coremltools  # noqa: F401
    except ImportError as exc:
        return f"coremltools is not installed ({exc})"
    return None


def _input_vars(op):
    for value in op.inputs.values():
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def rank1_island_selector(rank1_inputs: set[str]):
    """An ``FP16ComputePrecision`` op selector: True (cast to fp16) unless every input of the op
    derives from ``rank1_inputs`` and constants only. Also returns the list of ops kept fp32."""
    derived: dict[int, tuple[object, bool]] = {}  # id(var) -> (var, derives from rank-1 only)
    kept: list[str] = []

    def from_rank1(var) -> bool:
        stack = [var]
        while stack:
            top = stack[-1]
            if id(top) in derived:
                stack.pop()
                continue
            op = top.op
            if op is None:  # a function input
                derived[id(top)] = (top, top.name in rank1_inputs)
            elif op.op_type == "const":
                derived[id(top)] = (top, True)
            else:
                inputs = list(_input_vars(op))
                pending = [v for v in inputs if id(v) not in derived]
                if pending:
                    stack.extend(pending)
                    continue
                derived[id(top)] = (top, all(derived[id(v)][1] for v in inputs))
            stack.pop()
        return derived[id(var)][1]

    def selector(op) -> bool:
        inputs = list(_input_vars(op))
        island = bool(inputs) and all(from_rank1(v) for v in inputs) and any(
            v.op is None or v.op.op_type != "const" for v in inputs)
        if island:
            kept.append(op.op_type)
        return not island

    return selector, kept


def mil_op_histogram(mlmodel) -> dict[str, int]:
    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        return {}
    counts: Counter[str] = Counter()

    def visit(block):
        for op in block.operations:
            counts[op.op_type] += 1
            for inner in op.blocks:
                visit(inner)

    for function in program.functions.values():
        visit(function)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def export(spec, *, precision: str, plan: dict | None, calib: Path | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    import coremltools as ct
    import numpy as np
    import torch

    exported = torch.export.export(spec.module.eval(), tuple(spec.example_inputs))
    exported = exported.run_decompositions({})  # ct.convert refuses the training dialect
    placeholders = [s.arg.name for s in exported.graph_signature.input_specs
                    if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if placeholders != list(spec.input_names):
        # ct.convert names inputs after the exported placeholders; a mismatch would silently
        # rename what the manifest promises.
        raise ValueError(f"{spec.name}: forward arguments are named {placeholders}, the spec "
                         f"says {list(spec.input_names)}; rename one to match")
    kept: list[str] = []
    if precision == "fp32":
        compute_precision = ct.precision.FLOAT32
    else:
        rank1 = {n for n, t in zip(spec.input_names, spec.example_inputs) if t.dim() <= 1}
        selector, kept = rank1_island_selector(rank1)
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=selector)
    mlmodel = ct.convert(
        exported,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_precision=compute_precision,
        inputs=[ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32)
                for n, t in zip(spec.input_names, spec.example_inputs)],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in spec.output_names],
        skip_model_load=True,  # loading compiles the model, which only macOS can do
    )
    described = [o.name for o in mlmodel.get_spec().description.output]
    if described != list(spec.output_names):
        raise ValueError(f"{spec.name}: Core ML outputs are {described}, expected "
                         f"{list(spec.output_names)}")

    name = f"{spec.name}{FILE_SUFFIX}"
    replace_into(Path(out_dir), lambda tmp: mlmodel.save(str(tmp)), name)
    ops = mil_op_histogram(mlmodel)
    return ComponentArtifact(
        component=spec.name,
        path=name,
        precision=precision,
        details={
            "coremltools_version": ct.__version__,
            "convert_to": "mlprogram",
            "deployment_target": f"{DEPLOYMENT_TARGET} (macOS15)",
            "compute_precision": "float32" if precision == "fp32" else "float16",
            "io_dtype": "float32",
            "fp16_kept_float32_ops": len(kept),
            "op_count": sum(c for op, c in ops.items() if op != "const"),
            "op_types": {op: c for op, c in ops.items() if op != "const"},
        },
    )
