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
"""

from __future__ import annotations

import inspect
import pprint
from collections.abc import Sequence
from pathlib import Path

from targets import ComponentArtifact, check_export_args, replace_into

NAME = "tensorrt"
FILE_SUFFIX = ".onnx"
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


def tensorrt_problems(model) -> list[str]:
    """What in ``model`` TensorRT's ONNX parser would refuse (empty when none is known)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not 9 <= opset <= MAX_PARSER_OPSET:
        problems.append(f"opset {opset} outside TensorRT's parser range 9..{MAX_PARSER_OPSET}")
    constants = {init.name for init in model.graph.initializer}
    constants.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name}: custom-domain op {node.domain}::{node.op_type}")
        elif node.op_type in TRT_UNSUPPORTED_OPS:
            problems.append(f"{node.name}: {node.op_type} is not parsed by TensorRT")
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


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def build_engine(onnx_path, plan_path, *, fp16, workspace_gib=4.0):
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write the serialized engine to
    ``plan_path`` (via a temporary file). Needs ``tensorrt`` and a CUDA GPU."""
    import os
    from pathlib import Path

    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10 networks are always explicit-batch
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
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
    python build_engines.py --no-fp16    # force float32 engines
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
                            workspace_gib=args.workspace_gib)
        print(f"{{entry['component']}}: {{plan.name}} ({{'fp16' if fp16 else 'fp32'}})")


if __name__ == "__main__":
    main()
'''


def write_build_script(out_dir: Path, components: Sequence[ComponentArtifact]) -> Path:
    """Write ``out_dir/build_engines.py`` that builds a ``.plan`` for each exported component."""
    entries = [
        {"component": art.component, "onnx": art.path,
         "plan": art.details.get("plan", Path(art.path).stem + ENGINE_SUFFIX),
         "fp16": art.precision == "fp16"}
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
    import onnx

    from targets import onnx as onnx_target

    model = onnx_target.export_model(spec, opset=OPSET)
    model, rewritten = conv1d_as_conv2d(model)
    problems = tensorrt_problems(model)
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
                     workspace_gib=WORKSPACE_GIB)
        engine = "built"
    else:
        engine = f"not built ({reason})"
    return ComponentArtifact(
        component=spec.name,
        path=name,
        precision=precision,
        details={
            "opset": OPSET,
            "onnx_precision": "fp32",
            "engine_precision": ("fp16 (BuilderFlag.FP16, TensorRT picks per layer)"
                                 if precision == "fp16" else "fp32"),
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
        },
    )
