"""Quantized ONNX (ONNX Runtime) and TensorRT graphs from per-layer plans (targets/qdq.py).

Tiny seeded components, random calibration feeds of the example shapes; each quantized graph is
run in ONNX Runtime (CPU, ORT_ENABLE_BASIC through the runner) against PyTorch, and what the
lowering report says is checked against the graph itself.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibration.fakequant import quantizable_leaves
from calibration.precision import LayerPrecision
from runtime_py.runners import load_runner
from targets import get_target, qdq
from targets.tensorrt import BUILD_SCRIPT, ENGINES_FILE, build_engine, qdq_problems, write_build_script
from toolkit.checkpoint import Pipeline, PipelineConfig
from toolkit.components import ComponentSpec, component_specs
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

# Output SQNR of the W8A8 graphs against PyTorch fp32, example inputs. Measured here (onnxruntime
# 1.32): denoiser 27.4 dB, vae_decoder 28.3 dB, on both targets (same Q/DQ placement and scales);
# PyTorch fake quantization of the same plan gives 27.6 / 28.3 dB.
MIN_SQNR_W8A8_DB = 22.0
# Int4 weight-only Linears (blocks of 128 and 64) + an int8 conv, LinearStack below: 23.8 dB on
# both targets (int4 weights alone: 25.1 dB).
MIN_SQNR_INT4_DB = 18.0
CALIB_FEEDS = 8
W8A8 = LayerPrecision("int8", "int8")
QDQ_TARGETS = ("onnx", "tensorrt")
COMPONENTS = ("denoiser", "vae_decoder")


def make_pipeline() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny"),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


def calibration_feeds(spec, n: int = CALIB_FEEDS, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Random inputs of the example shapes; the denoiser's timestep t uniform in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.rand(t.shape, generator=g) if name == "t" else torch.randn(t.shape, generator=g)
                  for name, t in zip(spec.input_names, spec.example_inputs)) for _ in range(n)]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - test) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference ** 2)) / noise)


def ort_sqnr(spec, path) -> float:
    runner = load_runner("onnx", path, threads=1)
    out = runner.run({n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)})
    with torch.no_grad():
        reference = spec.module(*spec.example_inputs).numpy()
    return sqnr_db(reference, out[spec.output_names[0]])


def node_inputs(model, node_name: str) -> tuple[object, object]:
    """(producer of input 0, producer of input 1) of a node, None for graph inputs/initializers."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return producers.get(node.input[0]), producers.get(node.input[1])


@pytest.fixture(scope="module")
def specs():
    return component_specs(make_pipeline())


@pytest.fixture(scope="module")
def w8a8(specs, tmp_path_factory):
    """Every quantizable leaf W8A8, both components, both targets: {(target, component): (art, dir)}."""
    out = {}
    for target in QDQ_TARGETS:
        directory = tmp_path_factory.mktemp(f"w8a8_{target}")
        for name in COMPONENTS:
            spec = specs[name]
            plan = {fqn: W8A8 for fqn in quantizable_leaves(spec.module)}
            art = get_target(target).export(spec, precision="fp32", plan=plan,
                                            calib=calibration_feeds(spec), out_dir=directory)
            out[target, name] = (art, directory)
    return out


