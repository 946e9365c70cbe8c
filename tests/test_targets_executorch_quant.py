"""Quantized ExecuTorch programs from per-layer plans (PT2E + XNNPACKQuantizer, targets/executorch.py).

A tiny seeded denoiser and VAE decoder, random calibration feeds of the example shapes. What the
lowering report says is read back from the converted graph; the tests check it against the plan,
run the .pte through runtime_py's runner and compare with PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.fakequant import quantizable_leaves
from calibration.precision import LayerPrecision
from runtime_py.runners import load_runner
from targets import get_target
from toolkit.checkpoint import Pipeline, PipelineConfig
from toolkit.components import component_specs
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

# Output SQNR of the quantized program against PyTorch fp32 on a calibration input (measured on
# the tiny models; see the closing assertion messages for the figures).
MIN_SQNR_INT8_DB = 20.0
W8A8 = LayerPrecision("int8", "int8")


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny"),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


def _feeds(spec, n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.rand(t.shape, generator=g) if name == "t" else torch.randn(t.shape, generator=g)
                  for name, t in zip(spec.input_names, spec.example_inputs)) for _ in range(n)]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


@pytest.fixture(scope="module")
def specs():
    return component_specs(_pipeline())


@pytest.fixture(scope="module")
def denoiser_export(specs, tmp_path_factory):
    spec = specs["denoiser"]
    plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
    plan["conv_in"] = LayerPrecision("fp16", "fp16", "per_tensor")  # kept high: runs float here
    plan["time_mlp.0"] = LayerPrecision("int4", "int8")  # a Linear: XNNPACK has 4-bit linear
    plan["mid.0.conv1"] = LayerPrecision("int4", "int8")  # a Conv1d, run as a linear: 4-bit too
    plan["mid.0.conv2"] = LayerPrecision("int8", "fp16")  # W8A16: int8 activations per latent frame
    feeds = _feeds(spec)
    out = tmp_path_factory.mktemp("et-quant")
    import targets.executorch as et

    scheme = et.INT8_ACTIVATIONS_ON_XNNPACK
    et.INT8_ACTIVATIONS_ON_XNNPACK = "per_frame"  # every W8A8 layer per frame: what this module checks
    try:
        art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=out)
    finally:
        et.INT8_ACTIVATIONS_ON_XNNPACK = scheme
    return spec, plan, feeds, out, art


def test_lowering_report_is_read_from_the_graph(denoiser_export):
    spec, plan, _, _, art = denoiser_export
    report = art.details["lowering"]["layers"]
    assert set(report) == set(plan)
    assert report["down.0.res.0.conv1"]["applied"] == {"weights": "int8", "activations": "int8",
                                                       "granularity": "per_channel"}
    # int8 as asked, but with run-time scales per latent frame: not the calibrated ranges, so said.
    assert not report["down.0.res.0.conv1"]["honoured"]
    assert "calibrated ranges are not used" in report["down.0.res.0.conv1"]["why"]
    assert art.details["lowering"]["schemes"]["down.0.res.0.conv1"] == "int8_frame"
    assert report["conv_in"]["applied"]["weights"] == "fp32" and "fp32" in report["conv_in"]["why"]
    assert report["time_mlp.0"]["applied"]["weights"] == "int4"
    assert report["mid.0.conv1"]["applied"]["weights"] == "int4"
    assert "calibrated ranges are not used" in report["mid.0.conv1"]["why"]
    assert report["mid.0.conv2"]["applied"] == {"weights": "int8", "activations": "int8",
                                                "granularity": "per_channel"}
    assert "per latent frame" in report["mid.0.conv2"]["why"]
    # Beside conv_in (float) and mid.0.conv2 (W8A16 run with int8 activations), every differing layer
    # differs only in the activation scheme, and says so; static layers (none here) would be honoured.
    differs = art.details["lowering"]["differs"]
    assert {"conv_in", "mid.0.conv2"} <= set(differs)
    schemes = art.details["lowering"]["schemes"]
    for name in set(differs) - {"conv_in", "mid.0.conv2"}:
        assert schemes[name] in ("int8_frame", "int4_frame") and report[name]["applied"] == {
            **report[name]["requested"], "granularity": report[name]["applied"]["granularity"]}
    assert all(report[n]["honoured"] for n in plan if n not in differs)
    # One partitioner takes the float, static and per-frame ops together; the graph passes leave
    # nothing outside XNNPACK (tests/test_targets_executorch_graph.py checks the details).
    assert art.details["partitioner"] == "XnnpackPartitioner"
    assert art.details["delegation"]["fully_delegated"]


def test_quantized_program_runs_and_stays_close(denoiser_export, specs, tmp_path):
    spec, _, feeds, out, art = denoiser_export
    runner = load_runner("executorch", out / art.path)
    inputs = feeds[-1]
    got = next(iter(runner.run({n: t.numpy() for n, t in zip(spec.input_names, inputs)}).values()))
    with torch.no_grad():
        want = spec.module(*inputs).numpy()
    sqnr = _sqnr(want, got)
    assert sqnr > MIN_SQNR_INT8_DB, f"int8 ExecuTorch denoiser SQNR {sqnr:.1f} dB"
    assert sqnr < 60.0, "no quantization happened"  # an fp32 program is at ~120 dB


def test_int8_program_is_small_where_weights_dominate(tmp_path):
    # On the tiny model (a few KB of weights) per-delegate headers and quantization parameters
    # outweigh the weights; at 64/128 channels the int8 program is smaller.
    import dataclasses

    torch.manual_seed(0)
    config = dataclasses.replace(SOFTALIGN_PRESETS["tiny"], channels=(64, 128), head_dim=32)
    pipe = Pipeline(config=PipelineConfig(name="wide"), denoiser=SoftAlignUNet(config).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())
    spec = component_specs(pipe)["denoiser"]
    plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
    target = get_target("executorch")
    q = target.export(spec, precision="fp32", plan=plan, calib=_feeds(spec, n=2), out_dir=tmp_path / "q")
    f = target.export(spec, precision="fp32", plan=None, calib=None, out_dir=tmp_path / "f")
    ratio = (tmp_path / "q" / q.path).stat().st_size / (tmp_path / "f" / f.path).stat().st_size
    assert ratio < 0.4, f"int8 program is {ratio:.2f} of the fp32 program's bytes"


@pytest.mark.parametrize("k, stride, padding, dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (7, 1, 9, 3),
                                                         (4, 2, 1, 1)])
def test_conv1d_as_linear_is_the_same_convolution(k, stride, padding, dilation):
    from targets.executorch import conv1d_as_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(5, 6, k, stride=stride, padding=padding,
                                                dilation=dilation)).eval()
    rewritten = conv1d_as_linear(model, ["0"]).eval()
    assert isinstance(rewritten[0].linear, torch.nn.Linear)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), model(x), rtol=0, atol=1e-5)


def test_static_int8_and_float_w8a16_remain_available(specs, tmp_path, monkeypatch):
    import targets.executorch as et

    monkeypatch.setattr(et, "INT8_ACTIVATIONS_ON_XNNPACK", "static")
    monkeypatch.setattr(et, "W8A16_ON_XNNPACK", "float")
    spec = specs["vae_decoder"]
    leaves = list(quantizable_leaves(spec.module))
    plan = {n: W8A8 for n in leaves}
    plan[leaves[2]] = LayerPrecision("int8", "fp16")
    feeds = _feeds(spec)
    art = et.export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)
    lowering = art.details["lowering"]
    assert lowering["schemes"][leaves[0]] == "int8_static"
    assert lowering["layers"][leaves[2]]["applied"]["weights"] == "fp32"
    assert "W8A16_ON_XNNPACK" in lowering["layers"][leaves[2]]["why"]
    runner = load_runner("executorch", tmp_path / art.path)  # XNNPACK accepts the program
    got = next(iter(runner.run({n: t.numpy() for n, t in zip(spec.input_names, feeds[0])}).values()))
    with torch.no_grad():
        want = spec.module(*feeds[0]).numpy()
    assert _sqnr(want, got) > MIN_SQNR_INT8_DB


def test_float_layers_keep_float_inputs_and_outputs_next_to_quantized_ones(specs, tmp_path, monkeypatch):
    # Static int8: the quantizer shares qparams across cat with quantized neighbours. A float
    # layer must still read (conv_in, which reads cat([x, cond])) and write (the upsampling convs
    # that feed the skip cat) float tensors, or XNNPACK refuses the program.
    import targets.executorch as et

    monkeypatch.setattr(et, "INT8_ACTIVATIONS_ON_XNNPACK", "static")
    spec = specs["denoiser"]
    plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
    floats = ["conv_in"] + [n for n in plan if n.startswith("upsample.")]
    assert len(floats) > 1
    for n in floats:
        plan[n] = LayerPrecision("fp32", "fp32", "per_tensor")
    feeds = _feeds(spec)
    art = et.export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)
    report = art.details["lowering"]
    assert all(report["layers"][n]["applied"]["weights"] == "fp32" for n in floats)
    assert report["honoured"] == len(plan)
    runner = load_runner("executorch", tmp_path / art.path)  # "Failed to create convolution node"
    got = next(iter(runner.run({n: t.numpy() for n, t in zip(spec.input_names, feeds[0])}).values()))
    assert np.isfinite(got).all()


def test_int4_on_a_transposed_convolution_falls_back_to_int8(specs, tmp_path):
    spec = specs["vae_decoder"]
    transposed = [n for n, m in spec.module.named_modules() if isinstance(m, torch.nn.ConvTranspose1d)]
    assert transposed
    plan = {transposed[0]: LayerPrecision("int4", "int8")}
    art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=_feeds(spec, n=2),
                                          out_dir=tmp_path)
    layer = art.details["lowering"]["layers"][transposed[0]]
    assert layer["applied"]["weights"] == "int8" and "4-bit" in layer["why"]


def test_plan_without_integer_weights_still_reports_its_lowering(specs, tmp_path):
    spec = specs["vae_decoder"]
    plan = {n: LayerPrecision("fp16", "fp16", "per_tensor") for n in quantizable_leaves(spec.module)}
    art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=None, out_dir=tmp_path)
    lowering = art.details["lowering"]
    assert lowering is not None and set(lowering["layers"]) == set(plan)
    assert lowering["differs"] == list(plan) and art.details["quantizer"] is None
    assert all(e["applied"]["weights"] == "fp32" and "no integer weights" in e["why"]
               for e in lowering["layers"].values())
