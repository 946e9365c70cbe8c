"""Per-layer int8 activation schemes (calibration/act_schemes.py): the per-frame model is the lowering
targets.executorch runs, and the one-layer measurement picks per frame where static loses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibration.act_schemes import (
    choose_schemes,
    fake_quantized,
    one_layer_sqnr,
    per_frame_conv1d,
    quantize_rows,
    static_quantize,
)


@pytest.mark.parametrize("k, stride, padding, dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (7, 1, 3, 1),
                                                          (4, 2, 1, 1), (3, 1, 2, 2), (5, 3, 2, 1)])
def test_per_frame_model_is_the_time_major_linear_with_rows_quantized(k, stride, padding, dilation):
    """The measurement's per-frame arithmetic equals targets.executorch's lowering (Conv1d as a
    time-major Linear) with each row of the Linear's input quantized on its own: what XNNPACK's
    dynamically quantized kernel does."""
    from targets.executorch import conv1d_as_linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(5, 6, k, stride=stride, padding=padding, dilation=dilation)).eval()
    lowered = conv1d_as_linear(model, ["0"]).eval()
    lowered[0].linear.register_forward_pre_hook(lambda m, inp: (quantize_rows(inp[0], dim=-1),))
    x = torch.randn(2, 5, 40) * torch.logspace(-2, 1, 40)  # frames of very different sizes
    with torch.no_grad():
        want = lowered(x)
        got = per_frame_conv1d(model[0], x)
        assert not torch.allclose(want, model(x), atol=1e-4)  # the rows really were quantized
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_rows_are_quantized_each_on_its_own_range():
    rows = torch.tensor([[0.0, 1.0, 2.0], [0.0, 100.0, 200.0]])
    q = quantize_rows(rows, dim=-1)
    assert torch.allclose(q[0], rows[0], atol=2 / 255) and torch.allclose(q[1], rows[1], atol=200 / 255)
    # One range over both rows would round the small row to the large one's step.
    assert not torch.equal(quantize_rows(rows.reshape(1, -1), dim=-1).reshape(2, 3)[0], q[0])


def test_static_quantize_keeps_values_within_half_a_step():
    x = torch.linspace(-3.0, 5.0, 1001)
    step = 8.0 / 255
    assert float((static_quantize(x, -3.0, 5.0) - x).abs().max()) <= step / 2 + 1e-6
    # Outside the calibrated range, values clip: that is what static loses.
    assert float(static_quantize(torch.tensor([50.0]), -3.0, 5.0)) == pytest.approx(5.0, abs=step)


class FrameNorm(nn.Module):
    """conv → each frame scaled to unit norm → conv: the second conv's input has one size per
    frame whatever the first's had (as GroupNorm makes a U-Net's inner layers), and every frame
    counts the same at the output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        return self.b(h / h.norm(dim=1, keepdim=True).clamp_min(1e-6))


def test_one_layer_measurement_picks_per_frame_where_frames_differ_in_size():
    torch.manual_seed(0)
    model = FrameNorm().eval()
    # Frames spanning four decades (as a diffusion U-Net's input spans noise levels): one scale
    # per tensor rounds the quiet frames away, one per frame does not.
    feeds = [(torch.randn(1, 4, 64) * torch.logspace(-3, 1, 64)[torch.randperm(64)],) for _ in range(3)]
    measured = one_layer_sqnr(model, feeds, ["a", "b"])
    assert measured["a"]["static"] < 30.0 < measured["a"]["per_frame"] - 10.0, measured
    assert measured["b"]["static"] > 35.0, measured
    schemes = choose_schemes(measured, threshold_db=35.0)
    assert schemes == {"a": "per_frame", "b": "static"}
    # With a threshold, per frame is measured only where static falls below it.
    assert one_layer_sqnr(model, feeds, ["a", "b"], threshold_db=35.0)["b"]["per_frame"] is None
    # The choice pays: both layers int8 under the chosen schemes keep far more than all static.
    from calibration.fakequant import observe_ranges
    from runtime_py.metrics import snr_db

    ranges = observe_ranges(model, feeds, layers=["a", "b"])
    with torch.no_grad():
        ref = torch.cat([model(*f) for f in feeds]).numpy()
        mixed = fake_quantized(model, schemes, ranges)
        static = fake_quantized(model, {"a": "static", "b": "static"}, ranges)
        assert snr_db(ref, torch.cat([mixed(*f) for f in feeds]).numpy()) > \
            snr_db(ref, torch.cat([static(*f) for f in feeds]).numpy()) + 10.0


def test_a_layer_without_a_per_frame_lowering_is_measured_static_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(4, 4, 4, stride=2, padding=1)).eval()
    measured = one_layer_sqnr(model, [(torch.randn(1, 4, 16),)], ["0"])
    assert measured["0"]["per_frame"] is None
    assert choose_schemes(measured, threshold_db=1e9) == {"0": "static"}
    with pytest.raises(TypeError, match="no per-frame lowering"):
        fake_quantized(model, {"0": "per_frame"}, {"0": (-1.0, 1.0)})


def test_static_is_measured_on_inputs_its_ranges_did_not_see():
    """Ranges from quiet inputs clip loud ones: measured on other inputs than its ranges came from,
    static loses what it would lose on the device; per frame does not depend on the ranges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1)).eval()
    quiet = [(torch.randn(1, 4, 32),) for _ in range(2)]
    loud = [(4.0 * torch.randn(1, 4, 32),) for _ in range(2)]
    seen = one_layer_sqnr(model, loud, ["0"], range_feeds=loud)["0"]
    unseen = one_layer_sqnr(model, loud, ["0"], range_feeds=quiet)["0"]
    assert unseen["static"] < seen["static"] - 10.0, (seen, unseen)
    assert unseen["per_frame"] == pytest.approx(seen["per_frame"])


def test_per_step_quantizes_each_batch_element_on_its_own_range():
    from calibration.act_schemes import quantize_per_step

    x = torch.stack([torch.linspace(-1, 1, 64), torch.linspace(-100, 100, 64)]).reshape(2, 4, 16)
    q = quantize_per_step(x)
    assert float((q[0] - x[0]).abs().max()) <= 2 / 255  # the small element keeps its own fine step
    assert float((q[1] - x[1]).abs().max()) <= 200 / 255
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1)).eval()
    stepped = fake_quantized(model, {"0": "per_step"}, {})
    with torch.no_grad():
        got, want = stepped(x), model(x)
    for i in range(2):  # each element keeps ~8 bits of its own size (int8 weights and input)
        sqnr = 10 * torch.log10(want[i].pow(2).sum() / (got[i] - want[i]).pow(2).sum())
        assert float(sqnr) > 30.0, (i, float(sqnr))
