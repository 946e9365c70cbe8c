"""toolkit.macs: analytic MACs per layer, checked against torch's FlopCounterMode (2 FLOPs per MAC)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from toolkit.macs import count_macs, macs_by_kind, total_macs


def _flops(module, *inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv1d(6, 10, 3, padding=1), (2, 6, 17)),
    (nn.Conv1d(6, 10, 4, stride=2, padding=1), (1, 6, 16)),
    (nn.Conv1d(8, 8, 7, dilation=3, padding=9, groups=4), (2, 8, 30)),
    (nn.Conv1d(5, 4, 1), (1, 5, 9)),
    (nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2), (2, 6, 11)),
    (nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2), (1, 4, 7)),
    (nn.Conv2d(3, 5, (1, 3), padding=(0, 1)), (2, 3, 1, 12)),
    (nn.Linear(12, 7), (3, 5, 12)),
])
def test_single_layer_macs_match_flop_counter(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    layers = count_macs(layer, x)
    assert len(layers) == 1 and layers[0].name == "" and layers[0].calls == 1
    assert 2 * total_macs(layers) == _flops(layer, x)


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Conv1d(dim, 3 * dim, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, 2, -1, x.shape[-1]).transpose(-1, -2).unbind(1)
        return ((q @ k.transpose(-1, -2)).softmax(-1) @ v).flatten(1, 2)


def test_attention_matmuls_are_counted_against_their_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), _Attention(8))
    x = torch.randn(2, 4, 10)
    layers = {(layer.name, layer.kind): layer for layer in count_macs(block, x)}
    # q kᵀ: (2, 2, 10, 4) @ (2, 2, 4, 10) and scores · v: (2, 2, 10, 10) @ (2, 2, 10, 4)
    assert layers[("1", "matmul")].macs == 2 * 2 * 10 * 10 * 4 * 2
    assert layers[("1", "matmul")].calls == 2
    assert layers[("1.qkv", "conv")].macs == 2 * 24 * 10 * 8
    assert layers[("0", "conv")].macs == 2 * 8 * 10 * 4 * 3
    assert 2 * total_macs(list(layers.values())) == _flops(block, x)


def test_softalign_denoiser_total_matches_flop_counter():
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    cfg = SOFTALIGN_PRESETS["tiny"]
    model = SoftAlignUNet(cfg).eval()
    d, length = cfg.latent_shape
    inputs = (torch.randn(2, d, length), torch.rand(2), torch.randn(2, d, length))
    layers = count_macs(model, *inputs)
    kinds = macs_by_kind(layers)
    assert kinds["matmul"] > 0 and kinds["conv"] > 0 and kinds["linear"] > 0
    assert 2 * total_macs(layers) == _flops(model, *inputs)
    assert all(layer.name for layer in layers if layer.kind == "conv")  # attributed to a layer
