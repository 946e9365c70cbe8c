"""ONNX for ONNX Runtime: ``torch.onnx.export(dynamo=True)``, opset 21 (else 18), static shapes.

One ``<component>.onnx`` file; weights are stored inside it unless the model is over protobuf's
2 GB limit, then next to it in ``<component>.onnx.data`` (details say which).

fp16 goes through ``onnxconverter-common``'s ``convert_float_to_float16(keep_io_types=True)``
(inputs and outputs stay float32) when it is installed, else through the copy of that converter
that onnxruntime ships (``onnxruntime.transformers.float16``); details name the one used. Unlike
Core ML and ExecuTorch, the timestep path is *not* kept in float32 here: both converters'
``node_block_list`` cast the blocked nodes' constants to fp16 and round-trip every value between
two blocked nodes through fp16, which measured worse (43 dB vs 60 dB output SQNR, tiny denoiser)
than converting everything. ONNX Runtime's CPU provider runs several fp16 ops through float32
casts, so CPU parity figures overstate what an fp16 GPU provider will see.

Quantized export (a ``plan``): the fp32 graph is quantized in QDQ form by ONNX Runtime's tools
(``targets.qdq``: int8 weights and activations via ``quantize_static``, int4 Linear weights via
``MatMulNBitsQuantizer``); its float layers stay float32, so a plan needs ``precision="fp32"``.
``details["lowering"]`` is read back from the quantized graph. ``runtime_py``'s runner uses
ORT_ENABLE_BASIC (NOTES.md records an opset-21 QDQ graph failing under EXTENDED); these graphs,
Q/DQ on the planned layers' inputs only, also ran under EXTENDED and ALL here, with the same output.

``export_model`` is shared with the TensorRT target, which prepares the same graph differently.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from targets import TARGETS, ComponentArtifact, check_export_args, lowering_report, plan_label, replace_into

NAME = "onnx"
FILE_SUFFIX = TARGETS[NAME].file_suffix
OPSET = 21
FALLBACK_OPSET = 18
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 64 * 2**20


def available() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's op library)
    except ImportError as exc:
        return f"ONNX export needs onnx and onnxscript ({exc})"
    return None


def export_model(spec, *, opset: int):
    """The component as an ``onnx.ModelProto`` with the spec's tensor names and static shapes."""
    import torch

    program = torch.onnx.export(
        spec.module.eval(),
        tuple(spec.example_inputs),
        dynamo=True,
        opset_version=opset,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        external_data=False,
        verbose=False,
    )
    model = program.model_proto
    check_static_io(model, source=spec.name)
    return model


def export_model_with_fallback(spec) -> tuple[object, int, str | None]:
    """(model, opset, why the preferred opset was not used or None)."""
    try:
        return export_model(spec, opset=OPSET), OPSET, None
    except Exception as exc:  # any exporter failure at 21: retry at 18 and say so in details
        reason = f"opset {OPSET} failed: {type(exc).__name__}: {str(exc)[:300]}"
    return export_model(spec, opset=FALLBACK_OPSET), FALLBACK_OPSET, reason


def check_static_io(model, *, source: str) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise ValueError(f"{source}: ONNX tensor {value.name!r} has a dynamic dimension; "
                             "targets export static shapes only")


def io_signature(model) -> dict:
    """{name: {"shape": [...], "dtype": "float32"}} of the graph inputs and outputs."""
    import onnx

    def entry(value):
        tt = value.type.tensor_type
        return {"shape": [d.dim_value for d in tt.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    return {"inputs": {v.name: entry(v) for v in model.graph.input},
            "outputs": {v.name: entry(v) for v in model.graph.output}}


def op_histogram(model) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def initializer_bytes(model) -> int:
    import numpy as np
    import onnx

    total = 0
    for init in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


def to_fp16(model) -> tuple[object, str]:
    """fp16 weights and compute, float32 graph inputs and outputs. Returns (model, converter)."""
    try:
        from onnxconverter_common import float16

        converter = "onnxconverter-common"
    except ImportError:
        try:  # the same converter, maintained inside onnxruntime (a project dependency)
            from onnxruntime.transformers import float16

            converter = "onnxruntime.transformers.float16"
        except ImportError as exc:
            raise ValueError(
                "onnx fp16 needs onnxconverter-common or onnxruntime's transformers tools, "
                f"neither imports here ({exc}); export fp32") from None
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    topological_sort(converted.graph)  # onnxruntime's copy appends the input casts at the end
    return converted, converter


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place: every node after the producers of its inputs."""
    available = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            names = [n.name for n in pending[:5]]
            raise ValueError(f"ONNX graph has a cycle or an undefined input near {names}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def save_model(model, path: Path) -> bool:
    """Save ``model`` to ``path``; weights go to ``<path>.data`` only above the 2 GB limit."""
    import onnx

    external = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return external


def export(spec, *, precision: str, plan: dict | None, calib: Path | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    if plan is not None and precision != "fp32":
        raise ValueError(f"{NAME} {spec.name}: the float layers of a quantized ONNX graph stay "
                         f"float32; export a plan with precision fp32 (got {precision})")
    import onnx

    model, opset, fallback = export_model_with_fallback(spec)
    converter = quantized = None
    if precision == "fp16":
        model, converter = to_fp16(model)
    if plan is not None:
        from targets import qdq

        planned = qdq.planned_nodes(model, plan)  # before anything drops the name scopes
        quantized = qdq.quantize_plan(model, spec, plan=plan, calib=calib, planned=planned,
                                        weight_only_int8=True, symmetric_activations=False)
        model = quantized.model
        opset = qdq.opset_of(model)

    name = f"{spec.name}{FILE_SUFFIX}"
    external: list[bool] = []

    def write(tmp: Path) -> None:
        external.append(save_model(model, tmp))
        onnx.checker.check_model(str(tmp))  # by path: works past the 2 GB limit too

    replace_into(Path(out_dir), write, name)
    applied = None if quantized is None else {n: p for n, (p, _) in quantized.applied.items()}
    return ComponentArtifact(
        component=spec.name,
        path=name,
        precision=precision if quantized is None else plan_label(applied),
        details={
            "opset": opset,
            "opset_fallback": fallback,
            "ir_version": int(model.ir_version),
            "onnx_version": onnx.__version__,
            "static_shapes": True,
            "external_data": f"{name}.data" if external[0] else None,
            "io": io_signature(model),
            "node_count": len(model.graph.node),
            "op_types": op_histogram(model),
            "fp16_converter": converter,
            "quantization": None if quantized is None else quantized.details,
            "lowering": None if quantized is None else lowering_report(plan, quantized.applied),
        },
    )
