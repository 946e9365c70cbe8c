"""Core ML: ``torch.export`` → ``run_decompositions({})`` → ``ct.convert`` → ``.mlpackage``.

Converts and saves on Linux; prediction needs macOS (``runtime_py.runners``). The deployment target
is iOS 18 / macOS 15 (per-block int4 weights need it). Inputs and outputs are float32 for every
precision, so a device feeds the same arrays as every other target.

fp16 (``compute_precision`` float16): every op runs in fp16 except those computed from rank-1
inputs and constants alone: the timestep path (sinusoidal embedding of t · 1000, the time MLP,
FiLM projections, √ᾱ_t). In fp16 the embedding's arguments round by up to 0.5 rad at t ≈ 1,
which alone drops the embedding to ~25 dB SQNR; kept in fp32 it costs a few (B, d) ops.

Quantized export (``plan``: FQN → LayerPrecision). Ops outside the plan's layers run as for fp16
above (Core ML's native precision; ``precision`` only chooses this for exports without a plan).
Per planned layer:

- activations int8: calibrated in PyTorch, because Core ML's own activation calibration runs
  ``predict`` (macOS only). :func:`plan_quantizer` annotates the input of each planned conv /
  conv-transpose / linear node, found by the node's own module FQN, with a uint8 affine per-tensor
  min-max observer (the activation form of ``calibration.fakequant``), and an int8 weight with a
  symmetric per-output-channel (or per-tensor) observer; torchao's ``prepare_pt2e`` runs the
  calibration inputs and ``convert_pt2e`` writes quantize / dequantize nodes, which ``ct.convert``
  turns into MIL ``quantize`` / ``dequantize`` and ``constexpr_blockwise_shift_scale`` (int8
  weights). ExecuTorch's ``CoreMLQuantizer`` is not used: it traces its pattern graphs anew for
  every module-name entry (75 s for one entry, 168 s for two, on a 2-core host) and has no
  conv-transpose pattern.
- activations int16: MIL ``quantize`` takes 8-bit types only, so such a layer runs fp16.
- weights int8 / int4 not already quantized in PyTorch (weight-only layers, the int4 of W4A8):
  ``coremltools.optimize.coreml.linear_quantize_weights`` with one config per weight constant,
  symmetric; int8 per output channel; int4 per block of ``INT4_BLOCK_SIZE`` input channels, or per
  output channel where the input channels are not a multiple of it (coremltools would skip the
  weight otherwise); ``weight_threshold`` 0, so no small layer is skipped.
- compute: a layer with fp32 activations runs in fp32 and keeps an fp32 weight; every other layer
  runs in fp16. A float weight takes its op's precision (fp16 weights with fp32 activations are
  stored fp32, and the other way round); the lowering report says so.

The lowering report is read back from the saved package's MIL program, never from the configs: each
planned layer's FX node carries a ``debug_handle``, which ``ct.convert`` copies into its MIL op's
scope; the op names are then stable through compression and saving, so the package written to disk
is loaded, and its ops are matched by name. Per layer it reads the weight's source (a ``const`` of
fp16 / fp32, or a ``constexpr_blockwise_shift_scale`` over int8 / int4 data) and the input
(``dequantize(quantize(·))`` for int8 activations, else its float type). Any difference from what this module intends is an error, not a report entry. ``details["replay"]``
re-runs the PyTorch module with the package's dequantized weights and activation quantization
parameters (other ops in fp32): the host-side numerics of a package that cannot run here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

from targets import TARGETS, ComponentArtifact, check_export_args, lowering_report, plan_label, replace_into

NAME = "coreml"
FILE_SUFFIX = TARGETS[NAME].file_suffix
DEPLOYMENT_TARGET = "iOS18"  # ct.target.iOS18 == macOS15
LAYER_OP_TYPES = ("conv", "conv_transpose", "linear")  # the MIL ops of Conv1d, ConvTranspose1d, Linear
INT4_BLOCK_SIZE = 32  # input channels sharing one int4 scale
WEIGHT_FILE = "Data/com.apple.CoreML/weights/weight.bin"
# ct.convert draws two tqdm bars per component (frontend ops, MIL passes). The toolkit's CLI turns
# them off (its export bar counts stages); a library caller keeps coremltools' own behaviour.
CONVERTER_PROGRESS = True


def available() -> str | None:
    try:
        import coremltools  # noqa: F401
    except ImportError as exc:
        return f"coremltools is not installed ({exc})"
    return None


def _input_vars(op):
    for value in op.inputs.values():
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def rank1_island_selector(rank1_inputs: set[str]):
    """An ``FP16ComputePrecision`` op selector: True (cast to fp16) unless every input of the op
    derives from ``rank1_inputs`` and constants only. Also returns the list of ops kept fp32."""
    derived: dict[int, tuple[object, bool]] = {}  # id(var) -> (var, derives from rank-1 only)
    kept: list[str] = []

    def from_rank1(var) -> bool:
        stack = [var]
        while stack:
            top = stack[-1]
            if id(top) in derived:
                stack.pop()
                continue
            op = top.op
            if op is None:  # a function input
                derived[id(top)] = (top, top.name in rank1_inputs)
            elif op.op_type == "const":
                derived[id(top)] = (top, True)
            else:
                inputs = list(_input_vars(op))
                pending = [v for v in inputs if id(v) not in derived]
                if pending:
                    stack.extend(pending)
                    continue
                derived[id(top)] = (top, all(derived[id(v)][1] for v in inputs))
            stack.pop()
        return derived[id(var)][1]

    def selector(op) -> bool:
        inputs = list(_input_vars(op))
        island = bool(inputs) and all(from_rank1(v) for v in inputs) and any(
            v.op is None or v.op.op_type != "const" for v in inputs)
        if island:
            kept.append(op.op_type)
        return not island

    return selector, kept


def _operations(program):
    """Every op of a MIL program, nested blocks included."""
    def visit(block):
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from visit(inner)

    for function in program.functions.values():
        yield from visit(function)


def mil_op_histogram(mlmodel) -> dict[str, int]:
    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        return {}
    counts = Counter(op.op_type for op in _operations(program))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------------------------
# PyTorch side: the exported program, with integer activations calibrated by PT2E
# ---------------------------------------------------------------------------------------------


def _layer_targets() -> dict:
    """The aten op of each quantizable leaf → the output-channel axis of its weight."""
    import torch

    aten = torch.ops.aten
    return {aten.conv1d.default: 0, aten.conv_transpose1d.default: 1, aten.linear.default: 0}


def _node_fqn(node) -> str | None:
    """The FQN of the innermost module a graph node was traced in (its leaf, for a conv / linear)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def plan_quantizer(plan: dict):
    """A PT2E quantizer for the plan's int8-activation layers, selected by each node's own FQN.

    Annotates only the planned conv / conv-transpose / linear nodes: the input (uint8 affine per
    tensor, min-max) and, for int8 weights, the weight (int8 symmetric, [−127, 127], per output
    channel or per tensor as the plan says). Other weights stay float for Core ML's compression.
    """
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    targets = _layer_targets()
    activation = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255,
                                  qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=MinMaxObserver)

    def weight_spec(layer, axis: int):
        if layer.granularity == "per_tensor":
            return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                                    qscheme=torch.per_tensor_symmetric,
                                    observer_or_fake_quant_ctr=MinMaxObserver)
        return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                                qscheme=torch.per_channel_symmetric, ch_axis=axis,
                                observer_or_fake_quant_ctr=PerChannelMinMaxObserver)

    class PlanQuantizer(Quantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target not in targets:
                    continue
                layer = plan.get(_node_fqn(node))
                if layer is None or layer.activations != "int8":
                    continue
                qspecs = {node.args[0]: activation}
                if layer.weights == "int8" and layer.granularity != "palette":
                    qspecs[node.args[1]] = weight_spec(layer, targets[node.target])
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=qspecs, _annotated=True)
            return model

        def validate(self, model) -> None:
            pass

    return PlanQuantizer()


