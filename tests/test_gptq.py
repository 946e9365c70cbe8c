"""GPTQ rounding (calibration/gptq.py): convolutions as Linear layers, Algorithm 1 against
round-to-nearest on correlated inputs, the grid, determinism, and the rounding file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibration import gptq


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows x = A z with a random mixing A: strongly correlated columns, as layer inputs are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    latent = torch.randn(n, k, generator=g) * torch.linspace(3.0, 0.05, k)  # a decaying spectrum
    return latent @ mix.T


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(12, 5),
    lambda: nn.Conv1d(6, 5, 3, padding=1),
    lambda: nn.Conv1d(6, 5, 4, stride=2, padding=1),
    lambda: nn.Conv1d(6, 5, 3, dilation=3, padding=3),
    lambda: nn.Conv1d(6, 5, 1),
    lambda: nn.ConvTranspose1d(6, 5, 4, stride=2, padding=1),
    lambda: nn.ConvTranspose1d(6, 5, 3, stride=3, padding=0, output_padding=1),
    lambda: nn.ConvTranspose1d(6, 5, 5, stride=2, padding=2, dilation=2),
    lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
], ids=["linear", "conv", "conv-stride", "conv-dilation", "conv-k1", "convT", "convT-outpad", "convT-dilation",
        "conv2d"])
def test_convolution_is_the_linear_over_unfolded_inputs(make):
    torch.manual_seed(0)
    layer = make().double()
    shape = {nn.Linear: (2, 3, 12), nn.Conv2d: (2, 3, 7, 9)}.get(type(layer), (2, 6, 11))
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    rows = gptq.unfold_input(layer, x)
    w = gptq.weight_as_linear(layer)
    out = rows @ w.T + layer.bias
    # rows are (batch, positions...) in order; the layer's output has channels on axis 1 (last for Linear)
    ref = y.reshape(-1, y.shape[-1]) if isinstance(layer, nn.Linear) else y.movedim(1, -1).reshape(-1, y.shape[1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(gptq.linear_as_weight(layer, w), layer.weight.detach())


@pytest.mark.parametrize("weights,group_size", [("int4", None), ("int4", 16), ("int8", None)])
def test_gptq_output_error_is_at_most_rtns_on_correlated_inputs(weights, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64, dtype=torch.float64)
    x = _correlated_inputs(2048, 64, seed=1).double()
    h = 2 * x.T @ x / x.shape[0]
    rtn = gptq.rtn_quantize(w, weights, group_size=group_size)
    ours = gptq.gptq_quantize(w, h, weights, group_size=group_size, block_size=16)
    e_rtn = gptq.output_error(w, rtn.dequantize(), h)
    e_gptq = gptq.output_error(w, ours.dequantize(), h)
    # the objective from H agrees with ‖WX − ŴX‖² on the data itself
    direct = float(((x @ (w - ours.dequantize().double()).T) ** 2).sum() / x.shape[0])
    assert e_gptq == pytest.approx(direct, rel=1e-9)
    assert e_gptq <= e_rtn, (e_gptq, e_rtn)
    if weights == "int4" and group_size is None:
        assert e_gptq < 0.5 * e_rtn, f"GPTQ {e_gptq:.4g} vs RTN {e_rtn:.4g}: expected a clear gain at int4"


@pytest.mark.parametrize("weights,group_size,per_tensor", [("int4", None, False), ("int4", 8, False),
                                                            ("int8", None, False), ("int8", None, True)])
def test_integers_lie_on_the_grid_and_rounding_is_deterministic(weights, group_size, per_tensor):
    torch.manual_seed(0)
    w = torch.randn(10, 40) * torch.linspace(0.1, 2.0, 40)
    x = _correlated_inputs(500, 40, seed=2)
    h = 2 * x.double().T @ x.double() / 500
    a = gptq.gptq_quantize(w, h, weights, group_size=group_size, per_tensor=per_tensor, block_size=12)
    b = gptq.gptq_quantize(w.clone(), h.clone(), weights, group_size=group_size, per_tensor=per_tensor,
                           block_size=12)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    qmax = gptq.QMAX[weights]
    assert a.q.dtype == torch.int8 and int(a.q.abs().max()) <= qmax
    assert a.scale.dtype == torch.float32 and bool((a.scale > 0).all())
    groups = 1 if group_size is None else -(-40 // group_size)
    assert a.scale.shape == (10, groups)
    if per_tensor:
        assert torch.unique(a.scale).numel() == 1
    # Ŵ is exactly q·s in float32: what a DequantizeLinear of the stored integers gives
    deq = a.q.float() * a.scale_per_column()
    assert torch.equal(a.dequantize(), deq)


def test_block_size_changes_nothing_but_speed():
    torch.manual_seed(0)
    w = torch.randn(8, 48, dtype=torch.float64)
    x = _correlated_inputs(400, 48, seed=3).double()
    h = 2 * x.T @ x / 400
    ref = gptq.gptq_quantize(w, h, "int4", block_size=48)
    for b in (1, 7, 16):
        got = gptq.gptq_quantize(w, h, "int4", block_size=b)
        # lazy batching reorders float sums only; integers may differ at exact ties, errors agree
        assert gptq.output_error(w, got.dequantize(), h) == pytest.approx(
            gptq.output_error(w, ref.dequantize(), h), rel=1e-6)


def test_round_layers_writes_and_reads_back_every_width(tmp_path):
    from calibration.precision import LayerPrecision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.SiLU(), nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1),
                          nn.SiLU(), nn.Conv1d(6, 4, 1)).eval()
    g = torch.Generator().manual_seed(1)
    feeds = [(torch.randn(2, 4, 16, generator=g).cumsum(-1) / 4,) for _ in range(3)]
    assign = {"0": LayerPrecision("int4", "int8"), "2": LayerPrecision("int8", "fp16"),
              "4": LayerPrecision("fp16", "fp16", "per_tensor")}
    roundings, figures = gptq.round_layers(model, feeds, assign)
    assert set(roundings) == {"0", "2"} and set(roundings["0"]) == {"int4", "int8"}
    assert roundings["2"]["int8"].channel_axis == 1 and roundings["2"]["int8"].q.shape == model[2].weight.shape
    for name in roundings:
        for width, f in figures[name].items():
            if width != "rows":
                assert f["relative_output_error"] <= f["relative_output_error_rtn"] + 1e-12
    digest = gptq.write_rounding(tmp_path / "r.safetensors", roundings, component="denoiser")
    back = gptq.read_rounding(tmp_path / "r.safetensors", sha256=digest)
    for name, widths in roundings.items():
        for width, r in widths.items():
            assert torch.equal(back[name][width].q, r.q) and torch.equal(back[name][width].scale, r.scale)
    # the dequantized weight in the layer's own layout is Ŵ of the linear view
    r = roundings["2"]["int8"]
    lin = gptq.weight_as_linear(model[2], r.dequantize())
    assert torch.equal(lin, (gptq.weight_as_linear(model[2], r.q).double()
                             * r.scale.double()[:, None]).float())
    with pytest.raises(ValueError, match="sha256"):
        gptq.read_rounding(tmp_path / "r.safetensors", sha256="0" * 64)
    with pytest.raises(ValueError, match="holds"):
        gptq.rounding_for(back, "2", "int4", target="test")


# ------------------------------------------------------------------- the rounding through the targets


def _pte_integer_weights(path) -> list[dict]:
    """Every channelwise int8 / int4 weight inside the XNNPACK delegates of a .pte, read from the
    file: integers (int4 unpacked: low nibble first, stored with an offset of 8) and scales."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    import numpy as np
    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize as xnn
    from executorch.exir._serialize._flatbuffer import _get_flatc_path
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    named = pte.named_data

    def data(key):
        return bytes(named.buffers[named.pte_data[key].buffer_index])

    schema = Path(xnn.__file__).parent / "schema.fbs"
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for delegate in pte.program.backend_delegate_data:
            blob = delegate.data
            header = xnn.XNNHeader.from_bytes(blob[:xnn.XNNHeader.EXPECTED_LENGTH])
            (Path(tmp) / "g.bin").write_bytes(
                blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
            subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--raw-binary", "-o", tmp, str(schema),
                            "--", str(Path(tmp) / "g.bin")], check=True, capture_output=True)
            graph = json.loads((Path(tmp) / "g.json").read_text())
            constants = graph.get("constant_data", [])
            for value in graph["xvalues"]:
                if value["xvalue_union_type"] != "XNNQuantizedTensorValue":
                    continue
                tensor = value["xvalue_union"]["tensor_value"]
                kind = tensor.get("datatype")
                if not tensor.get("constant_buffer_idx") or kind not in ("xnn_datatype_qcint8", "xnn_datatype_qcint4"):
                    continue
                raw = np.frombuffer(data(constants[tensor["constant_buffer_idx"]]["named_key"]), np.uint8)
                if kind == "xnn_datatype_qcint4":
                    q = np.stack([raw & 15, raw >> 4], -1).reshape(-1).astype(np.int16) - 8
                else:
                    q = raw.view(np.int8).astype(np.int16)
                params = value["xvalue_union"]["quant_params"]
                scale = np.frombuffer(data(constants[params["scale_buffer_idx"]]["named_key"]), np.float32)
                out.append({"kind": kind, "q": q.reshape(tensor["dims"]), "scale": scale})
    return out


