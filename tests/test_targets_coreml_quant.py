"""Quantized Core ML export on tiny seeded components: the package holds what the report says.

Core ML cannot run here (prediction needs macOS), so the checks are structural, on the MIL program
read back from the saved package with a walker of this file's own, plus host-side numerics: the
PyTorch replay of the package's weights and activation quantization against the plan's
fake-quantized simulation (``calibration.fakequant``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from calibration.fakequant import observe_ranges, quantizable_leaves, quantized_copy
from calibration.precision import LayerPrecision
from targets import get_target, plan_label
from targets.coreml import INT4_BLOCK_SIZE, load_saved_program
from tests.test_targets import make_pipeline, sqnr_db
from toolkit.components import component_specs

COMPONENTS = ("vae_decoder", "denoiser")
W8A8 = LayerPrecision("int8", "int8")
W4A16 = LayerPrecision("int4", "fp16")
W4A8 = LayerPrecision("int4", "int8")
FLOAT32 = LayerPrecision("fp32", "fp32")
FLOAT16 = LayerPrecision("fp16", "fp16", "per_tensor")  # calibration.plan.HIGH_PRECISION
INT16_ACTIVATIONS = LayerPrecision("int8", "int16")
FP16_WEIGHTS_FP32_ACTIVATIONS = LayerPrecision("fp16", "fp32")
CALIBRATION_INPUTS = 4
MAX_REPLAY_GAP_DB = 4.0  # package replay vs the plan's fake-quantized simulation (fp16 scales differ)
MIN_REPLAY_SQNR_DB = {"w8a8": 25.0, "w4a16": 10.0}  # tiny random layers; a wrong axis lands near 0

# Per component, the float-kept layers of the mixed plan (the rest is W8A8) and the two entries
# Core ML cannot honour as asked.
MIXED = {
    "vae_decoder": {
        "decoder.layers.0": FLOAT32,  # first conv
        "decoder.layers.4": FLOAT32,  # last conv
        "decoder.layers.1.layers.1": FLOAT16,  # a conv-transpose kept high
        "decoder.layers.2.layers.1": W4A8,  # conv-transpose, int4 weights behind int8 inputs
        "decoder.layers.1.layers.2.layers.1": INT16_ACTIVATIONS,
        "decoder.layers.2.layers.2.layers.3": FP16_WEIGHTS_FP32_ACTIVATIONS,
    },
    "denoiser": {
        "conv_in": FLOAT32,
        "conv_out": FLOAT32,
        "attn.qkv": FLOAT16,
        "time_mlp.0": W4A8,  # a linear on the fp32 timestep path
        "down.1.res.0.conv1": INT16_ACTIVATIONS,
        "mid.0.conv1": FP16_WEIGHTS_FP32_ACTIVATIONS,
    },
}
DIFFERING = (INT16_ACTIVATIONS, FP16_WEIGHTS_FP32_ACTIVATIONS)


def make_plan(spec, kind: str) -> dict:
    leaves = quantizable_leaves(spec.module)
    if kind == "w8a8":
        return {name: W8A8 for name in leaves}
    if kind == "w4a16":
        return {name: W4A16 for name in leaves}
    return {name: MIXED[spec.name].get(name, W8A8) for name in leaves}


@pytest.fixture(scope="module")
def specs():
    return component_specs(make_pipeline("tiny"))


@pytest.fixture(scope="module")
def feeds(specs):
    """Calibration inputs per component: the example inputs and seeded draws of the same shapes."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in COMPONENTS:
        spec = specs[name]
        draws = [tuple(torch.rand(t.shape, generator=g) if t.dim() == 1 else torch.randn(t.shape, generator=g)
                       for t in spec.example_inputs) for _ in range(CALIBRATION_INPUTS - 1)]
        out[name] = [tuple(spec.example_inputs), *draws]
    return out


@pytest.fixture(scope="module")
def exports(specs, feeds, tmp_path_factory):
    """(component, kind) → (artifact, package path, plan); kind "fp32" is the export without a plan."""
    coreml = get_target("coreml")
    out = {}
    for name in COMPONENTS:
        spec = specs[name]
        with torch.no_grad():
            before = spec.module(*spec.example_inputs)
        for kind in ("fp32", "w8a8", "w4a16", "mixed"):
            plan = None if kind == "fp32" else make_plan(spec, kind)
            calib = feeds[name] if plan and any(p.activations.startswith("int") for p in plan.values()) else None
            out_dir = tmp_path_factory.mktemp(f"{name}_{kind}")
            art = coreml.export(spec, precision="fp32", plan=plan, calib=calib, out_dir=out_dir)
            out[name, kind] = (art, out_dir / art.path, plan)
        with torch.no_grad():  # PT2E works on a copy: the component is untouched
            assert torch.equal(spec.module(*spec.example_inputs), before)
    return out


