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


# --- GPTQ rounding (calibration.gptq): begin ----------------------------------------------------


def apply_rounding(model, plan, quantized) -> dict[str, str]:
    """Write the plan's chosen integers and scales (``plan.rounding``, a GPTQ plan's) into the weight
    DequantizeLinear initialisers of the quantized graph, in place; returns {FQN: width applied}.

    ``quantized`` is :func:`targets.qdq.quantize_plan`'s result (its per-layer node names and what
    it applied). The width is read from the initialiser (INT8 or INT4), so a layer the graph holds
    at int8 where the plan asked int4 (no INT4 convolution) gets the plan's int8 rounding. Layouts:
    Conv (out, in, k) and ConvTranspose (in, out, k) as the module's weight; Gemm(transB) (out, in);
    MatMul [K, N] transposed; INT4 blocks along K take the per-channel scale in every block (or a
    per-group rounding whose group is the block). Anything that does not fit is an error, never a
    re-rounding. RTN plans (no ``rounding``) are left as quantized.
    """
    rounding = getattr(plan, "rounding", None)
    if not rounding:
        return {}
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from calibration.gptq import rounding_for

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    applied: dict[str, str] = {}
    for layer, rows in quantized.details["nodes"].items():
        if layer not in rounding or quantized.applied[layer][0].weights not in ("int8", "int4"):
            continue
        for row in rows:
            node = by_name[row["node"]]
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                raise RuntimeError(f"{NAME}: {layer} has integer weights but no weight DequantizeLinear")
            q_init, s_init = inits[dq.input[0]], inits[dq.input[1]]
            width = {"INT8": "int8", "INT4": "int4"}.get(TensorProto.DataType.Name(q_init.data_type))
            if width is None:
                raise RuntimeError(f"{NAME}: {layer}: weight integers of type "
                                   f"{TensorProto.DataType.Name(q_init.data_type)}; the rounding is int8/int4")
            chosen = rounding_for(rounding, layer, width, target=NAME)
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            block = int(attrs.get("block_size", 0))
            dims, s_dims = list(q_init.dims), list(s_init.dims)
            q, scale = chosen.q.numpy(), chosen.scale.numpy()
            if list(q.shape) != dims and q.ndim == 2 and list(q.T.shape) == dims:
                q = q.T  # MatMul [K, N]
            elif list(q.shape) != dims and dims == [*q.shape, 1]:
                q = q.reshape(dims)  # a 1-D convolution rewritten as 2-D with a (k×1) kernel (TensorRT)
            if list(q.shape) != dims:
                raise RuntimeError(f"{NAME}: {layer}: rounding {list(chosen.q.shape)} does not fit the "
                                   f"initialiser {dims}")
            if block:
                k = dims[0]
                if chosen.group_size is None:
                    scale = np.repeat(scale[None, :], k // block, axis=0)
                elif chosen.group_size == block:
                    scale = scale.T
                else:
                    raise ValueError(f"{NAME}: {layer}: int4 blocks of {block} here, rounding groups of "
                                     f"{chosen.group_size}; plan with --gptq-group-size {block} or unset")
            elif chosen.group_size is not None:
                raise ValueError(f"{NAME}: {layer}: a per-group rounding on a per-channel DequantizeLinear")
            if list(scale.shape) != s_dims:
                raise RuntimeError(f"{NAME}: {layer}: rounding scales {list(scale.shape)} do not fit {s_dims}")
            old_scale = numpy_helper.to_array(s_init).astype(np.float64)
            q_init.CopyFrom(numpy_helper.from_array(
                q.astype(np.int8 if width == "int8" else ml_dtypes.int4), q_init.name))
            s_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(scale, np.float32), s_init.name))
            rescale_int32_bias(node, producers, inits, old_scale, scale)
            applied[layer] = width
    missing = [n for n in rounding if n in quantized.applied
               and quantized.applied[n][0].weights in ("int8", "int4") and n not in applied]
    if missing:
        raise RuntimeError(f"{NAME}: rounded layers {missing[:5]} were not found in the quantized graph")
    return applied


def rescale_int32_bias(node, producers, inits, old_weight_scale, new_weight_scale) -> None:
    """An INT32 bias (ONNX Runtime's integer-kernel node unit) is quantized at input scale x weight
    scale, and the fused kernel reads its integers with the scales of x and w; when the weight
    scales change (a GPTQ rounding), its integers and scale follow, in place. The bias value is
    kept to within half a step of the old scale (one accumulator unit)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return
    dq = producers.get(node.input[2])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return
    b_init, b_scale_init = inits[dq.input[0]], inits[dq.input[1]]
    if b_init.data_type != TensorProto.INT32:
        return
    b_scale = numpy_helper.to_array(b_scale_init).astype(np.float64)
    ratio = np.asarray(new_weight_scale, np.float64).reshape(-1) / old_weight_scale.reshape(-1)
    if ratio.size != b_scale.size and ratio.size != 1:
        raise RuntimeError(f"{NAME}: {node.name}: {ratio.size} weight scales for a bias of {b_scale.size}")
    bias = numpy_helper.to_array(b_init).astype(np.float64) * b_scale
    new_scale = b_scale * ratio
    ints = np.clip(np.rint(bias / new_scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    b_init.CopyFrom(numpy_helper.from_array(ints.astype(np.int32), b_init.name))
    b_scale_init.CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), b_scale_init.name))


# --- GPTQ rounding: end -------------------------------------------------------------------------


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
                                        weight_only_int8=True, symmetric_activations=False,
                                        integer_kernels=True)
        model = quantized.model
        opset = qdq.opset_of(model)
        rounded = apply_rounding(model, plan, quantized)  # GPTQ plans: the plan's integers
        quantized.details["rounding"] = ({"method": "gptq", "layers": rounded} if rounded
                                         else {"method": "rtn"})
        from targets.onnx_kernels import kernel_report

        feeds = {n: t.detach().cpu().numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
        quantized.details["ort_kernels"] = kernel_report(model, quantized, feeds=feeds)

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
