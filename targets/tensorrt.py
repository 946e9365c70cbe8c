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

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import targets.build_engines as build_engines_module
from targets import TARGETS, ComponentArtifact, check_export_args, lowering_report, plan_label, replace_into
from targets.build_engines import ENGINES_FILE, WORKSPACE_GIB, build_engine  # noqa: F401  (re-exported)
from targets.tensorrt_graph import conv1d_as_conv2d
from targets.tensorrt_rules import qdq_problems, tensorrt_problems  # noqa: F401  (re-exported)

NAME = "tensorrt"
FILE_SUFFIX = TARGETS[NAME].file_suffix
ENGINE_SUFFIX = ".plan"
BUILD_SCRIPT = "build_engines.py"
OPSET = 18


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
# Engines
# ---------------------------------------------------------------------------------------------


def write_build_script(out_dir: Path, components: Sequence[ComponentArtifact]) -> Path:
    """Write ``out_dir/build_engines.py`` (a copy of ``targets/build_engines.py``) and the
    ``engines.json`` it reads: one ``.plan`` per exported component."""
    entries = [
        {"component": art.component, "onnx": art.path,
         "plan": art.details.get("plan", Path(art.path).stem + ENGINE_SUFFIX),
         "fp16": art.precision == "fp16",
         "qdq": bool(art.details.get("quantization"))}
        for art in components
    ]
    out_dir = Path(out_dir)
    replace_into(out_dir, lambda tmp: tmp.write_text(json.dumps(entries, indent=1) + "\n"), ENGINES_FILE)
    script = Path(build_engines_module.__file__)
    return replace_into(out_dir, lambda tmp: shutil.copyfile(script, tmp), BUILD_SCRIPT)


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
        rounded = onnx_target.apply_rounding(model, plan, quantized)  # GPTQ plans: the plan's integers
        quantized.details["rounding"] = ({"method": "gptq", "layers": rounded} if rounded
                                         else {"method": "rtn"})
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