# ---------------------------------------------------------------------------------------------
# W8A8: runs in ORT, parity floor, report read from the graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("target", QDQ_TARGETS)
def test_w8a8_runs_in_onnxruntime_above_the_parity_floor(target, component, w8a8, specs):
    art, directory = w8a8[target, component]
    spec = specs[component]
    snr = ort_sqnr(spec, directory / art.path)
    assert snr > MIN_SQNR_W8A8_DB, f"{target} {component}: SQNR {snr:.1f} dB"
    assert snr < 60.0  # really quantized: an fp32 graph is above 60 dB


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("target", QDQ_TARGETS)
def test_w8a8_report_is_honoured_and_matches_the_graph(target, component, w8a8, specs):
    art, directory = w8a8[target, component]
    leaves = quantizable_leaves(specs[component].module)
    report = art.details["lowering"]
    assert report["honoured"] == len(leaves) and report["differs"] == []
    assert art.precision == f"int8w/int8a x{len(leaves)}"
    q = art.details["quantization"]
    assert q["layers_int8_weights"] == q["layers_int8_activations"] == len(leaves)
    # ONNX Runtime takes asymmetric uint8 activations (its U8S8 form); TensorRT symmetric int8.
    activations = "uint8 asymmetric per tensor" if target == "onnx" else "int8 symmetric per tensor"
    assert q["calibration"] == {"method": "MinMax", "samples": CALIB_FEEDS, "activations": activations}
    json.dumps(dataclasses.asdict(art))
    model = onnx.load(directory / art.path)
    ops = {n.op_type for n in model.graph.node}
    assert "QLinearConv" not in ops and "MatMulNBits" not in ops
    # One Q/DQ pair per layer input (only the planned layers read quantized values) and one
    # weight DQ per layer; counted from the saved graph, not from the details.
    counts = {op: sum(n.op_type == op for n in model.graph.node)
              for op in ("QuantizeLinear", "DequantizeLinear")}
    assert counts["QuantizeLinear"] == q["quantize_linear"]
    assert counts["DequantizeLinear"] == q["dequantize_linear"]
    if target == "tensorrt":
        assert counts["QuantizeLinear"] == len(leaves)
        assert counts["DequantizeLinear"] == 2 * len(leaves)
    else:  # ORT's integer-kernel node unit: one Q per quantized tensor, INT32 bias DQs
        int32 = sum(i.data_type == onnx.TensorProto.INT32 for i in model.graph.initializer)
        assert int32 > 0 and counts["QuantizeLinear"] <= len(leaves)
    initializers = {i.name: i for i in model.graph.initializer}
    for fqn, rows in q["nodes"].items():
        for row in rows:
            act, weight = node_inputs(model, row["node"])
            assert act.op_type == weight.op_type == "DequantizeLinear", fqn
            assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
            assert row["axis"] == (1 if row["op"] == "ConvTranspose" else 0)
    problems = qdq_problems(model)
    if target == "onnx":  # not TensorRT's form: asymmetric activations, opset-21 GroupNormalization,
        # INT32 biases (ORT's integer-kernel node unit)
        assert all(any(k in p for k in ("GroupNormalization is not parsed", "nonzero zero point", "UINT8",
                                        "INT32"))
                   for p in problems)
        assert any("nonzero zero point" in p for p in problems)  # the checker sees the difference
    else:
        assert problems == []
        assert art.details["opset"] == 18 and art.details["qdq_checked"]
        assert art.details["engine_precision"].startswith("explicit quantization, strongly typed")


def test_w8a8_zero_points_are_zero_and_scales_constant(w8a8):
    art, directory = w8a8["tensorrt", "vae_decoder"]
    model = onnx.load(directory / art.path)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.input[1] in initializers and np.all(initializers[node.input[1]] > 0)
            assert not np.any(initializers[node.input[2]])


# ---------------------------------------------------------------------------------------------
# Mixed plans: float layers stay float, fallbacks are reported
# ---------------------------------------------------------------------------------------------


KEPT_FP32 = "decoder.layers.1.layers.1"  # a ConvTranspose1d
W8A16 = "decoder.layers.0"
INT4_CONV = "decoder.layers.4"


@pytest.fixture(scope="module")
def mixed(specs, tmp_path_factory):
    spec = specs["vae_decoder"]
    plan = {fqn: W8A8 for fqn in quantizable_leaves(spec.module)}
    plan[KEPT_FP32] = LayerPrecision("fp32", "fp32")
    plan[W8A16] = LayerPrecision("int8", "fp16")
    plan[INT4_CONV] = LayerPrecision("int4", "int8")
    directory = tmp_path_factory.mktemp("mixed")
    art = get_target("onnx").export(spec, precision="fp32", plan=plan,
                                    calib=calibration_feeds(spec), out_dir=directory)
    return art, directory, plan


def test_layer_kept_fp32_has_no_qdq(mixed):
    art, directory, _ = mixed
    layer = art.details["lowering"]["layers"][KEPT_FP32]
    assert layer["honoured"] and layer["applied"]["weights"] == "fp32"
    assert layer["applied"]["activations"] == "fp32"
    model = onnx.load(directory / art.path)
    (row,) = art.details["quantization"]["nodes"][KEPT_FP32]
    assert row["op"] == "ConvTranspose"
    act, weight = node_inputs(model, row["node"])
    assert weight is None  # straight from the float initializer
    assert act is None or act.op_type != "DequantizeLinear"
    initializers = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == row["node"])
    assert initializers[node.input[1]].data_type == onnx.TensorProto.FLOAT


