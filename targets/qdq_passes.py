"""The graph passes that write Q/DQ nodes: W8A8 through onnxruntime's ``quantize_static``, int8
weight-only DQ, INT4 blocks through ``MatMulNBitsQuantizer`` made symmetric, Gemm → MatMul, opsets."""

from __future__ import annotations

import tempfile
from pathlib import Path

from targets.qdq_intents import (
    CALIBRATION_METHOD,
    INT4_OPSET,
    INTEGER_KERNEL_EXTRA_OPTIONS,
    NO_CPU_INTEGER_KERNEL,
    QUANT_EXTRA_OPTIONS,
    WEIGHTED_OPS,
    initializers_of,
    linear_kn,
    node_attr,
    quantization_modules,
)

# Integer kernels (quantize_w8a8(integer_kernels=True)): an output Q/DQ is kept only while the
# component's output, on OUTPUT_SELECTION_FEEDS calibration inputs spread over the set, stays at or above this
# SQNR against the same graph with Q/DQ on the inputs only (the numerics the plan was searched for).
# Measured on the demo's w8a8 plan (runs/demo/plan.json, 13 W8A8 layers, ONNX host check): inputs
# only, 34.1 dB worst latent SNR, loudness 0.07 of the seed spread (pass); every output quantized,
# 21.2 dB and 0.38 (fail); outputs kept down to 41.5 dB per call (11 of 13), 21.0 dB and 0.40
# (fail): the per-call error compounds over the sampler's steps. Hence a strict limit.
MIN_OUTPUT_QDQ_SQNR_DB = 60.0
OUTPUT_SELECTION_FEEDS = 8

# ---------------------------------------------------------------------------------------------
# Graph passes
# ---------------------------------------------------------------------------------------------


def _copy_model(model):
    onnx, _ = quantization_modules()
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

    initializers = initializers_of(model)
    nodes, added, renamed = [], [], {}
    for node in model.graph.node:
        if node.name not in names or node.op_type != "Gemm":
            nodes.append(node)
            continue
        if linear_kn(node, initializers) is None:
            raise ValueError(f"{node.name}: only a Gemm with a constant weight, alpha = beta = 1 and "
                             "no transA becomes a MatMul")
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if node_attr(node, "transB", 0):
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


def nodes_by_output(model) -> dict[str, object]:
    return {o: node for node in model.graph.node for o in node.output}


def _names_of(model, outputs) -> list[str]:
    by_output = nodes_by_output(model)
    missing = [o for o in outputs if o not in by_output]
    if missing:
        raise RuntimeError(f"lost track of the planned nodes producing {missing[:5]}")
    return [by_output[o].name for o in outputs]


def quantize_w8a8(model, *, targets: list[str], input_names, examples, calib, symmetric_activations: bool = True,
                  integer_kernels: bool = False, output_record: dict | None = None):
    """``quantize_static`` (QDQ, see the module doc) of the nodes producing ``targets``; every
    other Conv/ConvTranspose/Gemm/MatMul node is excluded. Returns a new model.

    ``symmetric_activations`` (TensorRT's rule): int8 activations with zero point 0. Without it
    (ONNX Runtime), activations are asymmetric uint8 with a calibrated zero point (ORT's U8S8 CPU
    form), which keeps a full bit for one-sided inputs (after SiLU, Snake): on the demo's w8a8
    plan, symmetric activations gave 17.4 dB worst latent SNR where the asymmetric form gives more
    (see BENCHMARKS.md).

    ``integer_kernels`` (ONNX Runtime): the complete QDQ node unit that ORT's CPU provider fuses
    into integer kernels (``INTEGER_KERNEL_EXTRA_OPTIONS``): INT32 biases and a Q/DQ on the output
    of every planned op that has a CPU integer kernel, its scale from the same MinMax calibration
    over ``calib`` as the inputs'. The readers of that output (GroupNorm, residual Add) then read
    its 8-bit value: the fused op writes only that, and the plan's sensitivity (inputs only) did
    not price it. So outputs are quantized by measurement (:func:`select_quantized_outputs`):
    cheapest first, while the component's output on the calibration inputs stays within
    ``MIN_OUTPUT_QDQ_SQNR_DB`` of the inputs-only graph; ``output_record`` (filled in place) gets
    per node its output precision and that cost. A planned op whose output is a graph output
    keeps it float (ORT does not fuse it, and the network's output stays full precision)."""
    onnx, q = quantization_modules()
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
                           for k, v in {**(INTEGER_KERNEL_EXTRA_OPTIONS if integer_kernels
                                           else QUANT_EXTRA_OPTIONS),
                                        "ActivationSymmetric": symmetric_activations}.items()},
        )
        quantized = onnx.load(str(out))
    outputs_quantized = set()
    if integer_kernels:
        float_graph_outputs(quantized, names)
        calib = list(calib)
        spread = sorted({round(i * (len(calib) - 1) / max(OUTPUT_SELECTION_FEEDS - 1, 1))
                         for i in range(min(OUTPUT_SELECTION_FEEDS, len(calib)))})
        feeds = _CalibrationReader(list(input_names), examples, [calib[i] for i in spread])._feeds
        outputs_quantized, record = select_quantized_outputs(quantized, names, list(feeds))
        if output_record is not None:
            output_record.update(record)
    float_consumers_read_float(quantized, keep=names, quantized_outputs=outputs_quantized)
    return quantized


