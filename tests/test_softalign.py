import dataclasses

import pytest
import torch

from toolkit.config import ConfigError
from toolkit.diffusion import CosineSchedule, alpha_sigma
from toolkit.models.softalign import (
    SOFTALIGN_PRESETS, SoftAlignAttention, SoftAlignUNet, _heads, _merge, apply_rope, attention,
    count_parameters, local_window_bias, rope_tables,
)


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
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 4, 15), torch.zeros(1), torch.randn(1, 4, 15))
    with pytest.raises(ValueError, match="expects x and cond"):
        model(torch.randn(1, 3, 16), torch.zeros(1), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="expects x and cond"):
        model(torch.randn(1, 4, 16), torch.zeros(1), torch.randn(1, 4, 32))


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


# --- any length (issue 18) -------------------------------------------------------------------------


def _dense_local(attn, x):
    """Today's (pre-issue-18) local branch: dense scores with the L×L window mask."""
    q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=1)
    q, k, v = (_heads(a, attn.n_heads) for a in (q, k, v))
    return _merge(attention(q, k, v, local_window_bias(x.shape[-1], attn.window)))


def _dense_global(attn, x):
    q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=1)
    q, k, v = (_heads(a, attn.n_heads) for a in (q, k, v))
    cos, sin = rope_tables(x.shape[-1], attn.head_dim, attn.rope_base)
    return _merge(attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))


@pytest.mark.parametrize("window", [16, 8, 5, 1])
@pytest.mark.parametrize("length", [128, 32, 200, 7])
def test_banded_local_attention_equals_masked_dense(window, length):
    torch.manual_seed(window + length)
    attn = SoftAlignAttention(32, 128, 8, window, 4, 10000.0).eval()  # trained at 128 frames
    x = torch.randn(2, 32, length)
    glob, local = attn.branches(x)
    torch.testing.assert_close(local, _dense_local(attn, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glob, _dense_global(attn, x), rtol=1e-5, atol=1e-5)


def test_rope_tables_extend_the_training_table():
    attn = SoftAlignAttention(32, 16, 8, 4, 4, 10000.0)
    cos, sin = attn.rope(48)
    assert cos.shape == (48, 8)
    torch.testing.assert_close(cos[:16], attn.rope_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin[:16], attn.rope_sin, rtol=0, atol=1e-7)


@pytest.mark.parametrize("length", [2, 16, 48, 96])
def test_unet_runs_at_any_multiple_of_its_downsampling(length):
    torch.manual_seed(0)
    model = SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval()
    x, c = torch.randn(2, 4, length), torch.randn(2, 4, length)
    with torch.no_grad():
        out = model(x, torch.tensor([0.2, 0.7]), c)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_demo_checkpoint_loads_and_runs_beyond_its_training_length():
    from toolkit.checkpoint import load_checkpoint

    pipe = load_checkpoint()
    cfg = pipe.denoiser.config
    assert cfg.latent_length == 128  # the training length stays checkpoint metadata
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.latent_channels, 4 * cfg.latent_length, generator=g)
    with torch.no_grad():
        out = pipe.denoiser(x, torch.tensor([0.5]), torch.zeros_like(x))
    assert out.shape == x.shape and torch.isfinite(out).all()
