"""Which planned layer is which ONNX node, and what ONNX Runtime and TensorRT can lower for it.

Steps 1 and 2 of ``targets.qdq``'s method: planned layers found through the exporter's name-scope
metadata (:func:`planned_nodes`) and tracked by output tensor, and the per-layer decision table
(:func:`lowering_intents`, the table in ``targets.qdq``'s module doc).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CALIBRATION_METHOD = "MinMax"  # NOTES.md: Entropy through quantize_static gives the same scales
INT4_BLOCK_SIZES = (128, 64)  # the only INT4 block sizes TensorRT takes; the larger when K allows
INT4_OPSET = 21  # INT4 and blocked DequantizeLinear
FLOAT = "fp32"  # what the float layers of a quantized graph run in (export precision fp32)
# Q/DQ on the inputs of the weighted ops only (TensorRT's recommended placement; the plan's
# "activations" are a layer's inputs): without OpTypesToExcludeOutputQuantization ORT also
# quantizes every Conv/Gemm output, the network's own output included.
QUANT_EXTRA_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       "DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": WEIGHTED_OPS}
# ONNX Runtime's integer kernels (``integer_kernels=True``): its CPU provider fuses a QDQ node unit
# DQ(x), DQ(w)[, DQ(b)] -> op -> Q into QLinearConv / QLinearMatMul / QGemm only when every input
# of the op is a DequantizeLinear (a bias too: INT32), the op's one output feeds Q nodes only, one
# Q per output, and it is not a graph output (onnxruntime qdq_selectors.cc, ConvNodeGroupSelector,
# GemmNodeGroupSelector, CheckQDQNodes). So: biases quantized (INT32, scale = input scale x weight
# scale), one shared Q per tensor (DedicatedQDQPair off; ORT duplicates the DQs per consumer at
# load), and a Q/DQ on the op's output, calibrated like its input (MinMax over the same set).
# ConvTranspose has no QDQ selector in the CPU provider: its output is left float.
NO_CPU_INTEGER_KERNEL = ("ConvTranspose",)
INTEGER_KERNEL_EXTRA_OPTIONS = {**QUANT_EXTRA_OPTIONS, "QuantizeBias": True, "DedicatedQDQPair": False,
                                "OpTypesToExcludeOutputQuantization": NO_CPU_INTEGER_KERNEL}

REASON_W8_WEIGHT_ONLY = ("W8A16: no INT8 weight-only kernel in ONNX Runtime (CPU QDQ) or TensorRT "
                         "(int8 conv/GEMM needs Q/DQ on both inputs; TensorRT documents weight-only "
                         "quantization for INT4 only); a weight-only DQ would be folded back to "
                         "float weights, so the layer is kept float")
REASON_INT4_WEIGHT_ONLY = "TensorRT's INT4 is weight-only: activations kept float"
REASON_W8_STORED = ("W8A16: int8 weights stored (weight-only DQ), activations float32; ONNX Runtime's "
                    "CPU provider folds the DQ into float weights at load (storage, not compute)")
REASON_INT16 = ("INT16 activations: TensorRT has no INT16 quantization and ONNX Runtime no int16 "
                "convolution kernel; activations kept float")
REASON_FLOAT_WEIGHTS = ("integer activations with float weights: integer conv/GEMM kernels need "
                        "integer weights too; kept float")
REASON_FLOAT32 = "the float layers of a quantized ONNX graph run in float32 (export precision fp32)"
REASON_INT4_CONV = "no INT4 convolution in ORT/TensorRT"


@dataclass(frozen=True)
class Intent:
    """What the quantizer is asked to do with one planned layer: ``kind`` is ``w8a8``, ``w4``
    (int4 weight-only) or ``float``; ``reason`` says why it differs from the request."""

    kind: str
    reason: str | None = None
    block_size: int | None = None


def quantization_modules():
    try:
        import onnx
        from onnxruntime import quantization
    except ImportError as exc:
        raise ValueError(f"quantized ONNX export needs onnx and onnxruntime ({exc}); "
                         "install onnxruntime or export without a plan") from None
    return onnx, quantization


def name_scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def planned_nodes(model, layers) -> dict[str, list]:
    """Layer FQN → its Conv/ConvTranspose/Gemm/MatMul nodes, from the exporter's name scopes.

    Call on the graph as exported (the metadata is lost by rewrites and by ``quant_pre_process``).
    """
    wanted = set(layers)
    found: dict[str, list] = {name: [] for name in layers}
    if not any(name_scopes(n) for n in model.graph.node):
        raise ValueError(f"the ONNX graph has no {NAME_SCOPES_KEY!r} metadata; export it with "
                         "torch.onnx.export(dynamo=True) to map plan layers to nodes")
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS:
            hits = [scope for scope in name_scopes(node) if scope in wanted]
            if hits:
                found[hits[-1]].append(node)
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise ValueError(f"no Conv/ConvTranspose/Gemm/MatMul node in the ONNX graph for the planned "
                         f"layers {missing[:5]}")
    return found


def tracked_outputs(model, planned: dict[str, list]) -> dict[str, str]:
    """Output tensor name → layer FQN in ``model``, whose planned nodes kept the names they had
    when :func:`planned_nodes` found them (rewrites such as TensorRT's conv1d_as_conv2d do).
    The ORT quantizers keep node outputs; MatMulNBitsQuantizer renames nodes but not outputs."""
    by_name: dict[str, object] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS:
            if not node.name or node.name in by_name:
                raise ValueError(f"weighted node names must be unique and non-empty; got {node.name!r}")
            by_name[node.name] = node
    tracked = {}
    for layer, nodes in planned.items():
        for node in nodes:
            if node.name not in by_name:
                raise RuntimeError(f"{layer}: its node {node.name!r} is gone from the graph")
            tracked[by_name[node.name].output[0]] = layer
    return tracked


def initializers_of(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def node_attr(node, name, default):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def linear_kn(node, initializers) -> tuple[int, int] | None:
    """(K, N) of a Gemm / MatMul whose weight is a constant 2-D initializer, else None."""
    if node.op_type not in ("Gemm", "MatMul") or node.input[1] not in initializers:
        return None
    dims = list(initializers[node.input[1]].dims)
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0:
            return None
        return (dims[1], dims[0]) if node_attr(node, "transB", 0) else (dims[0], dims[1])
    return dims[0], dims[1]


def _int4_block(nodes, initializers) -> tuple[int | None, str | None]:
    """(block size, None) when every node of a layer takes INT4 block weights, else (None, why)."""
    if any(n.op_type not in ("Gemm", "MatMul") for n in nodes):
        return None, REASON_INT4_CONV
    blocks = []
    for node in nodes:
        kn = linear_kn(node, initializers)
        if kn is None:
            return None, ("INT4 needs a MatMul/Gemm with a constant 2-D weight (TensorRT block "
                          "DequantizeLinear on weights only)")
        k, n = kn
        if n % 2:
            return None, f"N={n} is odd: TensorRT packs INT4 weights in pairs along the last dim"
        block = next((b for b in INT4_BLOCK_SIZES if k % b == 0), None)
        if block is None:
            return None, f"K={k} is not a multiple of 64 or 128, TensorRT's only INT4 block sizes"
        blocks.append(block)
    return min(blocks), None


def lowering_intents(plan: dict, planned: dict[str, list], model, *,
                     weight_only_int8: bool = False) -> dict[str, Intent]:
    """Per planned layer, what will be applied (see the module table) and why it differs."""
    initializers = initializers_of(model)
    intents = {}
    for name, want in plan.items():
        act_int8 = want.activations == "int8"
        notes = []
        if want.weights == "int8":
            kind, block = ("w8a8", None) if act_int8 else ("w8" if weight_only_int8 else "float", None)
            if not act_int8:
                notes.append(REASON_W8_STORED if weight_only_int8 else REASON_W8_WEIGHT_ONLY)
        elif want.weights == "int4":
            block, why = _int4_block(planned[name], initializers)
            if block is not None:
                kind = "w4"
                if want.activations != FLOAT:
                    notes.append(REASON_INT4_WEIGHT_ONLY)
            elif act_int8:
                kind = "w8a8"
                notes.append(f"{why}; int8 applied")
            else:
                kind = "float"
                notes.append(f"{why}, and no INT8 weight-only kernel either; kept float")
        else:
            kind, block = "float", None
            if act_int8:
                notes.append(REASON_FLOAT_WEIGHTS)
        if want.activations == "int16":
            notes.append(REASON_INT16)
        if "fp16" in (want.weights, want.activations):
            notes.append(REASON_FLOAT32)
        intents[name] = Intent(kind, "; ".join(notes) or None, block)
    return intents