def _check_calib(spec, calib: list) -> None:
    want = [tuple(t.shape) for t in spec.example_inputs]
    for i, feed in enumerate(calib):
        got = [tuple(t.shape) for t in feed]
        if got != want:
            raise ValueError(f"{NAME} {spec.name}: calibration input {i} has shapes {got}, the component "
                             f"takes {want} ({', '.join(spec.input_names)})")


def _exported_program(spec, plan: dict | None, calib: list | None):
    """The decomposed ExportedProgram; with int8-activation layers, after PT2E calibration."""
    import torch

    inputs = tuple(spec.example_inputs)
    exported = torch.export.export(spec.module.eval(), inputs)
    if plan and any(p.activations == "int8" for p in plan.values()):
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        _check_calib(spec, calib)
        prepared = prepare_pt2e(exported.module(), plan_quantizer(plan))
        with torch.no_grad():
            for feed in calib:
                prepared(*feed)
        exported = torch.export.export(convert_pt2e(prepared), inputs)
    return exported.run_decompositions({})  # ct.convert refuses the training dialect


def _tag_layers(spec, exported, plan: dict) -> dict[int, str]:
    """Give each planned layer's node a ``debug_handle`` (ct.convert copies it into the MIL op's
    scope); returns handle → FQN. Every planned layer must have a node."""
    targets = _layer_targets()
    handles: dict[int, str] = {}
    for node in exported.graph.nodes:
        node.meta.pop("debug_handle", None)
        if node.op == "call_function" and node.target in targets and _node_fqn(node) in plan:
            handles[len(handles) + 1] = _node_fqn(node)
            node.meta["debug_handle"] = len(handles)
    missing = sorted(set(plan) - set(handles.values()))
    if missing:
        raise RuntimeError(f"{NAME} {spec.name}: no conv / linear node in the exported graph for planned "
                           f"layers {missing[:5]}")
    return handles


