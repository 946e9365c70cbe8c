"""Multiply-accumulates per layer, counted from the shapes of one forward pass.

The compute floor of a component is its MACs divided by the measured peak MAC rate of the
runtime at that precision (benchmarks/xnnpack_peak.py): no kernel does the same work faster, so a
measured time below the floor is a bug in the floor. What counts:

| op                                   | MACs                                                   |
| ------------------------------------ | ------------------------------------------------------ |
| convolution (1-, 2-D, grouped)        | output elements × C_in/groups × kernel size            |
| transposed convolution               | input elements × C_out/groups × kernel size            |
| linear                               | output elements × in_features                          |
| matmul / bmm (attention qkᵀ and ·v)   | output elements × the contracted length                |

Element-wise work (GroupNorm, SiLU, Snake, softmax, residual adds) is not counted: it is memory
bound, and what it costs shows up as the distance between the floor and the measured time. Each
count is attributed to the innermost module running when the op was called (its FQN; "" for the
top module), so a functional ``q @ k.T`` inside an attention block is counted against that block.
No executorch or other SDK is needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

KINDS = ("conv", "conv_transpose", "linear", "matmul")


@dataclass(frozen=True)
class LayerMacs:
    """MACs of one op kind inside one module (``name`` is its FQN)."""

    name: str
    kind: str
    macs: int
    calls: int


def conv_macs(out_shape, weight_shape) -> int:
    """Convolution: every output element sums C_in/groups × kernel products (weight (C_out, C_in/g, *k))."""
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def conv_transpose_macs(in_shape, weight_shape) -> int:
    """Transposed convolution: every input element scatters into C_out/groups × kernel outputs
    (weight (C_in, C_out/g, *k))."""
    return math.prod(in_shape) * math.prod(weight_shape[1:])


def linear_macs(out_shape, in_features: int) -> int:
    return math.prod(out_shape) * in_features


def matmul_macs(a_shape, out_shape) -> int:
    """a @ b: every output element is a dot product over a's last dim (1-D a: its length)."""
    return max(1, math.prod(out_shape)) * a_shape[-1]


def _count(func, args, kwargs, out) -> tuple[str, int] | None:
    def arg(i, name):
        return args[i] if len(args) > i else kwargs.get(name)

    if func in _CONV:
        return "conv", conv_macs(out.shape, arg(1, "weight").shape)
    if func in _CONV_T:
        return "conv_transpose", conv_transpose_macs(arg(0, "input").shape, arg(1, "weight").shape)
    if func in _LINEAR:
        return "linear", linear_macs(out.shape, arg(1, "weight").shape[-1])
    if func in _MATMUL:
        return "matmul", matmul_macs(arg(0, "input").shape, out.shape)
    return None


_CONV = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_CONV_T = {torch.conv_transpose1d, torch.conv_transpose2d, F.conv_transpose1d, F.conv_transpose2d}
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
           torch.mm, torch.Tensor.mm}


class _Counter(TorchFunctionMode):
    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.macs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counted = _count(func, args, kwargs, out) if isinstance(out, torch.Tensor) else None
        if counted is not None:
            kind, macs = counted
            entry = self.macs[(self.stack[-1], kind)]
            entry[0] += macs
            entry[1] += 1
        return out


def count_macs(module: nn.Module, *inputs) -> list[LayerMacs]:
    """MACs of ``module(*inputs)`` per (module FQN, op kind), in call order (runs one forward)."""
    stack = [""]

    def enter(name):
        def hook(_module, _args) -> None:
            stack.append(name)
        return hook

    def leave(_module, _args, _output) -> None:  # returns None: the output stays as it was
        stack.pop()

    handles = []
    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_pre_hook(enter(name)))
            handles.append(sub.register_forward_hook(leave))
    counter = _Counter(stack)
    try:
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return [LayerMacs(name, kind, macs, calls) for (name, kind), (macs, calls) in counter.macs.items()]


def total_macs(layers: list[LayerMacs]) -> int:
    return sum(layer.macs for layer in layers)


def macs_by_kind(layers: list[LayerMacs]) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for layer in layers:
        out[layer.kind] += layer.macs
    return out