def test_fallbacks_are_reported_with_reasons(mixed, specs):
    art, directory, plan = mixed
    report = art.details["lowering"]
    assert sorted(report["differs"]) == sorted([W8A16, INT4_CONV])
    # ONNX Runtime stores W8A16 weights as int8 (weight-only DQ, folded at load), activations float.
    w8a16 = report["layers"][W8A16]
    assert w8a16["applied"] == {"weights": "int8", "activations": "fp32", "granularity": "per_channel"}
    assert "W8A16" in w8a16["why"] and "weight-only" in w8a16["why"]
    model = onnx.load(directory / art.path)
    (row,) = art.details["quantization"]["nodes"][W8A16]
    act, weight = node_inputs(model, row["node"])
    assert weight is not None and weight.op_type == "DequantizeLinear"
    assert act is None or act.op_type != "DequantizeLinear"
    int4 = report["layers"][INT4_CONV]
    assert (int4["applied"]["weights"], int4["applied"]["activations"]) == ("int8", "int8")
    assert int4["why"].startswith("no INT4 convolution in ORT/TensorRT; int8 applied")
    assert report["honoured"] == len(plan) - 2
    assert art.precision == f"int8w/int8a x{len(plan) - 2} + int8w/fp32a x1 + fp32w/fp32a x1"
    assert ort_sqnr(specs["vae_decoder"], directory / art.path) > MIN_SQNR_W8A8_DB