# ---------------------------------------------------------------------------------------------
# Core ML side: compute precision per layer, weight compression, reading the package back
# ---------------------------------------------------------------------------------------------


def _handle(op):
    from coremltools.converters.mil.mil.scope import ScopeSource

    data = op.scopes.get(ScopeSource.EXIR_DEBUG_HANDLE) or [None]
    return data[0]


def _intended(want) -> tuple[str, str, str | None]:
    """(weights, activations, why they differ from ``want``) this module applies to a layer."""
    activations, why = want.activations, []
    if activations == "int16":
        activations = "fp16"
        why.append("Core ML quantizes activations to 8 bits only (MIL quantize takes int8 / uint8); "
                   "the layer runs fp16")
    compute = "fp32" if activations == "fp32" else "fp16"
    weights = want.weights
    if weights in ("fp16", "fp32") and weights != compute:
        weights = compute
        why.append(f"a float weight is stored in its op's compute precision ({compute}, from "
                   f"{activations} activations)")
    return weights, activations, "; ".join(why) or None


def _plan_selector(plan: dict, handles: dict[int, str], base):
    """FP16ComputePrecision selector: planned layers by their activations, other ops by ``base``."""
    fp16 = {h: _intended(plan[fqn])[1] != "fp32" for h, fqn in handles.items()}

    def selector(op) -> bool:
        handle = _handle(op)
        return fp16[handle] if handle in fp16 else base(op)

    return selector


def _layer_op_names(spec, program, handles: dict[int, str]) -> dict[str, list[str]]:
    """FQN → the names of its MIL conv / conv_transpose / linear ops (in the converted program)."""
    found: dict[str, list[str]] = defaultdict(list)
    for op in _operations(program):
        if op.op_type in LAYER_OP_TYPES and _handle(op) in handles:
            found[handles[_handle(op)]].append(op.name)
    missing = sorted(set(handles.values()) - set(found))
    if missing:
        raise RuntimeError(f"{NAME} {spec.name}: no Core ML conv / linear op carries planned layers "
                           f"{missing[:5]} after conversion")
    return dict(found)


