"""Whole-graph XNNPACK lowering (targets/xnnpack_graph.py, used by targets/executorch.py).

The graph passes must compute what the original graph computes, and leave nothing that the
installed executorch's XNNPACK partitioner refuses: no GroupNorm, split, expand or layout copy
outside a delegate, at most ``MAX_DELEGATES`` delegates, for fp32 and for both int8 schemes.
Tiny seeded components; parity floors are toolkit.parity's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibration.fakequant import quantizable_leaves
from calibration.precision import LayerPrecision
from runtime_py.runners import load_runner
from toolkit.checkpoint import Pipeline, PipelineConfig
from toolkit.components import component_specs
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet
from toolkit.parity import MIN_PARITY_SQNR_DB, MIN_QUANTIZED_PARITY_SQNR_DB

pytest.importorskip("executorch.exir")

# The goal: one component, at most this many XNNPACK delegates.
MAX_DELEGATES = 3
# Ops that must never run outside XNNPACK once the passes ran.
BREAKERS = ("native_group_norm", "_to_dim_order_copy", "_clone_dim_order", "split_with_sizes_copy",
            "expand_copy", "index.Tensor", "arange")
W8A8 = LayerPrecision("int8", "int8")


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny"),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


def _feeds(spec, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.rand(t.shape, generator=g) if name == "t" else torch.randn(t.shape, generator=g)
                  for name, t in zip(spec.input_names, spec.example_inputs)) for _ in range(n)]


@pytest.fixture(scope="module")
def specs():
    return component_specs(_pipeline())


@pytest.mark.parametrize("shape, groups", [((2, 8, 16), 4), ((1, 12, 5), 3), ((2, 6, 3, 4), 2),
                                           ((1, 4, 7), 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_reference_is_group_norm(shape, groups, affine):
    from targets.xnnpack_graph import group_norm_reference

    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(shape, generator=g) + 1.5  # an offset mean: the centred variance matters
    c = shape[1]
    weight = torch.randn(c, generator=g) if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    want = F.group_norm(x, groups, weight, bias, eps=1e-5)
    got = group_norm_reference(x, groups, weight, bias, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _edge_program(module, inputs):
    from executorch.exir import to_edge

    return to_edge(torch.export.export(module, inputs))


def _op_names(graph_module) -> list[str]:
    return [str(getattr(n.target, "__name__", n.target)) for n in graph_module.graph.nodes
            if n.op == "call_function"]


@pytest.mark.parametrize("component", ["denoiser", "vae_decoder"])
def test_passes_compute_what_the_graph_computed(component, specs):
    from targets.xnnpack_graph import whole_graph_passes

    spec = specs[component]
    edge = _edge_program(spec.module, tuple(spec.example_inputs))
    before = _op_names(edge.exported_program().graph_module)
    pass_manager, counts = whole_graph_passes()
    rewritten = edge.transform(pass_manager)
    after = _op_names(rewritten.exported_program().graph_module)
    if component == "denoiser":
        assert any("native_group_norm" in n for n in before)
        assert counts["group_norm_decomposed"] == sum("native_group_norm" in n for n in before)
        assert counts["split_to_slices"] > 0 and counts["nearest_upsample_as_cat"] == 1
    assert not [n for n in after if any(b in n for b in BREAKERS)], sorted(set(after))
    for inputs in _feeds(spec, 2):
        with torch.no_grad():
            want = spec.module(*inputs)
            got = rewritten.exported_program().module()(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_split_of_unequal_sizes_becomes_slices():
    from targets.xnnpack_graph import whole_graph_passes

    class Split(torch.nn.Module):
        def forward(self, x):
            a, b, c = torch.split(x, [2, 3, 1], dim=1)
            return a.sum(1, keepdim=True) + b.mean(1, keepdim=True) * c

    x = torch.randn(2, 6, 5)
    edge = _edge_program(Split(), (x,))
    rewritten = edge.transform(whole_graph_passes()[0])
    names = _op_names(rewritten.exported_program().graph_module)
    assert not any("split" in n for n in names) and sum("slice_copy" in n for n in names) == 3
    torch.testing.assert_close(rewritten.exported_program().module()(x), Split()(x))


def test_a_materialising_expand_is_kept():
    # An expand read by a matmul must materialise (bmm does not broadcast): left alone, and so
    # visible in the delegation record, not rewritten into something wrong.
    from targets.xnnpack_graph import whole_graph_passes

    class Broadcast(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.expand(3, 4, 5).transpose(1, 2) + k.expand(3, 4, 5).sum()

    q, k = torch.randn(3, 4, 5), torch.randn(1, 4, 5)
    edge = _edge_program(Broadcast(), (q, k))
    rewritten = edge.transform(whole_graph_passes()[0])
    torch.testing.assert_close(rewritten.exported_program().module()(q, k), Broadcast()(q, k))


def _export(spec, tmp_path, *, scheme: str | None, monkeypatch):
    import targets.executorch as et

    plan = calib = None
    if scheme is not None:
        monkeypatch.setattr(et, "INT8_ACTIVATIONS_ON_XNNPACK", scheme)
        plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
        calib = _feeds(spec, 4)
    art = et.export(spec, precision="fp32", plan=plan, calib=calib, out_dir=tmp_path)
    return art, calib


def _assert_whole(art):
    d = art.details["delegation"]
    outside = d["non_delegated_ops"]
    assert not [op for op in outside if any(b in op for b in BREAKERS)], outside
    assert 1 <= d["delegates"] <= MAX_DELEGATES, d
    assert d["fully_delegated"], outside
    # What ran where is recorded by op name, inside as well as outside.
    assert d["delegated_ops"] and all(isinstance(v, int) for v in d["delegated_ops"].values())
    assert "graph_passes" in art.details


@pytest.mark.parametrize("scheme", [None, "static", "per_frame", "per_layer"])
def test_denoiser_lowers_whole_and_matches_pytorch(scheme, specs, tmp_path, monkeypatch):
    spec = specs["denoiser"]
    if scheme == "per_layer":  # a threshold between the measured layers, so that both schemes run
        import targets.executorch as et

        plan = {n: W8A8 for n in quantizable_leaves(spec.module)}
        static = sorted(m["static_db"] for m in et.measure_schemes(spec.module, plan, _feeds(spec, 4))["layers"].values())
        monkeypatch.setattr(et, "SCHEME_THRESHOLD_DB", (static[2] + static[3]) / 2)
    art, calib = _export(spec, tmp_path, scheme=scheme, monkeypatch=monkeypatch)
    _assert_whole(art)
    if scheme is not None:
        lowering = art.details["lowering"]
        assert lowering["int8_activations"] == scheme
        if scheme == "static":
            assert lowering["honoured"] == len(lowering["layers"])
        elif scheme == "per_layer":  # per frame exactly where the recorded measurement says static loses
            measured = lowering["scheme_measurement"]
            assert set(measured["layers"]) == {n for n in lowering["layers"]
                                               if lowering["schemes"][n] in ("int8_frame", "int8_static")}
            for name, m in measured["layers"].items():
                frame = m["static_db"] < measured["threshold_db"] and m["per_frame_db"] is not None \
                    and m["per_frame_db"] > m["static_db"]
                assert m["scheme"] == ("per_frame" if frame else "static")
                assert lowering["schemes"][name] == ("int8_frame" if frame else "int8_static")
                assert (name in lowering["differs"]) == frame  # static layers honour the calibrated ranges
            assert 1 <= len(measured["per_frame"]) < len(measured["layers"])
            assert all("below" in lowering["layers"][n]["why"] for n in measured["per_frame"])
        else:  # run-time scales per latent frame: int8 as asked, but not the calibrated ranges
            dynamic = [n for n, k in lowering["schemes"].items() if k in ("int8_frame", "int4_frame")]
            assert dynamic and set(dynamic) <= set(lowering["differs"])
            assert all("calibrated ranges are not used" in lowering["layers"][n]["why"] for n in dynamic)
        assert art.details["graph_passes"]["group_norm_decomposed"] > 0
    inputs = calib[-1] if calib else _feeds(spec, 1, seed=5)[0]
    runner = load_runner("executorch", tmp_path / art.path)
    got = next(iter(runner.run({n: t.numpy() for n, t in zip(spec.input_names, inputs)}).values()))
    with torch.no_grad():
        want = spec.module(*inputs).numpy()
    floor = MIN_PARITY_SQNR_DB["fp32"] if scheme is None else MIN_QUANTIZED_PARITY_SQNR_DB
    sqnr = _sqnr(want, got)
    assert sqnr > floor, f"{scheme or 'fp32'} denoiser: {sqnr:.1f} dB"
    if scheme is not None:
        assert sqnr < 60.0, "no quantization happened"


@pytest.mark.parametrize("component, scheme", [("vae_decoder", "static"), ("vae_encoder", "per_frame")])
def test_vae_lowers_whole_quantized(component, scheme, specs, tmp_path, monkeypatch):
    spec = specs[component]
    art, calib = _export(spec, tmp_path, scheme=scheme, monkeypatch=monkeypatch)
    _assert_whole(art)
    runner = load_runner("executorch", tmp_path / art.path)
    got = next(iter(runner.run({n: t.numpy() for n, t in zip(spec.input_names, calib[-1])}).values()))
    with torch.no_grad():
        want = spec.module(*calib[-1]).numpy()
    assert _sqnr(want, got) > MIN_QUANTIZED_PARITY_SQNR_DB
