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
"""

from __future__ import annotations

import ast
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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


def _imports():
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


def _initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def _attr(node, name, default):
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
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        return (dims[1], dims[0]) if _attr(node, "transB", 0) else (dims[0], dims[1])
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
    initializers = _initializers(model)
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


# ---------------------------------------------------------------------------------------------
# Graph passes
# ---------------------------------------------------------------------------------------------


def _copy_model(model):
    onnx, _ = _imports()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _replace_graph(model, nodes, new_initializers=()) -> None:
    """Swap in ``nodes`` (NodeProtos, copied) and drop initializers no node uses any more."""
    import onnx

    graph = model.graph
    new_nodes = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        new_nodes.append(copy)
    used = {i for n in new_nodes for i in n.input} | {o.name for o in graph.output}
    kept = []
    for init in [*graph.initializer, *new_initializers]:
        if init.name in used:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            kept.append(copy)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def gemm_as_matmul(model, names: set[str]) -> dict[str, str]:
    """Rewrite the named Gemm nodes (constant weight, alpha = beta = 1, no transA) as
    ``MatMul(A, W[K, N]) (+ Add(C))``, in place, so that ``MatMulNBitsQuantizer`` takes them. The
    MatMul keeps the Gemm's name. Returns {Gemm output: MatMul output}."""
    from onnx import helper, numpy_helper

    initializers = _initializers(model)
    nodes, added, renamed = [], [], {}
    for node in model.graph.node:
        if node.name not in names or node.op_type != "Gemm":
            nodes.append(node)
            continue
        if linear_kn(node, initializers) is None:
            raise ValueError(f"{node.name}: only a Gemm with a constant weight, alpha = beta = 1 and "
                             "no transA becomes a MatMul")
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if _attr(node, "transB", 0):
            weight = weight.T
        kn_name = f"{node.input[1]}__kn"
        added.append(numpy_helper.from_array(weight.copy(), kn_name))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{out}__matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], kn_name], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out],
                                          name=f"{node.name}__bias"))
        renamed[out] = mm_out
    if renamed:
        _replace_graph(model, nodes, added)
    return renamed


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over ``calib`` (tuples in the spec's input order)."""

    def __init__(self, input_names, examples, calib):
        import numpy as np

        feeds = []
        for index, row in enumerate(calib):
            if len(row) != len(input_names):
                raise ValueError(f"calibration input {index} has {len(row)} tensors; the component "
                                 f"takes {len(input_names)} ({', '.join(input_names)})")
            feed = {}
            for name, value, example in zip(input_names, row, examples):
                array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                if tuple(array.shape) != tuple(example.shape):
                    raise ValueError(f"calibration input {index}: {name!r} is {tuple(array.shape)}, "
                                     f"the component takes {tuple(example.shape)}")
                feed[name] = np.ascontiguousarray(array, dtype=np.float32)
            feeds.append(feed)
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def _nodes_by_output(model) -> dict[str, object]:
    return {o: node for node in model.graph.node for o in node.output}


def _names_of(model, outputs) -> list[str]:
    by_output = _nodes_by_output(model)
    missing = [o for o in outputs if o not in by_output]
    if missing:
        raise RuntimeError(f"lost track of the planned nodes producing {missing[:5]}")
    return [by_output[o].name for o in outputs]


def quantize_w8a8(model, *, targets: list[str], input_names, examples, calib, symmetric_activations: bool = True):
    """``quantize_static`` (QDQ, see the module doc) of the nodes producing ``targets``; every
    other Conv/ConvTranspose/Gemm/MatMul node is excluded. Returns a new model.

    ``symmetric_activations`` (TensorRT's rule): int8 activations with zero point 0. Without it
    (ONNX Runtime), activations are asymmetric uint8 with a calibrated zero point (ORT's U8S8 CPU
    form), which keeps a full bit for one-sided inputs (after SiLU, Snake): on the demo's w8a8
    plan, symmetric activations gave 17.4 dB worst latent SNR where the asymmetric form gives more
    (see BENCHMARKS.md)."""
    onnx, q = _imports()
    names = set(_names_of(model, targets))
    exclude = [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name not in names]
    unnamed = [n.op_type for n in model.graph.node if n.op_type in WEIGHTED_OPS and not n.name]
    if unnamed:
        raise ValueError(f"{len(unnamed)} weighted nodes have no name; quantization selects by name")
    reader = _CalibrationReader(list(input_names), examples, calib)
    with tempfile.TemporaryDirectory(prefix="adm-edge-qdq-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        q.quantize_static(
            _copy_model(model), out, reader,
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=list(WEIGHTED_OPS),
            per_channel=True,
            reduce_range=False,
            activation_type=q.QuantType.QInt8 if symmetric_activations else q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=getattr(q.CalibrationMethod, CALIBRATION_METHOD),
            extra_options={k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in {**QUANT_EXTRA_OPTIONS,
                                        "ActivationSymmetric": symmetric_activations}.items()},
        )
        quantized = onnx.load(str(out))
    float_consumers_read_float(quantized, keep=names)
    return quantized


def float_consumers_read_float(model, *, keep: set[str]) -> int:
    """Rewire every node outside ``keep`` that reads a quantize-dequantized activation back to the
    float tensor, in place, and drop the Q/DQ pairs nobody reads any more. Returns how many inputs
    were rewired.

    ORT quantizes a tensor for all its consumers: with DedicatedQDQPair every consumer gets its own
    pair, float ones (GroupNorm, residual Add) included. The plan quantizes a layer's *input*, so
    the other readers of that tensor stay float (as ``calibration.fakequant`` simulates it).
    Measured on the tiny denoiser: the int8 GroupNorm input alone cost ~3 dB output SQNR.
    """
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    producers = _nodes_by_output(model)
    rewired = 0
    for node in graph.node:
        if node.name in keep or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in constants:
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in constants:
                continue
            node.input[index] = q.input[0]
            rewired += 1
    outputs = {o.name for o in graph.output}
    while True:  # drop DQ, then Q, nodes whose outputs nobody reads
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewired


def quantize_int4(model, *, targets: dict[str, int]):
    """INT4 block weights (QDQ, symmetric) for the MatMul nodes producing the ``targets`` outputs
    ({output: block size}); every other MatMul is excluded. Returns a new model (opset 21)."""
    _, q = _imports()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnx import numpy_helper

    model = to_opset(model, INT4_OPSET)
    initializers = _initializers(model)
    by_output = _nodes_by_output(model)
    weights = {o: numpy_helper.to_array(initializers[by_output[o].input[1]]) for o in targets}
    by_block: dict[int, list[str]] = {}
    for output, block in targets.items():
        by_block.setdefault(block, []).append(output)
    for block, outputs in sorted(by_block.items()):
        names = _names_of(model, outputs)
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
        quantizer = MatMulNBitsQuantizer(
            _copy_model(model), bits=4, block_size=block, is_symmetric=True,
            quant_format=q.QuantFormat.QDQ, op_types_to_quantize=("MatMul",),
            nodes_to_include=names, nodes_to_exclude=others)
        quantizer.process()
        model = quantizer.model.model
    positive_int4_scales(model, weights)
    return model


def positive_int4_scales(model, weights: dict) -> None:
    """Rewrite, in place, the INT4 values and scales of the block DequantizeLinear feeding each
    MatMul output in ``weights`` ({output: float [K, N] weight}) as symmetric with positive
    scales: scale = amax / 7 per block, values in [-7, 7].

    MatMulNBitsQuantizer's symmetric mode maps each block's largest-magnitude value to -8, so half
    of its scales are negative; TensorRT's parser refuses them ("Scale coefficients must all be
    positive"), and negating cannot fix them (-(-8) does not fit in INT4).
    """
    import ml_dtypes
    import numpy as np
    from onnx import numpy_helper

    producers = _nodes_by_output(model)
    initializers = _initializers(model)
    for output, weight in weights.items():
        dq = producers[producers[output].input[1]]
        if dq.op_type != "DequantizeLinear" or int(_attr(dq, "axis", 1)) != 0:
            raise RuntimeError(f"{output}: expected a DequantizeLinear over axis 0 from "
                               f"MatMulNBitsQuantizer, got {dq.op_type}")
        block = int(_attr(dq, "block_size", 0))
        k, n = weight.shape
        blocks = weight.astype(np.float64).reshape(k // block, block, n)
        amax = np.abs(blocks).max(axis=1)
        scale = np.where(amax > 0, amax / 7.0, 1.0)
        values = np.clip(np.rint(blocks / scale[:, None, :]), -7, 7).reshape(k, n)
        old_q, old_scale = initializers[dq.input[0]], initializers[dq.input[1]]
        new_q = numpy_helper.from_array(values.astype(ml_dtypes.int4), old_q.name)
        new_scale = numpy_helper.from_array(scale.astype(np.float32), old_scale.name)
        if list(new_q.dims) != list(old_q.dims) or list(new_scale.dims) != list(old_scale.dims):
            raise RuntimeError(f"{output}: unexpected INT4 layout {list(old_q.dims)} / "
                               f"{list(old_scale.dims)} from MatMulNBitsQuantizer")
        old_q.CopyFrom(new_q)
        old_scale.CopyFrom(new_scale)


def opset_of(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def to_opset(model, opset: int):
    """``model`` converted to ``opset`` (onnx.version_converter) when below it; names are kept."""
    if (opset_of(model) or 0) >= opset:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, opset)


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
        block = _attr(dq, "block_size", 0)
        detail = {"axis": int(_attr(dq, "axis", 1)), "block_size": int(block) or None}
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


def applied_precisions(model, plan: dict, tracked: dict[str, str]):
    """Per planned layer, the LayerPrecision the graph actually has (read from its Q/DQ nodes),
    plus per-layer detail. ``tracked``: output tensor → layer, as after the last rewrite."""
    from calibration.precision import ACTIVATION_DTYPES, WEIGHT_DTYPES, LayerPrecision

    initializers = _initializers(model)
    producers = _nodes_by_output(model)
    missing = [o for o in tracked if o not in producers]
    if missing:
        raise RuntimeError(f"lost track of the planned nodes producing {missing[:5]}")
    states: dict[str, list] = {name: [] for name in plan}
    for output, layer in tracked.items():
        node = producers[output]
        weights, granularity, detail = _weight_state(node, initializers, producers)
        states[layer].append((weights, _activation_state(node, initializers, producers),
                              granularity, {"node": node.name, "op": node.op_type, **detail}))
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


def stray_dequantize_readers(model, tracked: dict[str, str]) -> list[str]:
    """Nodes other than the planned layers' own that read a DequantizeLinear output: quantization
    the plan did not ask for (should be none)."""
    producers = _nodes_by_output(model)
    planned = {producers[o].name for o in tracked if o in producers}
    out = []
    for node in model.graph.node:
        if node.name in planned or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
               for i in node.input):
            out.append(f"{node.name} ({node.op_type})")
    return out


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

    initializers = _initializers(model)
    by_output = _nodes_by_output(model)
    new_nodes = []
    for output in targets:
        node = by_output[output]
        w_name = node.input[1]
        if w_name not in initializers:
            raise ValueError(f"{node.name}: weight {w_name!r} is not a constant; cannot store it as int8")
        w = numpy_helper.to_array(initializers[w_name]).astype(np.float32)
        if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
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
                  weight_only_int8: bool = False, symmetric_activations: bool = True) -> QuantizedGraph:
    """Quantize ``model`` as ``plan`` asks, as far as ORT/TensorRT lower it (module table).

    ``planned`` comes from :func:`planned_nodes` on the graph as exported; ``model`` may have been
    rewritten since, as long as the planned nodes kept their names.
    """
    _imports()
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
    int4 = {o: intents[layer].block_size for o, layer in tracked.items() if intents[layer].kind == "w4"}
    if w8a8:
        model = quantize_w8a8(model, targets=w8a8, input_names=spec.input_names,
                              examples=spec.example_inputs, calib=calib,
                              symmetric_activations=symmetric_activations)
    if int4:
        model = quantize_int4(model, targets=int4)
    w8 = [o for o, layer in tracked.items() if intents[layer].kind == "w8"]
    if w8:
        quantize_int8_weights(model, targets=w8)

    stray = stray_dequantize_readers(model, tracked)
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
    }
    return QuantizedGraph(model=model, applied=applied, details=details)

