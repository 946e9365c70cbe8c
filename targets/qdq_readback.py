"""What a quantized ONNX graph really applies per layer, read from its Q/DQ nodes, never the plan."""

from __future__ import annotations

from targets.qdq_intents import FLOAT, initializers_of, node_attr
from targets.qdq_passes import nodes_by_output

# ---------------------------------------------------------------------------------------------
# Reading back what was applied
# ---------------------------------------------------------------------------------------------

# An asymmetric uint8 activation is the plan's "int8" activation (8 bits, calibrated range).
_INT_TYPES = {"INT8": "int8", "INT4": "int4", "INT16": "int16", "UINT8": "int8", "UINT4": "uint4",
              "UINT16": "uint16"}


def _tensor_type_name(data_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(data_type)


def dq_integer_type(dq, initializers, producers) -> str | None:
    """The integer type a DequantizeLinear reads ('INT8', 'INT4', ...), from its input initializer
    or, for an activation, from the zero point of the QuantizeLinear that feeds it."""
    source = dq.input[0]
    if source in initializers:
        return _tensor_type_name(initializers[source].data_type)
    if len(dq.input) > 2 and dq.input[2] in initializers:
        return _tensor_type_name(initializers[dq.input[2]].data_type)
    q = producers.get(source)
    if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in initializers:
        return _tensor_type_name(initializers[q.input[2]].data_type)
    return None


def _weight_state(node, initializers, producers) -> tuple[str, str | None, dict]:
    """(weights dtype as a plan names it, granularity, detail) of a weighted node's input 1."""
    import numpy as np

    weight = node.input[1]
    dq = producers.get(weight)
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in initializers:
        kind = _INT_TYPES.get(dq_integer_type(dq, initializers, producers) or "", "unknown")
        scale = initializers.get(dq.input[1])
        size = int(np.prod(scale.dims)) if scale is not None else 0
        block = node_attr(dq, "block_size", 0)
        detail = {"axis": int(node_attr(dq, "axis", 1)), "block_size": int(block) or None}
        return kind, ("per_tensor" if size == 1 else "per_channel"), detail
    if weight in initializers:
        dtype = _tensor_type_name(initializers[weight].data_type)
        return {"FLOAT": "fp32", "FLOAT16": "fp16"}.get(dtype, dtype.lower()), None, {}
    return "computed", None, {}


def _activation_state(node, initializers, producers) -> str:
    dq = producers.get(node.input[0])
    if dq is not None and dq.op_type == "DequantizeLinear":
        return _INT_TYPES.get(dq_integer_type(dq, initializers, producers) or "", "unknown")
    return FLOAT


def _output_state(node, model, initializers) -> str:
    """How a weighted node's output leaves it: quantized ('int8' for INT8/UINT8) when its readers
    are all QuantizeLinear nodes, else fp32."""
    readers = [n for n in model.graph.node if node.output[0] in n.input]
    if not readers or any(n.op_type != "QuantizeLinear" for n in readers):
        return FLOAT
    types = {_INT_TYPES.get(_tensor_type_name(initializers[n.input[2]].data_type), "unknown")
             if len(n.input) > 2 and n.input[2] in initializers else "unknown" for n in readers}
    return types.pop() if len(types) == 1 else "mixed"


def applied_precisions(model, plan: dict, tracked: dict[str, str]):
    """Per planned layer, the LayerPrecision the graph actually has (read from its Q/DQ nodes),
    plus per-layer detail. ``tracked``: output tensor → layer, as after the last rewrite."""
    from calibration.precision import ACTIVATION_DTYPES, WEIGHT_DTYPES, LayerPrecision

    initializers = initializers_of(model)
    producers = nodes_by_output(model)
    missing = [o for o in tracked if o not in producers]
    if missing:
        raise RuntimeError(f"lost track of the planned nodes producing {missing[:5]}")
    states: dict[str, list] = {name: [] for name in plan}
    for output, layer in tracked.items():
        node = producers[output]
        weights, granularity, detail = _weight_state(node, initializers, producers)
        states[layer].append((weights, _activation_state(node, initializers, producers),
                              granularity, {"node": node.name, "op": node.op_type, **detail,
                                            "output": _output_state(node, model, initializers)}))
    applied, details = {}, {}
    for name, rows in states.items():
        kinds = {(w, a) for w, a, _, _ in rows}
        if len(kinds) != 1:
            raise RuntimeError(f"{name}: its nodes were quantized differently {sorted(kinds)}")
        weights, activations = kinds.pop()
        if weights not in WEIGHT_DTYPES or activations not in ACTIVATION_DTYPES:
            raise RuntimeError(f"{name}: the graph has {weights} weights / {activations} activations, "
                               "which a plan cannot name")
        granularity = rows[0][2] or plan[name].granularity
        applied[name] = LayerPrecision(weights, activations, granularity)
        details[name] = [row[3] for row in rows]
    return applied, details


def output_quantized(dq, producers, planned: set[str]) -> bool:
    """Whether DequantizeLinear ``dq`` reads back the quantized output of a planned node."""
    q = producers.get(dq.input[0])
    source = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    return source is not None and source.name in planned


def stray_dequantize_readers(model, tracked: dict[str, str], *, outputs_quantized: bool = False) -> list[str]:
    """Nodes other than the planned layers' own that read a DequantizeLinear output: quantization
    the plan did not ask for (should be none). With ``outputs_quantized`` (ONNX Runtime's integer
    kernels), readers of a planned node's quantized output are expected."""
    producers = nodes_by_output(model)
    planned = {producers[o].name for o in tracked if o in producers}
    out = []
    for node in model.graph.node:
        if node.name in planned or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in node.input:
            dq = producers.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if not (outputs_quantized and output_quantized(dq, producers, planned)):
                out.append(f"{node.name} ({node.op_type})")
                break
    return out