def _output_qdq_candidates(model, names: set[str]) -> set[str]:
    """Planned nodes with a CPU integer kernel whose one output feeds QuantizeLinear nodes only."""
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    return {n.name for n in model.graph.node
            if n.name in names and n.op_type not in NO_CPU_INTEGER_KERNEL
            and n.output[0] not in graph_outputs and readers.get(n.output[0])
            and all(r.op_type == "QuantizeLinear" for r in readers[n.output[0]])}


def _run_graph(model, feeds) -> list:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as runtime_py
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.concatenate([np.asarray(o, np.float64).ravel() for o in session.run(None, feed)])
            for feed in feeds]


def _sqnr_db(reference: list, test: list) -> float:
    import numpy as np

    signal = sum(float(np.sum(r ** 2)) for r in reference)
    noise = sum(float(np.sum((r - t) ** 2)) for r, t in zip(reference, test))
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def _output_quantizers(model, nodes: set[str]) -> dict[str, tuple]:
    """Per node of ``nodes``: (output tensor, scale, zero point, qmin, qmax) of the QuantizeLinear
    that reads its output."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node if n.name in nodes}
    out = {}
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in producers:
            continue
        node = producers[q.input[0]]
        if node.name in out:
            continue
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] in inits
                else np.zeros((), np.int8))
        info = np.iinfo(zero.dtype)
        out[node.name] = (q.input[0], scale, zero.astype(np.float64), info.min, info.max)
    return out


def _local_sqnr_db(model, quantizers: dict[str, tuple], feeds: list) -> dict[str, float]:
    """Each candidate output's own quantization SQNR (its tensor against its Q/DQ round trip) on
    ``feeds``, from one session that exposes every candidate's output."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    copy = _copy_model(model)
    known = {o.name for o in copy.graph.output}
    tensors = {name: spec[0] for name, spec in quantizers.items()}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                             for t in sorted(set(tensors.values()) - known))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    signal = dict.fromkeys(quantizers, 0.0)
    noise = dict.fromkeys(quantizers, 0.0)
    for feed in feeds:
        values = dict(zip(names, session.run(None, feed)))
        for node, (tensor, scale, zero, lo, hi) in quantizers.items():
            x = np.asarray(values[tensor], np.float64)
            shape = [1] * x.ndim
            if scale.ndim == 1 and x.ndim > 1:  # per-channel output scales sit on axis 1
                shape[1] = -1
            sc, zp = scale.reshape(shape) if scale.ndim else scale, zero.reshape(shape) if zero.ndim else zero
            xq = (np.clip(np.round(x / sc) + zp, lo, hi) - zp) * sc
            signal[node] += float(np.sum(x ** 2))
            noise[node] += float(np.sum((x - xq) ** 2))
    return {n: float("inf") if noise[n] == 0 else float(10 * np.log10(max(signal[n], 1e-300) / noise[n]))
            for n in quantizers}