def _weight_configs(program, plan: dict, layer_ops: dict[str, list[str]]) -> tuple[dict, dict]:
    """op_name_configs for linear_quantize_weights and for palettize_weights: one per float
    weight const of an int layer (``palette`` granularity: k-means look-up table per tensor of
    2^bits entries; int8 and int4 layers of one plan make a mixed-bit palettization)."""
    import coremltools.optimize.coreml as cto

    ops = {op.name: op for op in _operations(program)}
    configs, palettes = {}, {}
    for fqn, names in layer_ops.items():
        want = plan[fqn]
        if want.weights not in ("int8", "int4"):
            continue
        for name in names:
            op = ops[name]
            weight = op.inputs["weight"]
            if weight.op is None or weight.op.op_type != "const":
                continue  # quantized in PyTorch already (int8 weights of an int8-activation layer)
            input_axis = 0 if op.op_type == "conv_transpose" else 1
            if want.granularity == "palette":
                palettes[weight.op.name] = cto.OpPalettizerConfig(
                    mode="kmeans", nbits=8 if want.weights == "int8" else 4,
                    granularity="per_tensor", weight_threshold=0)
                continue
            if want.granularity == "per_tensor":
                granularity = "per_tensor"
            elif want.weights == "int4" and weight.shape[input_axis] % INT4_BLOCK_SIZE == 0:
                granularity = "per_block"
            else:
                granularity = "per_channel"
            configs[weight.op.name] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=want.weights, granularity=granularity,
                block_size=INT4_BLOCK_SIZE, weight_threshold=0)
    return configs, palettes



def _convert(ct, exported, spec, compute_precision):
    import numpy as np

    return ct.convert(
        exported,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_precision=compute_precision,
        inputs=[ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32)
                for n, t in zip(spec.input_names, spec.example_inputs)],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in spec.output_names],
        skip_model_load=True,  # loading compiles the model, which only macOS can do
    )


@contextmanager
def _converter_progress(enabled: bool):
    """With ``enabled`` False, coremltools' conversion bars are drawn disabled for the duration."""
    if enabled:
        yield
        return
    from functools import partial

    import coremltools.converters.mil.frontend.torch.ops as frontend
    import coremltools.converters.mil.mil.passes.pass_pipeline as passes

    saved = frontend._tqdm, passes.tqdm
    frontend._tqdm, passes.tqdm = partial(saved[0], disable=True), partial(saved[1], disable=True)
    try:
        yield
    finally:
        frontend._tqdm, passes.tqdm = saved

