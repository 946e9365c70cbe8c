"""TensorRT: the component's ONNX graph prepared for TensorRT's ONNX parser, plus an engine builder.

What is written per component: ``<name>.onnx`` (always; this works on any host) and, when
``tensorrt`` imports and a CUDA GPU is present, ``<name>.plan`` (the serialized engine). Once per
bundle, ``write_build_script`` writes ``build_engines.py``, which builds every ``.plan`` on a GPU
machine with the TensorRT Python API (``--fp16/--no-fp16``). Engines are specific to a GPU and
TensorRT version, so a bundle for other machines ships the ONNX files and the script.

How the graph is prepared (each choice is checked on the saved file, see ``tensorrt_problems``):

* Opset 18. TensorRT 10.0/10.1's parser takes opsets 9–20 (onnx-tensorrt ``docs/operators.md``);
  18 is the lowest opset the dynamo exporter emits correctly (at 17 it still writes opset-18
  ``Split(num_outputs)``).
* GroupNorm as ``Reshape → InstanceNormalization → Reshape → Mul → Add``: the exporter writes
  that form below opset 21. ``GroupNormalization`` is avoided on purpose: opset 18 defines its
  scale per group, opset 21 per channel, and TensorRT's importer (``normalizationHelper``) passes
  the scale straight to ``INormalizationLayer``, so which one a TensorRT version honours is
  unverified.
* Conv1d / ConvTranspose1d rewritten as 2-D convolutions with a (k×1) kernel between
  ``Unsqueeze(axis 3)`` and ``Squeeze(axis 3)``. NOTES.md marks it unverified whether TensorRT
  takes Conv1d; reading onnx-tensorrt 10.1's ``Conv`` importer, it does the same unsqueeze itself
  (to a k×1 kernel), so the rewrite is the form the parser would build anyway, made explicit for
  parsers that take 2-D/3-D convolutions only (TensorRT 8's documented restriction). Its parity
  with the 1-D graph is checked in ONNX Runtime by the tests.
* Static shapes, constant convolution weights and constant Squeeze/Unsqueeze axes.

Precision: the ONNX file stays float32 for both precisions; ``fp16`` is TensorRT's
``BuilderFlag.FP16`` (TensorRT picks fp16 kernels where faster), applied when the engine is built.

Quantized graphs (a ``plan``): the prepared opset-18 graph (after the Conv1d rewrite, so weight
scales sit on the 4-D kernels) is quantized by ``targets.qdq`` in QDQ form, the explicit
quantization TensorRT takes: int8 symmetric weights per output channel and int8 per-tensor
activations on the inputs of the W8A8 layers; int4 weight-only blocks (64 or 128) for Linear layers
asking int4. A graph with INT4 weights is converted to opset 21 (INT4 and blocked
DequantizeLinear exist from 21 on); onnx-tensorrt 10.0/10.1's ``ModelImporter`` enforces only a
minimum opset and reads block quantization from the scale shape, and later parsers document
opsets past 21, but no engine was built from it here (no GPU). An int8-only graph stays at 18.
:func:`qdq_problems` checks TensorRT's explicit-quantization rules on the saved graph, and export
refuses a graph that breaks them. Engines of Q/DQ graphs are built strongly typed (TensorRT's
documented path for explicit quantization; TensorRT 11 removes ``BuilderFlag.INT8``/``FP16``), so
the float layers run in the ONNX graph's float32 and a plan needs ``precision="fp32"``; a
TensorRT without strong typing (8.x) gets ``BuilderFlag.INT8`` instead.
"""

from __future__ import annotations

import inspect
import pprint
from collections.abc import Sequence
from pathlib import Path

from targets import TARGETS, ComponentArtifact, check_export_args, lowering_report, plan_label, replace_into

NAME = "tensorrt"
FILE_SUFFIX = TARGETS[NAME].file_suffix
ENGINE_SUFFIX = ".plan"
BUILD_SCRIPT = "build_engines.py"
OPSET = 18
MAX_PARSER_OPSET = 20  # TensorRT 10.0/10.1 ONNX parser: opsets 9..20
WORKSPACE_GIB = 4.0
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
_AXES_3 = "trt_axes_3"  # int64 [3]: the axis added to make 1-D convolutions 2-D
INT4_BLOCK_SIZES = (64, 128)  # TensorRT's INT4 block quantization: these block sizes only
INT4_OPSET = 21  # INT4 / blocked DequantizeLinear (see the module docstring)
QUANTIZED_TYPES = ("INT8", "INT4")  # what TensorRT quantizes to, of the integer types


def available() -> str | None:
    """None when the ONNX half of this target exports here (engines: ``engine_available``)."""
    from targets import onnx as onnx_target

    return onnx_target.available()