# ---------------------------------------------------------------------------------------------
# An independent reading of the saved program
# ---------------------------------------------------------------------------------------------


def program_ops(package):
    program = load_saved_program(package)
    return [op for f in program.functions.values() for op in f.operations]


def through_cast(var):
    op = var.op
    return op.inputs["x"].op if op is not None and op.op_type == "cast" else op


def read_layer(op) -> dict:
    """weights / activations / compute dtype of one conv / conv_transpose / linear op."""
    from coremltools.converters.mil.mil.types import builtin_to_string

    x_source = through_cast(op.inputs["x"])
    quantized_input = (x_source is not None and x_source.op_type == "dequantize"
                       and x_source.inputs["input"].op.op_type == "quantize")
    weight = op.inputs["weight"].op
    if weight.op_type == "constexpr_blockwise_shift_scale":
        stored = builtin_to_string(weight.inputs["data"].dtype)
        block = [d // s for d, s in zip(weight.inputs["data"].shape, weight.inputs["scale"].shape)]
    else:
        assert weight.op_type == "const", weight.op_type
        stored, block = builtin_to_string(op.inputs["weight"].dtype), None
    return {"weights": stored, "block": block, "int8_input": quantized_input,
            "compute": builtin_to_string(op.inputs["x"].dtype)}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["w8a8", "w4a16", "mixed"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_quantized_package_is_written_and_describes_itself(component, kind, exports):
    art, package, plan = exports[component, kind]
    assert package.is_dir() and (package / "Manifest.json").is_file()
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    json.dumps(dataclasses.asdict(art))
    d = art.details
    assert d["deployment_target"].startswith("iOS18")
    assert d["plan"] == plan_label(plan)
    report = d["lowering"]
    assert set(report["layers"]) == set(plan) == set(d["layers"])
    applied = {n: LayerPrecision.from_dict(e["applied"]) for n, e in report["layers"].items()}
    assert art.precision == plan_label(applied)
    assert d["weight_bytes"] == (package / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    if any(p.activations == "int8" for p in plan.values()):
        assert d["activation_quantization"]["calibration_inputs"] == CALIBRATION_INPUTS
    else:
        assert d["activation_quantization"] is None


@pytest.mark.parametrize("kind", ["w8a8", "w4a16"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_uniform_plans_are_honoured_in_the_saved_program(component, kind, exports, specs):
    art, package, plan = exports[component, kind]
    report = art.details["lowering"]
    assert report["honoured"] == len(plan) and report["differs"] == []
    ops = {op.name: op for op in program_ops(package)}
    layer_ops = [op for op in ops.values() if op.op_type in ("conv", "conv_transpose", "linear")]
    assert len(layer_ops) == len(plan)  # one op per planned layer, nothing else
    leaves = quantizable_leaves(specs[component].module)
    for name, facts in art.details["layers"].items():
        seen = read_layer(ops[facts["op"]])
        out_axis = 1 if facts["op_type"] == "conv_transpose" else 0
        assert seen["block"] is not None and seen["block"][out_axis] == 1  # a scale per output channel
        if kind == "w8a8":
            assert seen["weights"] == "int8" and seen["int8_input"], name
        else:
            assert seen["weights"] == "int4" and not seen["int8_input"], name
            in_axis = 1 - out_axis
            cin = leaves[name].weight.shape[in_axis]
            assert seen["block"][in_axis] == (INT4_BLOCK_SIZE if cin % INT4_BLOCK_SIZE == 0 else cin)
        assert seen["compute"] == "fp16"
    quantize = sum(op.op_type == "quantize" for op in ops.values())
    if kind == "w8a8":  # one per distinct layer input (FiLM projections share theirs)
        assert 0 < quantize <= len(plan)
    else:
        assert quantize == 0


@pytest.mark.parametrize("component", COMPONENTS)
def test_mixed_plan_keeps_float_layers_and_names_what_differs(component, exports):
    art, package, plan = exports[component, "mixed"]
    report, layers = art.details["lowering"], art.details["layers"]
    ops = {op.name: op for op in program_ops(package)}
    differing = sorted(n for n, p in plan.items() if p in DIFFERING)
    assert sorted(report["differs"]) == differing and report["honoured"] == len(plan) - len(differing)
    for name, want in MIXED[component].items():
        entry, seen = report["layers"][name], read_layer(ops[layers[name]["op"]])
        if want == FLOAT32:
            assert entry["honoured"] and entry["applied"]["weights"] == "fp32"
            assert entry["applied"]["activations"] == "fp32"
            assert seen == {"weights": "fp32", "block": None, "int8_input": False, "compute": "fp32"}
        elif want == FLOAT16:
            assert entry["honoured"]
            assert seen == {"weights": "fp16", "block": None, "int8_input": False, "compute": "fp16"}
        elif want == W4A8:
            assert entry["honoured"] and seen["weights"] == "int4" and seen["int8_input"]
        elif want == INT16_ACTIVATIONS:
            assert entry["applied"]["activations"] == "fp16" and "8 bits" in entry["why"]
            assert seen["weights"] == "int8" and not seen["int8_input"]
        else:  # fp16 weights with fp32 activations: the weight follows its op into fp32
            assert entry["applied"] == {**want.to_dict(), "weights": "fp32"}
            assert "compute precision" in entry["why"] and seen["weights"] == "fp32"
    for name, p in plan.items():
        if p == W8A8:
            assert report["layers"][name]["honoured"]
            assert read_layer(ops[layers[name]["op"]])["int8_input"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_weight_file_shrinks_with_the_weight_bits(component, exports):
    size = {kind: exports[component, kind][0].details["weight_bytes"] for kind in ("fp32", "w8a8", "w4a16")}
    assert size["w4a16"] < size["w8a8"] < size["fp32"], size


@pytest.mark.parametrize("kind", ["w8a8", "w4a16"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_package_replay_matches_the_plan_simulation(component, kind, exports, specs, feeds):
    art, _, plan = exports[component, kind]
    spec = specs[component]
    ranges = observe_ranges(spec.module, feeds[component])
    with torch.no_grad():
        reference = spec.module(*spec.example_inputs).numpy()
        simulated = quantized_copy(spec.module, plan, ranges)(*spec.example_inputs).numpy()
    replay = art.details["replay"]["sqnr_db"]
    assert replay > MIN_REPLAY_SQNR_DB[kind]
    assert abs(replay - sqnr_db(reference, simulated)) < MAX_REPLAY_GAP_DB


def test_calibration_inputs_of_the_wrong_shape_are_refused(specs, tmp_path):
    spec = specs["vae_decoder"]
    plan = {name: W8A8 for name in quantizable_leaves(spec.module)}
    with pytest.raises(ValueError, match="calibration input 0 has shapes"):
        get_target("coreml").export(spec, precision="fp32", plan=plan, calib=[(torch.zeros(1, 4, 8),)],
                                    out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_mixed_bit_palettization_is_written_as_lookup_tables(specs, tmp_path):
    # int8 and int4 weight-only layers with palette granularity: k-means tables of 256 and 16
    # entries (coremltools palettize_weights), read back from the saved package.
    from calibration.fakequant import fake_palettize_weight

    spec = specs["denoiser"]
    leaves = list(quantizable_leaves(spec.module))
    plan = {n: LayerPrecision("int4" if i % 2 else "int8", "fp16", "palette") for i, n in enumerate(leaves)}
    art = get_target("coreml").export(spec, precision="fp32", plan=plan, calib=None, out_dir=tmp_path)
    lowering = art.details["lowering"]
    assert lowering["honoured"] == len(plan) and art.details["weight_compression"]["palettized_in_coreml"] > 0
    assert all(e["applied"]["granularity"] == "palette" for e in lowering["layers"].values())
    by_name = {op.name: op for op in program_ops(tmp_path / art.path)}
    for fqn, facts in art.details["layers"].items():
        storage = by_name[facts["op"]].inputs["weight"].op
        assert storage.op_type == "constexpr_lut_to_dense", (fqn, storage.op_type)
        assert storage.inputs["lut"].shape[-2] == (16 if plan[fqn].weights == "int4" else 256), fqn
    # The package's tables against the plan's simulation: the same k-means, fp16 table entries.
    replay = art.details["replay"]["sqnr_db"]
    simulated = quantized_copy(spec.module, plan)
    with torch.no_grad():
        sim = sqnr_db(spec.module(*spec.example_inputs).numpy(), simulated(*spec.example_inputs).numpy())
    assert abs(replay - sim) < MAX_REPLAY_GAP_DB, (replay, sim)
    w = next(iter(spec.module.parameters())).detach()
    assert fake_palettize_weight(w, 4).unique().numel() <= 16


def test_palette_simulation_has_at_most_2_to_the_bits_values_and_fits_better_with_more():
    from calibration.fakequant import fake_palettize_weight, fake_quantize_weight

    w = torch.randn(64, 32, 3, generator=torch.Generator().manual_seed(0))
    err = {}
    for bits in (4, 8):
        q = fake_palettize_weight(w, bits)
        assert q.shape == w.shape and q.unique().numel() <= 2 ** bits
        err[bits] = float(((q - w) ** 2).mean())
    assert err[8] < err[4]
    # k-means on a Gaussian tensor beats a uniform per-tensor grid of the same width.
    assert err[4] < float(((fake_quantize_weight(w, 4, per_channel=False) - w) ** 2).mean())