def load_saved_program(path: Path):
    """The MIL program of a saved .mlpackage (weights read from its weight file)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    model_spec = model.get_spec()
    return load(model_spec, specification_version=model_spec.specificationVersion,
                file_weights_dir=model.weights_dir)


_INT_WEIGHTS = {"int8": "int8", "uint8": "int8", "int4": "int4", "uint4": "int4"}


def layer_facts(op) -> dict:
    """What a MIL conv / conv_transpose / linear op computes with, read from the program."""
    import numpy as np
    from coremltools.converters.mil.mil import types

    x = op.inputs["x"]
    facts = {"op": op.name, "op_type": op.op_type, "compute": types.builtin_to_string(x.dtype),
             "activation_qdq": 0}
    source = x.op
    if source is not None and source.op_type == "cast":  # dequantized in fp32, computed in fp16
        source = source.inputs["x"].op
    quantize = source.inputs["input"].op if source is not None and source.op_type == "dequantize" else None
    if quantize is not None and quantize.op_type == "quantize":
        facts["activation_qdq"] = 1
        facts["activations"] = "int8"
        facts["activation_dtype"] = types.builtin_to_string(quantize.outputs[0].dtype)
    else:
        facts["activations"] = types.builtin_to_string(x.dtype)
    weight = op.inputs["weight"]
    storage = weight.op
    facts["weight_op"] = storage.op_type
    if storage.op_type == "const":
        facts["weights"] = types.builtin_to_string(weight.dtype)
    elif storage.op_type == "constexpr_lut_to_dense":  # palettized: indices into a look-up table
        indices, lut = storage.inputs["indices"], storage.inputs["lut"]
        facts["weight_dtype"] = types.builtin_to_string(indices.dtype)
        facts["weights"] = _INT_WEIGHTS.get(facts["weight_dtype"], f"unrecognised {facts['weight_dtype']}")
        facts["weight_lut"] = int(lut.shape[-2])  # entries per table
        facts["weight_tables"] = int(np.prod(lut.shape[:-2]))
    elif storage.op_type == "constexpr_blockwise_shift_scale":  # what iOS18 compression writes
        data, scale = storage.inputs["data"], storage.inputs["scale"]
        facts["weight_dtype"] = types.builtin_to_string(data.dtype)
        facts["weights"] = _INT_WEIGHTS.get(facts["weight_dtype"], f"unrecognised {facts['weight_dtype']}")
        facts["weight_block"] = [d // s for d, s in zip(data.shape, scale.shape)]
    else:
        facts["weights"] = f"unrecognised {storage.op_type}"
    return facts


def _applied(spec, program, plan: dict, layer_ops: dict[str, list[str]]) -> tuple[dict, dict]:
    """(FQN → (LayerPrecision read from ``program``, why it differs), FQN → layer facts).

    Raises where the program holds something other than what :func:`_intended` says: a lowering
    this module did not mean is a bug to fix, not a line in a report.
    """
    from calibration.precision import LayerPrecision

    ops = {op.name: op for op in _operations(program)}
    applied, layers, wrong = {}, {}, []
    for fqn, names in layer_ops.items():
        missing = [n for n in names if n not in ops]
        if missing:
            raise RuntimeError(f"{NAME} {spec.name}: the saved package has no op {missing[0]!r} "
                               f"(layer {fqn})")
        seen = [layer_facts(ops[n]) for n in names]
        facts = seen[0]
        if any((f["weights"], f["activations"]) != (facts["weights"], facts["activations"]) for f in seen):
            wrong.append(f"{fqn}: its {len(seen)} calls are lowered differently")
        weights, activations, why = _intended(plan[fqn])
        compute = "fp32" if activations == "fp32" else "fp16"
        if (facts["weights"], facts["activations"], facts["compute"]) != (weights, activations, compute):
            wrong.append(f"{fqn}: the package holds {facts['weights']} weights / {facts['activations']} "
                         f"activations computed in {facts['compute']}, meant {weights} / {activations} "
                         f"in {compute}")
            continue
        granularity = plan[fqn].granularity  # float weights, or one output channel: as asked
        if "weight_lut" in facts:
            granularity = "palette" if facts["weight_tables"] == 1 else "per_channel"
        out_axis = 1 if facts["op_type"] == "conv_transpose" else 0
        if "weight_block" in facts and ops[names[0]].inputs["weight"].shape[out_axis] > 1:
            # a scale per output channel, or per block of one (finer still), is per_channel
            granularity = "per_channel" if facts["weight_block"][out_axis] == 1 else "per_tensor"
        applied[fqn] = (LayerPrecision(facts["weights"], facts["activations"], granularity), why)
        layers[fqn] = {**facts, "calls": len(names)}
    if wrong:
        raise RuntimeError(f"{NAME} {spec.name}: the package does not hold the intended lowering: "
                           + "; ".join(wrong[:5]))
    return applied, layers


def _materialize(var):
    import numpy as np

    if var.val is not None:
        return np.asarray(var.val)
    return np.asarray(var.op.materialized_val_inference())


def replay_sqnr_db(spec, program, layer_ops: dict[str, list[str]]) -> float:
    """SQNR (dB) of the PyTorch module run with the program's weights and activation quantization
    against the float module, on the example inputs. Layers take their dequantized weights and
    biases from the program, their inputs are quantized with the program's ``quantize`` scale and
    zero point (or rounded to fp16); every other op runs in fp32."""
    import copy

    import numpy as np
    import torch
    from coremltools.converters.mil.mil import types

    from calibration.fakequant import quantizable_leaves

    model = copy.deepcopy(spec.module).eval()
    leaves = quantizable_leaves(model)
    ops = {op.name: op for op in _operations(program)}

    def input_rounding(x_var):
        source = x_var.op
        if source is not None and source.op_type == "cast":
            source = source.inputs["x"].op
        if source is not None and source.op_type == "dequantize":
            quantize = source.inputs["input"].op
            scale, zero = quantize.inputs["scale"].val, quantize.inputs.get("zero_point")
            if np.size(scale) != 1:
                raise RuntimeError(f"{NAME} {spec.name}: {quantize.name} quantizes per channel; the "
                                   "replay knows per-tensor activation quantization only")
            scale, zero = float(np.asarray(scale)), 0.0 if zero is None else float(np.asarray(zero.val))
            info = np.iinfo(np.dtype(str(quantize.output_dtype.val)))

            def quantized(module, args):
                q = torch.clamp(torch.round(args[0] / scale) + zero, info.min, info.max)
                return ((q - zero) * scale,) + tuple(args[1:])
            return quantized
        if types.builtin_to_string(x_var.dtype) == "fp16":
            return lambda module, args: (args[0].half().float(),) + tuple(args[1:])
        return None

    for fqn, names in layer_ops.items():
        op, leaf = ops[names[0]], leaves[fqn]
        weight = _materialize(op.inputs["weight"]).astype(np.float32)
        if weight.shape != tuple(leaf.weight.shape):
            raise RuntimeError(f"{NAME} {spec.name}: layer {fqn} holds a {weight.shape} weight in the "
                               f"package, {tuple(leaf.weight.shape)} in PyTorch")
        leaf.weight.data = torch.from_numpy(weight)
        bias = op.inputs.get("bias")
        if bias is not None and leaf.bias is not None:
            leaf.bias.data = torch.from_numpy(_materialize(bias).astype(np.float32))
        hook = input_rounding(op.inputs["x"])
        if hook is not None:
            leaf.register_forward_pre_hook(hook)  # on the copy only
    with torch.no_grad():
        want = spec.module(*spec.example_inputs).double()
        got = model(*spec.example_inputs).double()
    noise = float(((want - got) ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(float((want ** 2).sum()) / noise))


def weight_bytes(package: Path) -> int:
    """Size of the package's weight file (0 when every constant is inline)."""
    path = Path(package) / WEIGHT_FILE
    return path.stat().st_size if path.is_file() else 0


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export(spec, *, precision: str, plan: dict | None, calib: list | None,
           out_dir: Path) -> ComponentArtifact:
    check_export_args(NAME, precision=precision, plan=plan, calib=calib, spec=spec)
    if getattr(plan, "rounding", None):  # GPTQ (calibration.gptq): not lowered here yet
        raise ValueError(f"{NAME}: this plan's weights were rounded with GPTQ (toolkit plan --rounding gptq), "
                         "and the Core ML target does not yet apply a plan's chosen integers (its "
                         "compression would round the float weights again); export it to executorch or "
                         "onnx, or make an RTN plan for Core ML")
    import coremltools as ct
    import torch

    exported = _exported_program(spec, plan, calib)
    placeholders = [s.arg.name for s in exported.graph_signature.input_specs
                    if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if placeholders != list(spec.input_names):
        # ct.convert names inputs after the exported placeholders; a mismatch would silently
        # rename what the manifest promises.
        raise ValueError(f"{spec.name}: forward arguments are named {placeholders}, the spec "
                         f"says {list(spec.input_names)}; rename one to match")
    handles = _tag_layers(spec, exported, plan) if plan else {}
    kept: list[str] = []
    if precision == "fp32" and not plan:
        compute_precision = ct.precision.FLOAT32
    else:
        rank1 = {n for n, t in zip(spec.input_names, spec.example_inputs) if t.dim() <= 1}
        selector, kept = rank1_island_selector(rank1)
        if plan:
            selector = _plan_selector(plan, handles, selector)
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=selector)
    with _converter_progress(CONVERTER_PROGRESS):
        mlmodel = _convert(ct, exported, spec, compute_precision)
    described = [o.name for o in mlmodel.get_spec().description.output]
    if described != list(spec.output_names):
        raise ValueError(f"{spec.name}: Core ML outputs are {described}, expected "
                         f"{list(spec.output_names)}")
    quantized: dict = {}
    if plan:
        import coremltools.optimize.coreml as cto

        layer_ops = _layer_op_names(spec, mlmodel._mil_program, handles)
        configs, palettes = _weight_configs(mlmodel._mil_program, plan, layer_ops)
        if palettes:
            mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=palettes))
        if configs:
            mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))

    def write(tmp: Path) -> None:
        mlmodel.save(str(tmp))
        if plan:  # read the lowering back from what was written; a wrong one never lands
            program = load_saved_program(tmp)
            applied, layers = _applied(spec, program, plan, layer_ops)
            quantized.update(applied=applied, layers=layers,
                             replay=replay_sqnr_db(spec, program, layer_ops), bytes=weight_bytes(tmp))

    name = f"{spec.name}{FILE_SUFFIX}"
    package = replace_into(Path(out_dir), write, name)
    ops = mil_op_histogram(mlmodel)
    details = {
        "coremltools_version": ct.__version__,
        "convert_to": "mlprogram",
        "deployment_target": f"{DEPLOYMENT_TARGET} (macOS15)",
        "compute_precision": "float32" if precision == "fp32" and not plan else "float16",
        "io_dtype": "float32",
        "fp16_kept_float32_ops": len(kept),
        "op_count": sum(c for op, c in ops.items() if op != "const"),
        "op_types": {op: c for op, c in ops.items() if op != "const"},
        "weight_bytes": weight_bytes(package),
    }
    if not plan:
        return ComponentArtifact(component=spec.name, path=name, precision=precision, details=details)
    applied = quantized["applied"]
    int8_activations = sum(p.activations == "int8" for p in plan.values())
    details.update({
        "plan": plan_label(plan),
        "lowering": lowering_report(plan, applied),
        "layers": quantized["layers"],
        "compute_precision": "float16; layers with fp32 activations and the timestep path in float32",
        "weight_compression": {
            "int8": "linear_symmetric per output channel",
            "int4": f"linear_symmetric per block of {INT4_BLOCK_SIZE} input channels (per output "
                    f"channel where the input channels are not a multiple of {INT4_BLOCK_SIZE})",
            "palette": "kmeans look-up table per tensor (coremltools palettize_weights), 2^bits "
                       "entries: 256 for int8 layers, 16 for int4 (mixed-bit by layer)",
            "palettized_in_coreml": len(palettes),
            "weight_threshold": 0,
            "compressed_in_coreml": len(configs),
        },
        "activation_quantization": None if not int8_activations else {
            "how": "PT2E in PyTorch (torchao prepare_pt2e / convert_pt2e), lowered to MIL "
                   "quantize / dequantize",
            "form": "uint8 affine per tensor, min-max over the calibration inputs",
            "layers": int8_activations,
            "calibration_inputs": len(calib),
        },
        "weight_bytes": quantized["bytes"],
        "replay": {"sqnr_db": quantized["replay"],
                   "how": "PyTorch with the package's dequantized weights and activation quantization "
                          "(fp16 rounding of fp16 inputs), other ops fp32, on the example inputs"},
    })
    return ComponentArtifact(component=spec.name, path=name,
                             precision=plan_label({k: v for k, (v, _) in applied.items()}),
                             details=details)
