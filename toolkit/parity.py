"""Parity is part of export: an exported component run through its target's runtime on this host,
against PyTorch fp32 on the same inputs (STYLE.md rule 7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime_py import metrics

# Host-side parity floors (SQNR of the target's output against PyTorch's, dB), per export precision.
MIN_PARITY_SQNR_DB = {"fp32": 60.0, "fp16": 25.0}
# Host-side parity floor of a quantized component against fp32 PyTorch, on a calibration input
# (SQNR, dB), per target: a lowering that breaks a layer (wrong scale, axis, zero point) lands far
# below; the end-to-end budget, not this floor, judges whether the plan is good enough.
MIN_QUANTIZED_PARITY_SQNR_DB = 15.0


def check_parity(target: str, spec, path: Path, precision: str, *, inputs=None,
                 floor: float | None = None) -> dict:
    """Run the exported component on its runtime here and compare with PyTorch (fp32).

    ``inputs`` default to the spec's example inputs; ``floor`` to the precision's.
    """
    from runtime_py.runners import load_runner, runtime_unavailable

    runtime = target
    why = runtime_unavailable(target)
    if why is not None and target == "tensorrt" and path.suffix == ".onnx":
        runtime, why = "onnx", runtime_unavailable("onnx")  # the TensorRT graph, run by ONNX Runtime
    if why is not None:
        return {"status": "not run", "reason": why}
    runner = load_runner(runtime, path)
    inputs = tuple(spec.example_inputs) if inputs is None else tuple(inputs)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    got = next(iter(runner.run(feeds).values()))
    with torch.no_grad():
        want = spec.module(*inputs).numpy()
    sqnr = metrics.snr_db(want, got)
    floor = MIN_PARITY_SQNR_DB[precision] if floor is None else floor
    return {"status": "pass" if sqnr >= floor else "fail", "runtime": runtime,
            "sqnr_db": sqnr, "min_sqnr_db": floor,
            "max_abs_diff": float(np.max(np.abs(want - got)))}
