"""LiteFocus (seed 002): focus sets, the compensation draw, the 1-D and 2-D forms, the U-Net mode."""

import math

import numpy as np
import pytest
import torch

from toolkit.config import ConfigError, config_from_dict, config_to_dict
from toolkit.models.litefocus import (
    GridSelfAttention, LiteFocusConfig, band_attention, compensation_count, compensation_indices,
    compensation_indices_np, focus_sets, grid_focus_sets, litefocus_attention, litefocus_grid_attention,
)
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet


def masked_dense(q, k, v, allowed):
    """softmax over the allowed keys only: the O(N²) reference of every sparse form here."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def dense(q, k, v):
    return masked_dense(q, k, v, torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))


def qkv(n, seed=0, b=2, h=3, d=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


# --- the compensation draw (eq. 6) ------------------------------------------------------------------


@pytest.mark.parametrize("n,ratio", [(1, 1.0), (10, 0.1), (64, 0.25), (1000, 0.1), (4096, 0.05), (37, 1.0)])
@pytest.mark.parametrize("seed,call", [(0, 0), (7, 3), (2**40 + 5, 1000)])
def test_indices_are_equal_in_torch_and_numpy(n, ratio, seed, call):
    t = compensation_indices(n, ratio, seed=seed, call=call)
    a = compensation_indices_np(n, ratio, seed=seed, call=call)
    assert t.dtype == torch.int64 and a.dtype == np.int64
    np.testing.assert_array_equal(t.numpy(), a)
    assert len(a) == math.floor(ratio * n) == compensation_count(n, ratio)
    assert len(np.unique(a)) == len(a) and (np.diff(a) > 0).all() and (a >= 0).all() and (a < n).all()


def test_indices_are_reproducible_and_change_per_call_and_seed():
    a = compensation_indices_np(1024, 0.1, seed=3, call=5)
    np.testing.assert_array_equal(a, compensation_indices_np(1024, 0.1, seed=3, call=5))
    assert not np.array_equal(a, compensation_indices_np(1024, 0.1, seed=3, call=6))
    assert not np.array_equal(a, compensation_indices_np(1024, 0.1, seed=4, call=5))
    np.testing.assert_array_equal(compensation_indices_np(1024, 1.0, seed=9, call=0), np.arange(1024))


def test_indices_cover_the_keys_evenly():
    # over many calls each key is drawn about r of the time (the draw is not biased to one end)
    counts = np.zeros(200)
    for call in range(500):
        counts[compensation_indices_np(200, 0.1, seed=1, call=call)] += 1
    assert counts.min() > 0.05 * 500 and counts.max() < 0.15 * 500
    assert abs(counts[:100].sum() - counts[100:].sum()) < 0.1 * counts.sum()


# --- 1-D LiteFocus ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 9, 40])
def test_r1_with_a_full_focus_set_equals_dense(n):
    q, k, v = qkv(n)
    everything = compensation_indices(n, 1.0, seed=0, call=0)
    # S_i spans every key and C every key: the union is dense, each key once
    full = litefocus_attention(q, k, v, everything, band=n)
    torch.testing.assert_close(full, dense(q, k, v), rtol=1e-5, atol=1e-6)
    # compensation alone at r = 1 (Table 2's first row) is dense too
    comp_only = litefocus_attention(q, k, v, everything, band=0, structured=False)
    torch.testing.assert_close(comp_only, dense(q, k, v), rtol=1e-5, atol=1e-6)
    # a narrow band plus C = every key: the union still holds each key once
    torch.testing.assert_close(litefocus_attention(q, k, v, everything, band=2, lags=(5,)), dense(q, k, v),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [3, 17, 64, 130])
@pytest.mark.parametrize("band,lags", [(0, ()), (2, ()), (4, (9, 16)), (1, (3,))])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_litefocus_equals_dense_attention_over_the_focus_sets(n, band, lags, ratio):
    q, k, v = qkv(n, seed=n + band)
    comp = compensation_indices(n, ratio, seed=2, call=n)
    out = litefocus_attention(q, k, v, comp, band=band, lags=lags)
    ref = masked_dense(q, k, v, focus_sets(n, comp, band=band, lags=lags))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if len(comp):
        out = litefocus_attention(q, k, v, comp, band=band, structured=False)
        ref = masked_dense(q, k, v, focus_sets(n, comp, band=band, structured=False))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_focus_only_band_is_the_banded_local_attention():
    q, k, v = qkv(50)
    empty = torch.zeros(0, dtype=torch.int64)
    torch.testing.assert_close(litefocus_attention(q, k, v, empty, band=3),
                               band_attention(q, k, v, lo=3, hi=3), rtol=1e-5, atol=1e-6)


def test_compensation_only_needs_keys():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match="empty focus set"):
        litefocus_attention(q, k, v, torch.zeros(0, dtype=torch.int64), band=1, structured=False)


def test_far_keys_outside_the_focus_set_do_not_matter():
    q, k, v = qkv(64)
    comp = compensation_indices(64, 0.1, seed=0, call=0)
    allowed = focus_sets(64, comp, band=2)
    k2, v2 = k.clone(), v.clone()
    outside = ~allowed[10]
    k2[:, :, outside] += 3.0
    v2[:, :, outside] -= 5.0
    a = litefocus_attention(q, k, v, comp, band=2)[:, :, 10]
    b = litefocus_attention(q, k2, v2, comp, band=2)[:, :, 10]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cfg", [dict(ratio=1.5), dict(ratio=-0.1), dict(band=-1), dict(band=4, lags=(3,)),
                                 dict(lags=(8, 8)), dict(lags=(0,))])
def test_config_validation(cfg):
    with pytest.raises(ConfigError):
        LiteFocusConfig(**cfg)


def test_config_round_trips():
    cfg = LiteFocusConfig(ratio=0.2, band=4, lags=(16, 32), seed=3)
    assert config_from_dict(config_to_dict(cfg)) == cfg


# --- the literal 2-D form (eq. 5, same-frequency rows) ------------------------------------------------


@pytest.mark.parametrize("t,f", [(6, 4), (1, 5), (9, 1)])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 1.0])
def test_grid_litefocus_equals_dense_over_its_focus_sets(t, f, ratio):
    q, k, v = qkv(t * f, seed=t * f)
    comp = compensation_indices(t * f, ratio, seed=1, call=0)
    out = litefocus_grid_attention(q, k, v, comp, n_time=t, n_freq=f)
    torch.testing.assert_close(out, masked_dense(q, k, v, grid_focus_sets(t, f, comp)), rtol=1e-5, atol=1e-6)
    if ratio == 1.0:  # r = 1: every key once, dense attention
        torch.testing.assert_close(out, dense(q, k, v), rtol=1e-5, atol=1e-6)


def test_grid_module_dense_and_litefocus():
    torch.manual_seed(0)
    module = GridSelfAttention(8, n_heads=2, groups=2).eval()
    x = torch.randn(2, 8, 10, 4)  # (B, C, T, F)
    with torch.no_grad():
        y_dense = module(x)
        y_full = module(x, compensation_indices(40, 1.0, seed=0, call=0))
        y_sparse = module(x, compensation_indices(40, 0.1, seed=0, call=0))
    assert y_dense.shape == x.shape
    torch.testing.assert_close(y_full, y_dense, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y_sparse).all() and not torch.allclose(y_sparse, y_dense)
    # same-frequency focus: with no compensation, frequency row 0 ignores every other row
    x2 = x.clone()
    x2[:, :, :, 1:] += 1.0
    module.norm = torch.nn.Identity()  # GroupNorm's statistics span every row by design
    none = torch.zeros(0, dtype=torch.int64)
    with torch.no_grad():
        torch.testing.assert_close(module(x, none)[..., 0], module(x2, none)[..., 0])


# --- the SoftAlign U-Net in LiteFocus mode ---------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval()


def test_unet_is_dense_up_to_the_training_length():
    model = tiny_model()
    x, c, t = torch.randn(2, 4, 16), torch.randn(2, 4, 16), torch.tensor([0.3, 0.6])
    lf = LiteFocusConfig(ratio=0.1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c, None, litefocus=lf), model(x, t, c), rtol=0, atol=0)


def test_unet_litefocus_beyond_the_training_length():
    model = tiny_model()
    n = 64  # 4x the tiny preset's 16 frames; bottleneck 32 frames
    g = torch.Generator().manual_seed(1)
    x, c, t = torch.randn(2, 4, n, generator=g), torch.randn(2, 4, n, generator=g), torch.tensor([0.3, 0.6])
    bottleneck = n // model.config.downsampling
    with torch.no_grad():
        ref = model(x, t, c)
        full = model(x, t, c, compensation_indices(bottleneck, 1.0, seed=0, call=0),
                     litefocus=LiteFocusConfig(ratio=1.0, band=2))
        sparse = model(x, t, c, compensation_indices(bottleneck, 0.1, seed=0, call=0),
                       litefocus=LiteFocusConfig(ratio=0.1, band=2))
        with pytest.raises(ValueError, match="compensation indices"):
            model(x, t, c, litefocus=LiteFocusConfig())
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)  # r = 1: dense
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, ref)


def test_exported_unet_takes_the_indices_as_an_input_and_has_no_random_op():
    model = tiny_model()
    lf = LiteFocusConfig(ratio=0.25, band=1)
    n = 48
    model.prepare_length(n)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, t, cond, comp_idx):
            return self.model(x, t, cond, comp_idx, litefocus=lf)

    g = torch.Generator().manual_seed(2)
    x, c, t = torch.randn(2, 4, n, generator=g), torch.randn(2, 4, n, generator=g), torch.tensor([0.4, 0.4])
    idx = compensation_indices(n // 2, 0.25, seed=0, call=0)
    ep = torch.export.export(Wrapped(), (x, t, c, idx))
    ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert not any("rand" in op or "bernoulli" in op or "multinomial" in op for op in ops), ops
    idx2 = torch.from_numpy(compensation_indices_np(n // 2, 0.25, seed=0, call=1))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, t, c, idx2), model(x, t, c, idx2, litefocus=lf))


def test_unet_compensation_only_ablation():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    x, c, t = torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g), torch.tensor([0.5])
    every = compensation_indices(32, 1.0, seed=0, call=0)
    with torch.no_grad():
        ref = model(x, t, c)
        comp_only = model(x, t, c, every, litefocus=LiteFocusConfig(ratio=1.0, structured=False))
    torch.testing.assert_close(comp_only, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="empty"):
        LiteFocusConfig(ratio=0.0, structured=False)
