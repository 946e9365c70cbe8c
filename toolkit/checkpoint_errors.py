"""State-dict validation shared by every loader: the first bad tensor is named, with its file."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, truncated or does not match its config."""


def check_state_dict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Fail on the first missing, unexpected, mis-shaped, mis-typed or non-finite tensor.

    ``source`` is the file the tensors came from; it and the tensor name are in every message.
    """
    expected = module.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(
                f"{source}: tensor '{name}' is missing (expected shape {tuple(ref.shape)}); "
                "the file was written for a different config or is truncated"
            )
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(got.shape)} but the config needs "
                f"{tuple(ref.shape)}; check the config.json beside the weights"
            )
        if got.dtype != ref.dtype:
            raise CheckpointError(
                f"{source}: tensor '{name}' has dtype {got.dtype} but the model uses {ref.dtype}"
            )
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"{source}: tensor '{name}' holds NaN or Inf values")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: tensor '{unexpected[0]}' is not part of the model "
            f"({len(unexpected)} unexpected in all); the file was written for a different model"
        )
