"""What TensorRT's ONNX parser and its explicit-quantization rules accept, checked on a saved graph.

:func:`tensorrt_problems` lists ops the parser does not take, opsets past its range and dynamic
shapes; :func:`qdq_problems` lists breaks of TensorRT's Q/DQ rules (symmetric, int8 per tensor
or per output channel on the right axis, int4 weight-only in blocks of 64 or 128). Export refuses
a graph with any problem.
"""

from __future__ import annotations

from targets.qdq import INT4_BLOCK_SIZES, INT4_OPSET  # TensorRT's INT4 blocks; INT4 from opset 21
from targets.tensorrt_graph import _conv_rank

MAX_PARSER_OPSET = 20  # TensorRT 10.0/10.1 ONNX parser: opsets 9..20
# Ops marked unsupported ("N") in onnx-tensorrt 10.1 docs/operators.md, plus GroupNormalization
# (see the module docstring).
TRT_UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "BlackmanWindow", "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder",
    "MatMulInteger", "MatMulNBits", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement",
    "QLinearConv", "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct",
    "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique", "GroupNormalization",
})
QUANTIZED_TYPES = ("INT8", "INT4")  # what TensorRT quantizes to, of the integer types



def _unparsable(node) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"{node.name}: custom-domain op {node.domain}::{node.op_type}"
    if node.op_type in TRT_UNSUPPORTED_OPS:
        return f"{node.name}: {node.op_type} is not parsed by TensorRT"
    return None


def _has_int4_weights(model) -> bool:
    from onnx import TensorProto

    int4 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT4}
    return any(n.op_type == "DequantizeLinear" and n.input[0] in int4 for n in model.graph.node)