def _xnnpack_layout(layer, q: torch.Tensor):
    """The rounding's integers as XNNPACK stores the layer's weight here."""
    if isinstance(layer, nn.ConvTranspose1d):  # (in, out, k) → (out, k, 1, in)
        return q.permute(1, 2, 0).unsqueeze(2).numpy()
    if isinstance(layer, nn.Conv1d):  # run as a time-major Linear: (out, k·in), tap-major
        return q.permute(0, 2, 1).reshape(q.shape[0], -1).numpy()
    return q.numpy()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.lin = nn.Linear(64, 16)  # K = 64: an INT4 block in ONNX
        self.up = nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)

    def forward(self, x, c):
        y = self.conv(x) + self.lin(c).unsqueeze(-1)
        return self.up(torch.nn.functional.silu(y))


def _rounded_block():
    from calibration.plan import PlanAssignment
    from calibration.precision import LayerPrecision
    from toolkit.components import ComponentSpec

    torch.manual_seed(0)
    module = _Block().eval()
    spec = ComponentSpec("block", module, (torch.randn(1, 8, 32), torch.randn(1, 64)), ("x", "c"), ("y",))
    g = torch.Generator().manual_seed(1)
    feeds = [(torch.randn(1, 8, 32, generator=g).cumsum(-1) / 4, _correlated_inputs(1, 64, seed=i).float())
             for i in range(6)]
    plan = {"conv": LayerPrecision("int4", "int8"), "lin": LayerPrecision("int4", "int8"),
            "up": LayerPrecision("int4", "int8")}
    rounding, _ = gptq.round_layers(module, feeds, plan)
    # RTN would give other integers: otherwise the read-back below proves nothing
    rtn = gptq.rtn_quantize(gptq.weight_as_linear(module.conv), "int4")
    assert not torch.equal(gptq.linear_as_weight(module.conv, rtn.q), rounding["conv"]["int4"].q)
    return spec, PlanAssignment(plan, rounding=rounding), feeds


