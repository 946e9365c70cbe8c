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
    plan["mid.0.conv1"] = LayerPrecision("int4", "int8")  # a Conv1d: falls back to int8
    plan["mid.0.conv2"] = LayerPrecision("int8", "fp16")  # W8A16: float (no such XNNPACK kernel)
    feeds = _feeds(spec)
    out = tmp_path_factory.mktemp("et-quant")
    art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=out)
    return spec, plan, feeds, out, art


def test_lowering_report_is_read_from_the_graph(denoiser_export):
    spec, plan, _, _, art = denoiser_export
    report = art.details["lowering"]["layers"]
    assert set(report) == set(plan)
    assert report["down.0.res.0.conv1"]["honoured"] and report["down.0.res.0.conv1"]["applied"]["weights"] == "int8"
    assert report["conv_in"]["applied"]["weights"] == "fp32" and "fp32" in report["conv_in"]["why"]
    assert report["time_mlp.0"]["applied"]["weights"] == "int4"
    assert report["mid.0.conv1"]["applied"]["weights"] == "int8" and "4-bit" in report["mid.0.conv1"]["why"]
    assert report["mid.0.conv2"]["applied"]["weights"] == "fp32"
    assert "W8A16_ON_XNNPACK" in report["mid.0.conv2"]["why"]
    assert art.details["lowering"]["differs"] == sorted(
        ["conv_in", "mid.0.conv1", "mid.0.conv2"], key=list(plan).index)


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
    fp32 = get_target("executorch").export(spec, precision="fp32", plan=None, calib=None, out_dir=tmp_path)
    assert (out / art.path).stat().st_size < (tmp_path / fp32.path).stat().st_size


def test_w8a16_can_lower_as_dynamic_int8_with_conv1d_as_conv2d(specs, tmp_path, monkeypatch):
    import targets.executorch as et

    monkeypatch.setattr(et, "W8A16_ON_XNNPACK", "dynamic")
    spec = specs["vae_decoder"]
    leaves = list(quantizable_leaves(spec.module))
    plan = {n: LayerPrecision("fp32", "fp32", "per_tensor") for n in leaves}
    plan[leaves[2]] = LayerPrecision("int8", "fp16")  # a Conv1d: dynamic needs the Conv2d form
    art = et.export(spec, precision="fp32", plan=plan, calib=None, out_dir=tmp_path)
    layer = art.details["lowering"]["layers"][leaves[2]]
    assert layer["applied"]["weights"] == "int8" and "dynamic" in layer["why"]
    assert art.details["delegation"]["ops_delegated"] > 0


def test_float_layers_keep_float_inputs_next_to_quantized_ones(specs, tmp_path):
    # conv_in reads cat([x, cond]) whose qparams the quantizer shares with quantized neighbours:
    # kept float, it must still lower (XNNPACK refuses float weights behind a dequantize).
    spec = specs["vae_decoder"]
    plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
    first = next(iter(plan))
    plan[first] = LayerPrecision("fp32", "fp32", "per_tensor")
    art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=_feeds(spec), out_dir=tmp_path)
    report = art.details["lowering"]
    assert report["layers"][first]["applied"]["weights"] == "fp32" and report["layers"][first]["honoured"]
    assert report["honoured"] == len(plan)
    assert art.details["delegation"]["ops_delegated"] > 0