def tensorrt_problems(model) -> list[str]:
    """What in ``model`` TensorRT's ONNX parser would refuse (empty when none is known)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    max_opset = INT4_OPSET if _has_int4_weights(model) else MAX_PARSER_OPSET
    if opset is None or not 9 <= opset <= max_opset:
        problems.append(f"opset {opset} outside TensorRT's parser range 9..{max_opset}")
    constants = {init.name for init in model.graph.initializer}
    constants.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    # A quantized weight is a DequantizeLinear of a constant (explicit quantization).
    constants.update(n.output[0] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in constants)
    for node in model.graph.node:
        if _unparsable(node):
            problems.append(_unparsable(node))
        elif node.op_type in ("Conv", "ConvTranspose") and node.input[1] not in constants:
            problems.append(f"{node.name}: {node.op_type} weight is not a constant")
        elif node.op_type in ("Squeeze", "Unsqueeze") and (
                len(node.input) < 2 or node.input[1] not in constants):
            problems.append(f"{node.name}: {node.op_type} axes are not a constant")
        elif node.op_type in ("Conv", "ConvTranspose"):
            rank = _conv_rank(node, {i.name: i for i in model.graph.initializer})
            if rank == 1:
                problems.append(f"{node.name}: 1-D {node.op_type} left after the rewrite")
    return problems


def _weight_axis(consumer, index: int, rank: int) -> int | None:
    """The output-channel axis TensorRT expects of a per-channel weight at ``consumer``'s input
    ``index``: 0 for Conv and Gemm with transB, 1 for ConvTranspose, Gemm without transB and a
    MatMul [K, N] weight (its last axis); None when it is not a weight input of these ops."""
    from onnx import helper

    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in consumer.attribute
                        if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return None


def qdq_problems(model) -> list[str]:
    """What in ``model``'s Q/DQ nodes TensorRT's explicit quantization would refuse (empty when
    none is known), and ops its parser cannot read (QLinearConv, MatMulNBits, custom domains):

    * zero points constant and all 0 (symmetric only), of type INT8 or INT4;
    * scales constant initializers, all positive;
    * INT8: per tensor, or per channel on a weight along its output-channel axis (0 for Conv and
      Gemm with transB, 1 for ConvTranspose and MatMul [K, N]); activations per tensor only;
    * INT4: weights only (a DequantizeLinear of a constant into a MatMul/Gemm weight whose data
      input is not quantized), block quantization with block size 64 or 128 along one of the last
      two axes, an even last dimension (two values per byte).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    def type_name(tensor) -> str:
        return TensorProto.DataType.Name(tensor.data_type)

    def attr(node, name, default):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    problems = []
    for node in graph.node:
        why = _unparsable(node)
        if why:
            problems.append(why)
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_dq = node.op_type == "DequantizeLinear"
        where = f"{node.name or node.output[0]} ({node.op_type})"
        data = node.input[0]
        is_weight = data in constants
        # The integer type: a DQ's constant input, else the zero point, else output_dtype / INT8.
        qtype = None
        if is_dq and is_weight:
            qtype = type_name(constants[data])
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is not None:
            if zero_point not in constants:
                problems.append(f"{where}: zero point {zero_point!r} is not a constant")
            else:
                zp = constants[zero_point]
                qtype = qtype or type_name(zp)
                if np.any(numpy_helper.to_array(zp).astype(np.int64) != 0):
                    problems.append(f"{where}: nonzero zero point (TensorRT quantization is "
                                    "symmetric: zero points must be 0)")
        if qtype is None and is_dq and data in producers and producers[data].op_type == "QuantizeLinear":
            q = producers[data]
            if len(q.input) > 2 and q.input[2] in constants:
                qtype = type_name(constants[q.input[2]])
        if qtype is None:
            out_dtype = attr(node, "output_dtype", 0)
            qtype = TensorProto.DataType.Name(out_dtype) if out_dtype else "INT8"
        if qtype not in QUANTIZED_TYPES:
            problems.append(f"{where}: {qtype} quantization; TensorRT quantizes to INT8 or INT4 only")
            continue

        scale_name = node.input[1]
        if scale_name not in constants:
            problems.append(f"{where}: scale {scale_name!r} is not a constant initializer "
                            "(TensorRT takes build-time scales)")
            continue
        scale = numpy_helper.to_array(constants[scale_name])
        if not np.all(scale > 0):
            problems.append(f"{where}: scales must all be positive")
        data_dims = (list(constants[data].dims) if is_weight else None)

        # Whose weight is it? DQ: its consumers; Q of a constant: the DQ after it, then those.
        out = node.output[0]
        users = consumers.get(out, [])
        if not is_dq and users and all(u.op_type == "DequantizeLinear" for u, _ in users):
            users = [c for u, _ in users for c in consumers.get(u.output[0], [])]

        if qtype == "INT4":
            if not (is_dq and is_weight):
                problems.append(f"{where}: INT4 on an activation; TensorRT's INT4 is weight-only")
                continue
            for user, index in users:
                if user.op_type not in ("MatMul", "Gemm") or index != 1:
                    problems.append(f"{where}: INT4 weights feed {user.op_type} input {index}; "
                                    "TensorRT takes INT4 block weights into MatMul/Gemm only")
                elif user.input[0] in producers and producers[user.input[0]].op_type == "DequantizeLinear":
                    problems.append(f"{where}: INT4 weights with quantized activations at "
                                    f"{user.name}; TensorRT's INT4 is weight-only")
            if data_dims and data_dims[-1] % 2:
                problems.append(f"{where}: INT4 weight with an odd last dimension {data_dims[-1]}")
            if scale.ndim != len(data_dims or []) or scale.size == 1:
                problems.append(f"{where}: INT4 needs block quantization (block size 64 or 128), "
                                f"got scales of shape {list(scale.shape)}")
                continue
        if scale.size == 1:
            continue  # per tensor
        if not is_weight:
            problems.append(f"{where}: per-axis scales on an activation; TensorRT takes per-tensor "
                            "activation scales")
            continue
        rank = len(data_dims)
        if scale.ndim == 1:  # per channel
            axis = int(attr(node, "axis", 1))
            axis = axis + rank if axis < 0 else axis
            if not 0 <= axis < rank or data_dims[axis] != scale.size:
                problems.append(f"{where}: {scale.size} scales along axis {axis} of a weight "
                                f"shaped {data_dims}")
                continue
            for user, index in users:
                expected = _weight_axis(user, index, rank)
                if expected is None:
                    problems.append(f"{where}: per-channel weights feed {user.op_type} input "
                                    f"{index}; TensorRT expects them at a Conv/ConvTranspose/"
                                    "Gemm/MatMul weight")
                elif axis != expected:
                    problems.append(f"{where}: per-channel axis {axis}, but {user.op_type} "
                                    f"{user.name}'s output channels are axis {expected}")
        elif scale.ndim == rank:  # blocks
            if qtype != "INT4":
                problems.append(f"{where}: {qtype} block quantization; TensorRT takes INT8 per "
                                "tensor or per channel")
                continue
            blocked = [d for d in range(rank) if scale.shape[d] != data_dims[d]]
            if len(blocked) != 1:
                problems.append(f"{where}: scales {list(scale.shape)} block {len(blocked)} axes of "
                                f"{data_dims}; TensorRT blocks exactly one")
                continue
            axis = blocked[0]
            block = data_dims[axis] // scale.shape[axis] if data_dims[axis] % scale.shape[axis] == 0 else None
            declared = int(attr(node, "block_size", 0)) or block
            if axis < rank - 2:
                problems.append(f"{where}: INT4 blocks along axis {axis}; TensorRT blocks one of "
                                "the last two axes")
            if block is None or declared != block or block not in INT4_BLOCK_SIZES:
                problems.append(f"{where}: INT4 block size {declared} over {data_dims[axis]} "
                                f"values; TensorRT takes block sizes {INT4_BLOCK_SIZES} only")
        else:
            problems.append(f"{where}: scales of rank {scale.ndim} for a weight of rank {rank}")
    return problems