def engine_available() -> str | None:
    """None when a TensorRT engine can be built on this host, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt is not installed ({exc})"
    from runtime_py.runners import cuda_unavailable

    return cuda_unavailable()


# ---------------------------------------------------------------------------------------------
# Graph preparation
# ---------------------------------------------------------------------------------------------


def _conv_rank(node, initializers: dict) -> int | None:
    """Spatial rank of a Conv/ConvTranspose node, from its weight or its kernel_shape."""
    from onnx import helper

    if node.input[1] in initializers:
        return len(initializers[node.input[1]].dims) - 2
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return len(helper.get_attribute_value(attr))
    return None


def _attrs_2d(node) -> dict:
    """The node's attributes with a trailing spatial dimension of size 1 added."""
    from onnx import helper

    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name in ("kernel_shape", "strides", "dilations", "output_shape"):
            value = [*value, 1]
        elif attr.name == "output_padding":
            value = [*value, 0]
        elif attr.name == "pads":  # [x1_begin, x1_end] -> [x1_begin, x2_begin, x1_end, x2_end]
            value = [value[0], 0, value[1], 0]
        attrs[attr.name] = value
    return attrs


def _copy(message, cls):
    copy = cls()
    copy.CopyFrom(message)
    return copy


def conv1d_as_conv2d(model):
    """Rewrite every 1-D Conv/ConvTranspose as 2-D with a (k×1) kernel. Returns (model, n)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    weights_2d: dict[str, str] = {}
    nodes = []
    rewritten = 0
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose") or _conv_rank(node, initializers) != 1:
            nodes.append(node)
            continue
        if node.input[1] not in initializers:
            raise ValueError(f"{node.name}: a 1-D convolution with a computed weight; TensorRT "
                             "needs constant weights (fold the weight before export)")
        tag = node.name or f"conv_{index}"
        x, w, *rest = node.input
        if w not in weights_2d:
            array = numpy_helper.to_array(initializers[w])
            weights_2d[w] = f"{w}__k1"
            graph.initializer.append(numpy_helper.from_array(array[..., None], weights_2d[w]))
        x4, y4 = f"{tag}__in4d", f"{tag}__out4d"
        nodes.append(helper.make_node("Unsqueeze", [x, _AXES_3], [x4], name=f"{tag}__unsqueeze"))
        nodes.append(helper.make_node(node.op_type, [x4, weights_2d[w], *rest], [y4], name=tag,
                                      domain=node.domain, **_attrs_2d(node)))
        nodes.append(helper.make_node("Squeeze", [y4, _AXES_3], list(node.output[:1]),
                                      name=f"{tag}__squeeze"))
        rewritten += 1
    if rewritten:
        import numpy as np

        graph.initializer.append(numpy_helper.from_array(np.array([3], dtype=np.int64), _AXES_3))
        used = {i for n in nodes for i in n.input}
        # Copy before clearing the repeated fields: their elements are views into the graph.
        new_nodes = [_copy(n, onnx.NodeProto) for n in nodes]
        kept = [_copy(i, onnx.TensorProto) for i in graph.initializer if i.name in used]
        del graph.node[:]
        graph.node.extend(new_nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model, rewritten


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


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def build_engine(onnx_path, plan_path, *, fp16, qdq=False, workspace_gib=4.0):
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write the serialized engine to
    ``plan_path`` (via a temporary file). Needs ``tensorrt`` and a CUDA GPU.

    ``qdq``: the graph carries Q/DQ nodes (explicit quantization). It is built as a strongly typed
    network, without precision flags, as TensorRT documents for Q/DQ networks (TensorRT 11 removes
    the INT8/FP16 builder flags); a TensorRT without strong typing (8.x) gets BuilderFlag.INT8,
    which Q/DQ networks need there. ``fp16`` does not apply to them: float layers keep the ONNX
    types."""
    import os
    from pathlib import Path

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if qdq and fp16:
        raise ValueError(f"{onnx_path.name} has Q/DQ nodes: its engine is built from the graph's own "
                         "types (explicit quantization), so fp16 does not apply; build it without --fp16")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10 networks are always explicit-batch
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = qdq and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if qdq and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log)")
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    return plan_path


_SCRIPT_HEAD = '''#!/usr/bin/env python3
"""Build the TensorRT engines of this bundle on a machine with an NVIDIA GPU.

Written by adm-edge (targets/tensorrt.py). Needs the `tensorrt` Python package matching the GPU
machine's driver. Engines are tied to the GPU model and TensorRT version that built them.

    python build_engines.py              # every component, at the precision it was exported for
    python build_engines.py --no-fp16    # force float32 engines (Q/DQ graphs: always as typed)
    python build_engines.py --only denoiser
"""

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPONENTS = {components}
'''

_SCRIPT_MAIN = '''

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorRT BuilderFlag.FP16: faster, less exact; default: the "
                             "precision each component was exported for")
    parser.add_argument("--workspace-gib", type=float, default={workspace},
                        help="builder workspace memory pool limit (GiB)")
    parser.add_argument("--only", action="append", choices=[c["component"] for c in COMPONENTS],
                        help="build only this component (repeatable)")
    args = parser.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"build_engines.py needs the tensorrt Python package ({{exc}}); "
                         "install the one matching this machine's CUDA driver") from None
    for entry in COMPONENTS:
        if args.only and entry["component"] not in args.only:
            continue
        fp16 = entry["fp16"] if args.fp16 is None else args.fp16
        plan = build_engine(HERE / entry["onnx"], HERE / entry["plan"], fp16=fp16,
                            qdq=entry["qdq"], workspace_gib=args.workspace_gib)
        kind = "Q/DQ, strongly typed" if entry["qdq"] else ("fp16" if fp16 else "fp32")
        print(f"{{entry['component']}}: {{plan.name}} ({{kind}})")


if __name__ == "__main__":
    main()
'''