def test_executorch_program_carries_the_gptq_integers_exactly(tmp_path):
    from targets import get_target

    spec, plan, feeds = _rounded_block()
    art = get_target("executorch").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)
    schemes = art.details["lowering"]["schemes"]
    assert schemes == {"conv": "int4_frame", "lin": "int4_frame", "up": "int8_static"}
    stored = _pte_integer_weights(tmp_path / art.path)
    expected = {"conv": ("xnn_datatype_qcint4", plan.rounding["conv"]["int4"]),
                "lin": ("xnn_datatype_qcint4", plan.rounding["lin"]["int4"]),
                # no 4-bit transposed convolution on XNNPACK: the plan's int8 rounding, not a fresh RTN
                "up": ("xnn_datatype_qcint8", plan.rounding["up"]["int8"])}
    assert len(stored) == len(expected)
    for name, (kind, r) in expected.items():
        want = _xnnpack_layout(spec.module.get_submodule(name), r.q)
        hits = [s for s in stored if s["kind"] == kind and s["q"].shape == want.shape
                and (s["q"] == want).all() and (s["scale"] == r.scale.numpy()).all()]
        assert len(hits) == 1, f"{name}: the .pte does not hold the plan's {kind} integers and scales"


def test_onnx_graph_carries_the_gptq_integers_exactly(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from targets import get_target

    spec, plan, feeds = _rounded_block()
    art = get_target("onnx").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)
    quant = art.details["quantization"]
    assert quant["rounding"] == {"method": "gptq", "layers": {"conv": "int8", "lin": "int4", "up": "int8"}}
    model = onnx.load(str(tmp_path / art.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for layer, width in quant["rounding"]["layers"].items():
        r = plan.rounding[layer][width]
        for row in quant["nodes"][layer]:
            dq = producers[by_name[row["node"]].input[1]]
            q, scale = inits[dq.input[0]].astype(np.int16), inits[dq.input[1]]
            want_q = r.q.numpy() if q.shape == tuple(r.q.shape) else r.q.numpy().T
            assert np.array_equal(q, want_q), layer
            want_s = r.scale.numpy() if scale.ndim == 1 else np.repeat(r.scale.numpy()[None], scale.shape[0], 0)
            assert np.array_equal(scale, want_s), layer


def test_core_ml_refuses_a_gptq_plan_rather_than_rounding_again(tmp_path):
    from targets import get_target

    spec, plan, feeds = _rounded_block()
    with pytest.raises(ValueError, match="GPTQ"):
        get_target("coreml").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)


def test_fake_quantization_applies_the_plans_integers():
    from calibration.fakequant import quantized_copy

    spec, plan, _ = _rounded_block()
    q = quantized_copy(spec.module, plan, {n: (-4.0, 4.0) for n in plan})
    for name, widths in plan.rounding.items():
        assert torch.equal(q.get_submodule(name).weight, widths[plan[name].weights].dequantize())


@pytest.fixture(scope="module")
def gptq_plan(tmp_path_factory):
    """``toolkit plan --preset w4a8 --rounding gptq --calib C`` on a tiny seeded checkpoint."""
    import json

    from calibration.sampling import calibrate
    from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint
    from toolkit.cli import main
    from toolkit.data.synth import write_synth_dataset
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gptq-plan")
    save_checkpoint(root / "ckpt", Pipeline(config=PipelineConfig(name="tiny", default_steps=2),
                                            denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                                            vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval()))
    pipe = load_checkpoint(root / "ckpt")
    write_synth_dataset(root / "synth", n=2, seconds=1.0, sample_rate=8000, seed=0, progress=False)
    calib = calibrate(pipe, root / "synth", strategy="uniform", size=6, steps=2, seed=0, out_dir=root / "calib",
                      show_progress=False, augment=False)
    assert main(["plan", "--preset", "w4a8", "--rounding", "gptq", "--calib", str(calib),
                 "--out", str(root / "w4a8.json")]) == 0
    return pipe, calib, json.loads((root / "w4a8.json").read_text()), root


def test_plan_verb_writes_the_rounding_next_to_the_plan(gptq_plan):
    from calibration.plan import component_assignment

    pipe, _, plan, root = gptq_plan
    section = plan["rounding"]
    entry = section["components"]["denoiser"]
    assert section["method"] == "gptq" and (root / entry["file"]).is_file()
    assert entry["sha256"] == gptq.sha256_file(root / entry["file"])
    assign = component_assignment(plan, "denoiser", pipe.denoiser)
    int_layers = {n for n, p in assign.items() if p.weights in ("int8", "int4")}
    assert set(assign.rounding) == int_layers and int_layers
    # the layer output error never grows over RTN's on the calibration inputs (per layer, per width)
    for name, row in entry["layers"].items():
        for width, f in row.items():
            if width != "rows":
                assert f["relative_output_error"] <= f["relative_output_error_rtn"] * (1 + 1e-9), (name, width)


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_exported_denoiser_carries_the_plans_integers(gptq_plan, target, tmp_path):
    import numpy as np

    from calibration.feeds import calibration_feeds
    from calibration.plan import component_assignment
    from targets import get_target
    from toolkit.components import component_specs

    pipe, calib, plan, _ = gptq_plan
    spec = component_specs(pipe)["denoiser"]
    assign = component_assignment(plan, "denoiser", spec.module)
    feeds = calibration_feeds(pipe, calib, "denoiser", limit=4)
    art = get_target(target).export(spec, precision="fp32", plan=assign, calib=feeds, out_dir=tmp_path)
    if target == "executorch":
        stored = _pte_integer_weights(tmp_path / art.path)
        kinds = art.details["lowering"]["schemes"]
        for name, kind in kinds.items():
            if kind == "float":
                continue
            width = "int4" if kind == "int4_frame" else "int8"
            r = assign.rounding[name][width]
            want = _xnnpack_layout(spec.module.get_submodule(name), r.q)
            assert any(s["q"].shape == want.shape and (s["q"] == want).all()
                       and (s["scale"] == r.scale.numpy()).all() for s in stored), name
        return
    import onnx
    from onnx import numpy_helper

    quant = art.details["quantization"]
    applied = quant["rounding"]["layers"]
    assert set(applied) == {n for n, e in art.details["lowering"]["layers"].items()
                            if e["applied"]["weights"] in ("int8", "int4")}
    model = onnx.load(str(tmp_path / art.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for layer, width in applied.items():
        r = assign.rounding[layer][width]
        for row in quant["nodes"][layer]:
            dq = producers[by_name[row["node"]].input[1]]
            q = inits[dq.input[0]].astype(np.int16)
            assert np.array_equal(q, r.q.numpy() if q.shape == tuple(r.q.shape) else r.q.numpy().T), layer


def test_tensorrt_graph_carries_the_gptq_integers_exactly(tmp_path):
    """TensorRT's graph (1-D convolutions as (k x 1) 2-D ones) gets the plan's integers, not RTN."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from targets import get_target

    spec, plan, feeds = _rounded_block()
    art = get_target("tensorrt").export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=tmp_path)
    quant = art.details["quantization"]
    assert quant["rounding"]["method"] == "gptq" and quant["rounding"]["layers"]
    model = onnx.load(str(tmp_path / art.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    for layer, width in quant["rounding"]["layers"].items():
        want = plan.rounding[layer][width].q.numpy()
        for row in quant["nodes"][layer]:
            q = inits[producers[by_name[row["node"]].input[1]].input[0]].astype(np.int16)
            q = q[..., 0] if q.ndim == 4 else q  # the (k x 1) kernel of a rewritten Conv1d
            assert np.array_equal(q, want) or np.array_equal(q, want.T), layer
