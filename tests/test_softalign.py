import dataclasses

import pytest
import torch

from toolkit.config import ConfigError
from toolkit.diffusion import alpha_sigma
from toolkit.models.softalign import (
    SOFTALIGN_PRESETS, SoftAlignAttention, SoftAlignConfig, SoftAlignUNet, count_parameters,
    local_window_bias,
)
from toolkit.diffusion import CosineSchedule


def test_paper_config_size_and_shape():
    cfg = SOFTALIGN_PRESETS["paper"]
    assert cfg.channels == (64, 128, 256, 512) and cfg.latent_shape == (64, 1024)
    assert cfg.channels[-1] // cfg.head_dim == 8 and cfg.head_dim == 64 and cfg.window == 16
    torch.manual_seed(0)
    model = SoftAlignUNet(cfg).eval()
    assert 14e6 <= count_parameters(model) <= 16e6
    x = torch.randn(1, 64, 1024)
    with torch.no_grad():
        out = model(x, torch.tensor([0.3]), torch.randn(1, 64, 1024))
    assert out.shape == (1, 64, 1024) and torch.isfinite(out).all()


def test_tiny_is_small_and_rejects_wrong_shapes():
    model = SoftAlignUNet(SOFTALIGN_PRESETS["tiny"])
    assert count_parameters(model) < 50_000
    with pytest.raises(ValueError, match="expects x and cond"):
        model(torch.randn(1, 4, 15), torch.zeros(1), torch.randn(1, 4, 15))


@pytest.mark.parametrize("field,value", [
    ("latent_length", 1020), ("groups", 7), ("head_dim", 3), ("window", 0),
    ("cross_attn_levels", (9,)), ("channels", (64,)),
])
def test_config_validation(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(SOFTALIGN_PRESETS["paper"], **{field: value})


def test_local_window_is_sixteen_wide():
    bias = local_window_bias(64, 16)
    inside = torch.isfinite(bias)
    assert (inside.sum(dim=1)[8:-8] == 16).all()
    assert inside[20, 12] and inside[20, 27] and not inside[20, 11] and not inside[20, 28]


def test_soft_alignment_mixing_follows_sqrt_alpha_bar():
    torch.manual_seed(0)
    attn = SoftAlignAttention(32, 16, 8, 4, 4, 10000.0).eval()
    x = torch.randn(2, 32, 16)
    glob, local = attn.branches(x)
    sched = CosineSchedule()
    for t in (0.1, 0.5, 0.9):
        w, _ = alpha_sigma(torch.tensor([t, t]), sched)  # √ᾱ_t
        out = attn(x, w)
        expected = x + attn.proj(w[:, None, None] * glob + (1 - w[:, None, None]) * local)
        torch.testing.assert_close(out, expected)
    # the extremes select one branch each
    torch.testing.assert_close(attn(x, torch.ones(2)), x + attn.proj(glob))
    torch.testing.assert_close(attn(x, torch.zeros(2)), x + attn.proj(local))


def test_local_branch_ignores_far_positions():
    torch.manual_seed(0)
    attn = SoftAlignAttention(32, 32, 8, 4, 4, 10000.0).eval()
    attn.norm = torch.nn.Identity()  # GroupNorm's statistics span the whole sequence by design
    x = torch.randn(1, 32, 32)
    y = x.clone()
    y[:, :, 20:] += 5.0  # change only frames ≥ 20
    _, local_x = attn.branches(x)
    _, local_y = attn.branches(y)
    # frame 5's window is [3, 6] (plus the conv projection's ±1 receptive field): unchanged
    torch.testing.assert_close(local_x[..., :10], local_y[..., :10])
    glob_x, _ = attn.branches(x)
    glob_y, _ = attn.branches(y)
    assert not torch.allclose(glob_x[..., :10], glob_y[..., :10])


def test_vocal_conditioning_changes_output():
    torch.manual_seed(0)
    model = SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval()
    x = torch.randn(1, 4, 16)
    a = model(x, torch.tensor([0.5]), torch.randn(1, 4, 16))
    b = model(x, torch.tensor([0.5]), torch.zeros(1, 4, 16))
    assert not torch.allclose(a, b)