def write_build_script(out_dir: Path, components: Sequence[ComponentArtifact]) -> Path:
    """Write ``out_dir/build_engines.py`` that builds a ``.plan`` for each exported component."""
    entries = [
        {"component": art.component, "onnx": art.path,
         "plan": art.details.get("plan", Path(art.path).stem + ENGINE_SUFFIX),
         "fp16": art.precision == "fp16",
         "qdq": bool(art.details.get("quantization"))}
        for art in components
    ]
    source = (_SCRIPT_HEAD.format(components=pprint.pformat(entries, sort_dicts=False))
              + "\n\n" + inspect.getsource(build_engine)
              + _SCRIPT_MAIN.format(workspace=WORKSPACE_GIB))
    compile(source, BUILD_SCRIPT, "exec")  # a script that does not parse is a bug here, not there
    return replace_into(Path(out_dir), lambda tmp: tmp.write_text(source), BUILD_SCRIPT)


def write_extras(out_dir: Path, components: dict[str, dict]) -> Path:
    """Bundle hook (``toolkit.bundle``): the build script, from the manifest's component entries
    ({name: {"path", "precision", "details", ...}})."""
    return write_build_script(out_dir, [
        ComponentArtifact(component=name, path=entry["path"], precision=entry["precision"],
                          details=entry.get("details", {}))
        for name, entry in components.items()
    ])


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export(spec, *, precision: str, plan: dict | None, calib: Path | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    if plan is not None and precision != "fp32":
        raise ValueError(f"{NAME} {spec.name}: a quantized graph is built strongly typed, its float "
                         f"layers in the ONNX graph's float32; export a plan with precision fp32 "
                         f"(got {precision})")
    import onnx

    from targets import onnx as onnx_target
    from targets.qdq import opset_of

    model = onnx_target.export_model(spec, opset=OPSET)
    quantized = None
    if plan is not None:
        from targets import qdq

        planned = qdq.planned_nodes(model, plan)  # before the rewrite drops the name scopes
    model, rewritten = conv1d_as_conv2d(model)
    if plan is not None:
        quantized = qdq.quantize_plan(model, spec, plan=plan, calib=calib, planned=planned)
        model = quantized.model
    problems = list(dict.fromkeys(tensorrt_problems(model) + qdq_problems(model)))
    if problems:
        raise ValueError(f"{spec.name}: the ONNX graph is not ready for TensorRT: "
                         + "; ".join(problems[:10]))

    name = f"{spec.name}{FILE_SUFFIX}"
    plan_name = f"{spec.name}{ENGINE_SUFFIX}"
    external: list[bool] = []

    def write(tmp: Path) -> None:
        external.append(onnx_target.save_model(model, tmp))
        onnx.checker.check_model(str(tmp), full_check=True)

    out_dir = Path(out_dir)
    onnx_path = replace_into(out_dir, write, name)
    reason = engine_available()
    if reason is None:
        build_engine(onnx_path, out_dir / plan_name, fp16=precision == "fp16",
                     qdq=quantized is not None, workspace_gib=WORKSPACE_GIB)
        engine = "built"
    else:
        engine = f"not built ({reason})"
    applied = None if quantized is None else {n: p for n, (p, _) in quantized.applied.items()}
    if quantized is not None:
        engine_precision = ("explicit quantization, strongly typed: Q/DQ layers int8 (int4 "
                            "weight-only), the other layers float32 as typed in the ONNX graph")
    elif precision == "fp16":
        engine_precision = "fp16 (BuilderFlag.FP16, TensorRT picks per layer)"
    else:
        engine_precision = "fp32"
    return ComponentArtifact(
        component=spec.name,
        path=name,
        precision=precision if quantized is None else plan_label(applied),
        details={
            "opset": opset_of(model),
            "onnx_precision": "fp32" if quantized is None else "Q/DQ (int8/int4) + fp32",
            "engine_precision": engine_precision,
            "engine": engine,
            "plan": plan_name,
            "build_script": BUILD_SCRIPT,
            "conv1d_as_conv2d": rewritten,
            "conv_layout": "1-D convs as 2-D (k x 1): Unsqueeze(axis 3) -> Conv -> Squeeze(axis 3)",
            "group_norm": ("Reshape -> InstanceNormalization -> Reshape -> Mul -> Add"
                           if any(n.op_type == "InstanceNormalization" for n in model.graph.node)
                           else None),
            "static_shapes": True,
            "external_data": f"{name}.data" if external[0] else None,
            "io": onnx_target.io_signature(model),
            "node_count": len(model.graph.node),
            "op_types": onnx_target.op_histogram(model),
            "quantization": None if quantized is None else quantized.details,
            "lowering": None if quantized is None else lowering_report(plan, quantized.applied),
            "qdq_checked": quantized is not None,
        },
    )
