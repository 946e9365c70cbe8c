"""Quantized ONNX graphs from a per-layer plan, shared by the ``onnx`` and ``tensorrt`` targets.

The method (NOTES.md, "ONNX for ONNX Runtime and TensorRT"):

1. Every planned layer is found in the freshly exported float graph through the exporter's
   ``pkg.torch.onnx.name_scopes`` node metadata (module paths), before any rewrite drops that
   metadata (:func:`planned_nodes`); from then on a layer's node is tracked by its output tensor.
2. :func:`lowering_intents` decides per layer what these runtimes can lower, and why not (table).
3. W8A8 layers: ``onnxruntime.quantization.quantize_static`` in QDQ format: int8 weights,
   symmetric, per output channel; int8 activations, symmetric, per tensor (all zero points 0);
   biases float; MinMax calibration over ``calib``; only Conv/ConvTranspose/Gemm/MatMul nodes, and
   every such node that is not a W8A8 layer is in ``nodes_to_exclude``.
4. INT4 weights (Linear layers only): ``MatMulNBitsQuantizer`` in QDQ format writes
   ``DequantizeLinear(block_size=128 or 64, axis 0)`` over an INT4 [K, N] initialiser into a
   MatMul; its values are then rewritten symmetric with positive scales (amax / 7 per block,
   values in [-7, 7]; see :func:`positive_int4_scales`). A Linear exported as ``Gemm`` is first
   rewritten ``MatMul (+ Add)``. INT4 and blocked DequantizeLinear are opset 21: a graph below it
   is converted with ``onnx.version_converter``.
5. What was applied is read back from the quantized graph (:func:`applied_precisions`): a layer
   has int8/int4 weights when its weight input is a DequantizeLinear of an INT8/INT4 initialiser,
   integer activations when its data input is a DequantizeLinear. Never from the plan.

Per-layer decisions (requested weights/activations → what the graph gets):

=================================  ===========================  ===================================
requested                          applied                      why
=================================  ===========================  ===================================
int8 / int8                        int8 / int8 (QDQ)
int8 / fp16, fp32, int16 (W8A16)   fp32 / fp32                  no INT8 weight-only kernel: ORT's
                                                                CPU QDQ and TensorRT's explicit
                                                                quantization run an int8 conv/GEMM
                                                                only with Q/DQ on both inputs; a
                                                                weight-only DQ is folded back to
                                                                float weights (TensorRT documents
                                                                weight-only quantization for INT4)
int4 / any, Linear, K % 64 == 0    int4 (block DQ) / fp32       TensorRT's INT4 is weight-only
int4 / int8, convolution           int8 / int8                  no INT4 convolution in
                                                                ORT/TensorRT; int8 applied
int4 / float, convolution          fp32 / fp32                  ... and no INT8 weight-only kernel
fp32, fp16 / int8                  fp32 / fp32                  integer kernels need integer
                                                                weights too
fp16 anywhere                      fp32                         the float layers of a quantized
                                                                graph run in float32 here
=================================  ===========================  ===================================

For the ONNX Runtime target (``weight_only_int8=True``), W8A16 entries instead get int8
weight-only DQ: symmetric per-output-channel INT8 initialisers behind a DequantizeLinear, float
activations. ORT's CPU provider folds the DQ into float weights when it loads the graph, so this
buys storage (the bundle's bytes), not compute; the lowering report says so. TensorRT keeps the
table above.

INT16 activations are applied as float (TensorRT has no INT16 quantization; ORT has no int16
convolution kernel, so int16 QDQ would only simulate it).

The module holds the one call a target makes (:func:`quantize_plan`); the intents, the graph
passes and the read-back live in ``targets.qdq_intents``, ``targets.qdq_passes`` and
``targets.qdq_readback``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from targets.qdq_intents import (  # noqa: F401
    CALIBRATION_METHOD,
    FLOAT,
    INT4_BLOCK_SIZES,
    INT4_OPSET,
    initializers_of,
    lowering_intents,
    node_attr,
    planned_nodes,
    quantization_modules,
    tracked_outputs,
)
from targets.qdq_passes import (  # noqa: F401
    MIN_OUTPUT_QDQ_SQNR_DB,
    OUTPUT_SELECTION_FEEDS,
    _copy_model,
    gemm_as_matmul,
    nodes_by_output,
    opset_of,
    quantize_int4,
    quantize_w8a8,
    to_opset,
)
from targets.qdq_readback import applied_precisions, stray_dequantize_readers  # noqa: F401

# ---------------------------------------------------------------------------------------------
# One call for a target
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedGraph:
    model: object
    applied: dict  # FQN -> (LayerPrecision, reason or None), for targets.lowering_report
    details: dict  # JSON-serialisable: what was done, counted from the graph


def quantize_int8_weights(model, *, targets: list[str]) -> None:
    """In place: the weight of each node producing a ``targets`` output becomes a symmetric
    per-output-channel INT8 initialiser behind a DequantizeLinear (weight-only, float activations).
    Output-channel axis: 0 for Conv and Gemm(transB=1), 1 for ConvTranspose and MatMul [K, N]."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = initializers_of(model)
    by_output = nodes_by_output(model)
    new_nodes = []
    for output in targets:
        node = by_output[output]
        w_name = node.input[1]
        if w_name not in initializers:
            raise ValueError(f"{node.name}: weight {w_name!r} is not a constant; cannot store it as int8")
        w = numpy_helper.to_array(initializers[w_name]).astype(np.float32)
        if node.op_type == "Conv" or (node.op_type == "Gemm" and node_attr(node, "transB", 0)):
            axis = 0
        elif node.op_type in ("ConvTranspose", "MatMul") or node.op_type == "Gemm":
            axis = 1
        else:
            raise ValueError(f"{node.name}: {node.op_type} has no weight to store as int8")
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        base = f"{w_name}_w8"
        model.graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_quantized"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero_point")])
        dq_out = f"{base}_dequantized"
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale",
                                                               f"{base}_zero_point"], [dq_out],
                                          name=f"{base}_DequantizeLinear", axis=axis))
        node.input[1] = dq_out
        if not any(w_name in n.input for n in model.graph.node):
            model.graph.initializer.remove(initializers[w_name])
    if new_nodes:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(new_nodes + nodes)