def test_plans_with_fp16_precision_are_refused(specs, tmp_path):
    spec = specs["vae_decoder"]
    plan = {fqn: W8A8 for fqn in quantizable_leaves(spec.module)}
    for target in QDQ_TARGETS:
        with pytest.raises(ValueError, match="precision fp32"):
            get_target(target).export(spec, precision="fp16", plan=plan,
                                      calib=calibration_feeds(spec, 2), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# INT4 Linear weights (the tiny models' Linears have K = 8: a small module of its own)
# ---------------------------------------------------------------------------------------------


class LinearStack(nn.Module):
    """A Linear on a 3-D input (exported as MatMul, K = 128), one on a 2-D input (Gemm, K = 64),
    one with K = 48 (no TensorRT INT4 block fits) and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 64)
        self.b = nn.Linear(64, 16)
        self.c = nn.Conv1d(16, 16, 3, padding=1)
        self.d = nn.Linear(48, 16)

    def forward(self, x, e, f):
        return self.c(self.a(x)) + self.b(e)[:, :, None] + self.d(f)[:, :, None]


INT4_PLAN = {"a": LayerPrecision("int4", "fp16"), "b": LayerPrecision("int4", "int8"),
             "c": LayerPrecision("int4", "int8"), "d": LayerPrecision("int4", "fp32")}


@pytest.fixture(scope="module")
def linear_spec():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 128, generator=g), torch.randn(1, 64, generator=g),
              torch.randn(1, 48, generator=g))
    return ComponentSpec("linear_stack", LinearStack().eval(), inputs, ("x", "e", "f"), ("y",))


@pytest.fixture(scope="module")
def int4(linear_spec, tmp_path_factory):
    out = {}
    for target in QDQ_TARGETS:
        directory = tmp_path_factory.mktemp(f"int4_{target}")
        art = get_target(target).export(linear_spec, precision="fp32", plan=INT4_PLAN,
                                        calib=calibration_feeds(linear_spec, 4), out_dir=directory)
        out[target] = (art, directory)
    return out


@pytest.mark.parametrize("target", QDQ_TARGETS)
def test_int4_linear_weights_are_block_dequantized(target, int4, linear_spec):
    art, directory = int4[target]
    model = onnx.load(directory / art.path)
    assert qdq.opset_of(model) == 21 == art.details["opset"]
    layers = art.details["lowering"]["layers"]
    applied = {n: (v["applied"]["weights"], v["applied"]["activations"]) for n, v in layers.items()}
    assert applied == {"a": ("int4", "fp32"), "b": ("int4", "fp32"), "c": ("int8", "int8"),
                       "d": ("fp32", "fp32")}
    assert "weight-only" in layers["b"]["why"]
    assert "K=48" in layers["d"]["why"]
    initializers = {i.name: i for i in model.graph.initializer}
    blocks = {}
    for fqn in ("a", "b"):
        (row,) = art.details["quantization"]["nodes"][fqn]
        act, weight = node_inputs(model, row["node"])
        assert row["op"] == "MatMul" and weight.op_type == "DequantizeLinear"
        assert act is None or act.op_type != "DequantizeLinear"  # weight-only
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT4
        assert numpy_helper.to_array(initializers[weight.input[1]]).min() > 0
        blocks[fqn] = row["block_size"]
    assert blocks == {"a": 128, "b": 64}
    problems = qdq_problems(model)
    if target == "onnx":  # ORT's form, not TensorRT's: asymmetric int8 activations, an INT32 bias
        assert all("nonzero zero point" in p or "UINT8" in p or "INT32 quantization" in p for p in problems)
    else:
        assert problems == []
    snr = ort_sqnr(linear_spec, directory / art.path)
    assert MIN_SQNR_INT4_DB < snr < 60.0, f"{target}: SQNR {snr:.1f} dB"


def test_tensorrt_export_refuses_a_graph_that_breaks_the_rules(linear_spec, tmp_path, monkeypatch):
    # Without the positive-scale rewrite, MatMulNBitsQuantizer's signed INT4 scales remain.
    from targets import qdq_passes

    monkeypatch.setattr(qdq_passes, "positive_int4_scales", lambda model, weights: None)
    with pytest.raises(ValueError, match="scales must all be positive"):
        get_target("tensorrt").export(linear_spec, precision="fp32", plan=INT4_PLAN,
                                      calib=calibration_feeds(linear_spec, 2), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The TensorRT Q/DQ checker rejects what TensorRT would
# ---------------------------------------------------------------------------------------------


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_checker_rejects_a_nonzero_zero_point(w8a8):
    art, directory = w8a8["tensorrt", "vae_decoder"]
    model = onnx.load(directory / art.path)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in model.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    problems = qdq_problems(model)
    assert problems and all("nonzero zero point" in p for p in problems)


def test_checker_rejects_a_wrong_per_channel_axis(w8a8):
    art, directory = w8a8["tensorrt", "vae_decoder"]
    model = onnx.load(directory / art.path)
    initializers = {i.name: i for i in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    # A square conv weight [C, C, k, 1]: axis 1 has as many channels, so only the axis rule fails.
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in initializers and consumers[n.output[0]].op_type == "Conv"
              and initializers[n.input[0]].dims[0] == initializers[n.input[0]].dims[1])
    axis = next(a for a in dq.attribute if a.name == "axis")
    assert axis.i == 0
    axis.i = 1
    problems = qdq_problems(model)
    assert len(problems) == 1 and "per-channel axis 1" in problems[0] and "axis 0" in problems[0]


def test_checker_rejects_int4_blocks_of_32(int4):
    art, directory = int4["tensorrt"]
    model = onnx.load(directory / art.path)
    initializers = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and initializers[n.input[0]].data_type == onnx.TensorProto.INT4)
    k, n = initializers[dq.input[0]].dims
    scale = initializers[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(np.full((k // 32, n), 0.01, np.float32), scale.name))
    next(a for a in dq.attribute if a.name == "block_size").i = 32
    problems = qdq_problems(model)
    assert len(problems) == 1 and "block size 32" in problems[0]


def test_checker_rejects_int4_activations_and_qoperator_ops(int4):
    art, directory = int4["tensorrt"]
    model = onnx.load(directory / art.path)
    bad = _copy(model)
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in bad.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(onnx.helper.make_tensor(zp.name, onnx.TensorProto.INT4, [], [0]))
    assert any("INT4 on an activation" in p for p in qdq_problems(bad))
    bad = _copy(model)
    matmul = next(n for n in bad.graph.node if n.op_type == "MatMul")
    matmul.op_type, matmul.domain = "MatMulNBits", "com.microsoft"
    assert any("MatMulNBits" in p for p in qdq_problems(bad))


# ---------------------------------------------------------------------------------------------
# Engine build settings for Q/DQ graphs
# ---------------------------------------------------------------------------------------------


def test_build_script_builds_qdq_graphs_strongly_typed(w8a8, tmp_path):
    art, _ = w8a8["tensorrt", "vae_decoder"]
    source = write_build_script(tmp_path, [art]).read_text()
    assert (tmp_path / BUILD_SCRIPT).is_file()
    entries = json.loads((tmp_path / ENGINES_FILE).read_text())
    assert entries == [{"component": "vae_decoder", "onnx": art.path, "plan": art.details["plan"],
                        "fp16": False, "qdq": True}]
    assert "STRONGLY_TYPED" in source and "BuilderFlag.INT8" in source
    with pytest.raises(ValueError, match="fp16 does not apply"):
        build_engine(tmp_path / art.path, tmp_path / "x.plan", fp16=True, qdq=True)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime integer kernels: the optimised session graph, read back
# ---------------------------------------------------------------------------------------------


def optimised_ops(path, level: str) -> dict[str, int]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(path.with_suffix(f".{level}.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    return {n.name: n.op_type for n in optimised.graph.node}


def test_w8a8_onnx_runs_integer_kernels_where_the_report_says(w8a8, specs):
    """The optimised ORT session graph (ORT_ENABLE_EXTENDED) holds the integer ops the lowering
    report claims, node by node; every planned node left float has a reason; BASIC fuses nothing."""
    art, directory = w8a8["onnx", "denoiser"]
    report = art.details["quantization"]["ort_kernels"]
    after = optimised_ops(directory / art.path, "ORT_ENABLE_EXTENDED")
    rows = [row for rows in report["layers"].values() for row in rows]
    integer = [row for row in rows if row["runs_as"] in ("QLinearConv", "QGemm", "QLinearMatMul")]
    assert len(integer) == report["integer_nodes"] > 0
    assert sum(report["after"]["integer"].values()) >= len(integer)
    for row in rows:
        assert after.get(row["node"], "fused away") == row["runs_as"], row
        assert (row["runs_as"] in ("QLinearConv", "QGemm", "QLinearMatMul")) != ("why" in row), row
    # A QLinearConv's output kept its Q/DQ by measurement (QGemm may write float).
    selection = art.details["quantization"]["output_selection"]
    for row in integer:
        if row["runs_as"] == "QLinearConv":
            assert selection["nodes"][row["node"]]["output"] == "int8"
            assert selection["nodes"][row["node"]]["joint_sqnr_db"] >= selection["min_sqnr_db"]
    conv_out = next(r for r in report["layers"]["conv_out"])
    assert conv_out["runs_as"] == "Conv" and "graph's output" in conv_out["why"]
    basic = optimised_ops(directory / art.path, "ORT_ENABLE_BASIC")
    assert not {"QLinearConv", "QGemm", "QLinearMatMul"} & set(basic.values())
    # The fused kernels compute what the unfused graph computes (same integers, same scales).
    assert report["fused_vs_unfused_sqnr_db"] is None or report["fused_vs_unfused_sqnr_db"] > 40.0


def test_runtime_py_runs_the_integer_kernels_the_export_found(w8a8):
    """The device side takes the export's word: a component whose report counts integer nodes is
    loaded at the fusing level, and runs there close to the unfused graph; a float one stays BASIC."""
    from runtime_py.runners import load_runner
    from runtime_py.verify import runner_options

    art, directory = w8a8["onnx", "denoiser"]
    component = {"details": art.details}
    assert runner_options(component) == {"optimization": "ORT_ENABLE_EXTENDED"}
    assert runner_options({"details": {"quantization": None}}) == {}
    fused = load_runner("onnx", directory / art.path, threads=1, **runner_options(component))
    plain = load_runner("onnx", directory / art.path, threads=1)
    assert (fused.optimization, plain.optimization) == ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC")
    rng = np.random.default_rng(0)
    feed = {name: (rng.random(shape) if name == "t" else rng.standard_normal(shape)).astype(dtype)
            for name, (shape, dtype) in plain.input_specs.items()}
    (a,), (b,) = fused.run(feed).values(), plain.run(feed).values()
    assert 10 * np.log10(np.sum(b**2) / np.sum((a - b) ** 2)) > 40.0
    with pytest.raises(ValueError, match="optimisation level"):
        load_runner("onnx", directory / art.path, optimization="FAST")


def test_w8a8_tensorrt_form_keeps_float_outputs_and_biases(w8a8):
    """The integer-kernel node unit is ONNX Runtime's only: TensorRT's graph keeps Q/DQ on the
    layers' inputs, float biases and float outputs, and passes its checker."""
    art, directory = w8a8["tensorrt", "denoiser"]
    model = onnx.load(directory / art.path)
    initializers = {i.name: i for i in model.graph.initializer}
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in initializers.values())
    assert art.details["quantization"]["output_selection"] is None
    assert qdq_problems(model) == []