def select_quantized_outputs(model, names: set[str], feeds: list) -> tuple[set[str], dict]:
    """Which planned nodes' outputs keep their Q/DQ (so ORT fuses them into an integer kernel),
    measured on ``feeds`` against the same graph with every such output read in float.

    Candidates are ranked by the quantization SQNR of their own output tensor (one session that
    exposes them all); then the longest cheapest-first prefix whose joint graph stays at or above
    ``MIN_OUTPUT_QDQ_SQNR_DB`` against the inputs-only graph is found by bisection, assuming that
    quantizing one more output never raises the joint SQNR: about log2(n) + 3 sessions instead of
    one per candidate and prefix (2n + 1), which on the Stable Audio Open VAE took minutes each.
    Returns (chosen node names, {node: {"output": "int8" | "fp32", "local_sqnr_db", ...}})."""
    candidates = _output_qdq_candidates(model, names)
    if not candidates:
        return set(), {}
    quantizers = _output_quantizers(model, candidates)
    local = _local_sqnr_db(model, quantizers, feeds)
    order = sorted(local, key=lambda n: (-local[n], n))

    def graph_with(outputs: set[str]):
        copy = _copy_model(model)
        float_consumers_read_float(copy, keep=names, quantized_outputs=outputs)
        return copy

    reference = _run_graph(graph_with(set()), feeds)
    joint: dict[int, float] = {0: float("inf")}

    def joint_at(k: int) -> float:
        if k not in joint:
            joint[k] = _sqnr_db(reference, _run_graph(graph_with(set(order[:k])), feeds))
        return joint[k]

    if joint_at(len(order)) >= MIN_OUTPUT_QDQ_SQNR_DB:
        best = len(order)
    else:
        good, bad = 0, len(order)  # joint_at(good) passes, joint_at(bad) fails
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if joint_at(mid) >= MIN_OUTPUT_QDQ_SQNR_DB else (good, mid)
        best = good
    record = {}
    for k, node in enumerate(order):
        entry = {"local_sqnr_db": round(local[node], 2)}
        if k < best:
            record[node] = {"output": "int8", **entry, "joint_sqnr_db": round(joint_at(best), 2)}
        else:
            record[node] = {"output": "fp32", **entry, "why": (
                f"quantizing the outputs up to this one (cheapest first) takes the component to "
                f"{joint_at(best + 1):.1f} dB SQNR against the inputs-only graph on the calibration inputs "
                f"(limit {MIN_OUTPUT_QDQ_SQNR_DB} dB); kept float, so ORT runs it as DequantizeLinear + fp32")}
    return set(order[:best]), record


def float_graph_outputs(model, nodes: set[str]) -> None:
    """In place: a graph output that ``quantize_static`` routed through Q/DQ after one of ``nodes``
    (it renames the node's output) is produced in float again by that node (ORT fuses no op whose output is a graph output, so
    the Q/DQ would only cost precision at the network's output)."""
    graph = model.graph
    producers = nodes_by_output(model)
    for output in graph.output:
        dq = producers.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producers:
            continue
        node = producers[q.input[0]]
        if node.name not in nodes:
            continue
        float_name = q.input[0]
        others = [n for n in graph.node if n is not q and float_name in n.input]
        if others:
            raise RuntimeError(f"{node.name}: its graph output {output.name!r} also feeds "
                               f"{[n.name for n in others][:3]}; cannot keep it float")
        graph.node.remove(dq)
        graph.node.remove(q)
        node.output[list(node.output).index(float_name)] = output.name


def float_consumers_read_float(model, *, keep: set[str], quantized_outputs: set[str] = frozenset()) -> int:
    """Rewire every node outside ``keep`` that reads a quantize-dequantized activation back to the
    float tensor, in place, and drop the Q/DQ pairs nobody reads any more. Returns how many inputs
    were rewired.

    ORT quantizes a tensor for all its consumers: with DedicatedQDQPair every consumer gets its own
    pair, float ones (GroupNorm, residual Add) included. The plan quantizes a layer's *input*, so
    the other readers of that tensor stay float (as ``calibration.fakequant`` simulates it).
    Measured on the tiny denoiser: the int8 GroupNorm input alone cost ~3 dB output SQNR.
    The output of a node in ``quantized_outputs`` is the exception: it is quantized for all its
    readers (an integer kernel writes only the 8-bit value).
    """
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    producers = nodes_by_output(model)
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
            source = producers.get(q.input[0])
            if source is not None and source.name in quantized_outputs:
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
    _, q = quantization_modules()
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = to_opset(model, INT4_OPSET)
    initializers = initializers_of(model)
    by_output = nodes_by_output(model)
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

    producers = nodes_by_output(model)
    initializers = initializers_of(model)
    for output, weight in weights.items():
        dq = producers[producers[output].input[1]]
        if dq.op_type != "DequantizeLinear" or int(node_attr(dq, "axis", 1)) != 0:
            raise RuntimeError(f"{output}: expected a DequantizeLinear over axis 0 from "
                               f"MatMulNBitsQuantizer, got {dq.op_type}")
        block = int(node_attr(dq, "block_size", 0))
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