def quantize_plan(model, spec, *, plan: dict, calib, planned: dict[str, list],
                  weight_only_int8: bool = False, symmetric_activations: bool = True,
                  integer_kernels: bool = False) -> QuantizedGraph:
    """Quantize ``model`` as ``plan`` asks, as far as ORT/TensorRT lower it (module table).

    ``planned`` comes from :func:`planned_nodes` on the graph as exported; ``model`` may have been
    rewritten since, as long as the planned nodes kept their names. ``integer_kernels``: the W8A8
    layers get the complete node unit ONNX Runtime fuses into integer kernels (INT32 bias, Q/DQ
    on the output too; :func:`targets.qdq_passes.quantize_w8a8`).
    """
    quantization_modules()
    tracked = tracked_outputs(model, planned)
    by_name = {n.name: n for n in model.graph.node}
    planned = {layer: [by_name[n.name] for n in nodes] for layer, nodes in planned.items()}
    intents = lowering_intents(plan, planned, model, weight_only_int8=weight_only_int8)
    model = _copy_model(model)
    int4_gemms = {n.name for layer, i in intents.items() if i.kind == "w4"
                  for n in planned[layer] if n.op_type == "Gemm"}
    for old, new in gemm_as_matmul(model, int4_gemms).items():
        tracked[new] = tracked.pop(old)

    opset_before = opset_of(model)
    w8a8 = [o for o, layer in tracked.items() if intents[layer].kind == "w8a8"]
    output_record: dict = {}
    int4 = {o: intents[layer].block_size for o, layer in tracked.items() if intents[layer].kind == "w4"}
    if w8a8:
        model = quantize_w8a8(model, targets=w8a8, input_names=spec.input_names,
                              examples=spec.example_inputs, calib=calib,
                              symmetric_activations=symmetric_activations,
                              integer_kernels=integer_kernels, output_record=output_record)
    if int4:
        model = quantize_int4(model, targets=int4)
    w8 = [o for o, layer in tracked.items() if intents[layer].kind == "w8"]
    if w8:
        quantize_int8_weights(model, targets=w8)

    stray = stray_dequantize_readers(model, tracked, outputs_quantized=integer_kernels)
    if stray:
        raise RuntimeError(f"{spec.name}: nodes outside the plan's layers read quantized values: "
                           f"{stray[:5]}")
    precisions, layer_detail = applied_precisions(model, plan, tracked)
    applied = {}
    for name, got in precisions.items():
        intent = intents[name]
        expected = {"w8a8": ("int8", "int8"), "w4": ("int4", FLOAT), "w8": ("int8", FLOAT),
                    "float": (FLOAT, FLOAT)}[intent.kind]
        why = intent.reason
        if (got.weights, got.activations) != expected:
            why = (f"intended {expected[0]}/{expected[1]} ({intent.kind}) but the graph has "
                   f"{got.weights}/{got.activations}" + (f"; {why}" if why else ""))
        applied[name] = (got, why)

    ops = Counter(n.op_type for n in model.graph.node)
    kinds = Counter((p.weights, p.activations) for p, _ in applied.values())
    from importlib.metadata import version

    details = {
        "method": "onnxruntime.quantization QDQ (quantize_static; MatMulNBitsQuantizer for int4)",
        "onnxruntime_version": version("onnxruntime"),
        "calibration": ({"method": CALIBRATION_METHOD, "samples": len(calib),
                         "activations": ("int8 symmetric" if symmetric_activations else
                                         "uint8 asymmetric") + " per tensor"} if w8a8 else None),
        "weights_int8": "symmetric per output channel" if w8a8 else None,
        "node_unit": (("DQ(x), DQ(w), DQ(b int32) -> op -> Q/DQ(y) where ORT has an integer kernel"
                       if integer_kernels else "DQ(x), DQ(w) -> op (bias and output float)")
                      if w8a8 else None),
        "weights_int4": ({"symmetric": True, "values": [-7, 7], "scale": "amax / 7 per block",
                          "block_axis": "K", "block_sizes": sorted(set(int4.values()))}
                         if int4 else None),
        "opset_before": opset_before,
        "opset": opset_of(model),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "layers_int8_weights": sum(1 for p, _ in applied.values() if p.weights == "int8"),
        "layers_int4_weights": sum(1 for p, _ in applied.values() if p.weights == "int4"),
        "layers_int8_activations": sum(1 for p, _ in applied.values() if p.activations == "int8"),
        "layers_float": kinds.get((FLOAT, FLOAT), 0),
        "nodes": layer_detail,
        "output_selection": ({"min_sqnr_db": MIN_OUTPUT_QDQ_SQNR_DB, "feeds": OUTPUT_SELECTION_FEEDS,
                              "against": "the same graph with Q/DQ on the layers' inputs only",
                              "nodes": output_record} if integer_kernels and w8a8 else None),
    }
    return QuantizedGraph(model=model, applied=applied, details=details)

