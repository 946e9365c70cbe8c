"""The quality budget a bundle carries, and the gate that judges it on this host before it is kept.

The gate runs the device's own check (``runtime_py.verify``) where the target's runtime runs here,
and otherwise the plan's fake-quantized PyTorch simulation on the same reference inputs; which of
the two ran is written into the manifest (``host_check.kind``) and printed by ``toolkit export``.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.checkpoint import Pipeline

# Default quality budgets that runtime_py enforces on the device, per export precision.
DEFAULT_QUALITY_BUDGET = {
    "fp32": {"latent_snr_db_min": 40.0, "max_relative_to_spread": 0.25},
    "fp16": {"latent_snr_db_min": 20.0, "max_relative_to_spread": 0.25},
}
# Quantized bundles: every paired audio distance to full precision at most 25 % of the
# full-precision seed-to-seed spread, and latent SNR >= 20 dB.
QUANTIZED_QUALITY_BUDGET = {"latent_snr_db_min": 20.0, "max_relative_to_spread": 0.25}
# What the host check ran: the lowered graph through the target's runtime, or a simulation of the plan.
HOST_CHECK_KINDS = ("lowered graph", "simulation of the plan")


def host_quality_check(pipeline: Pipeline, bundle: Path, manifest: dict, *, plan: dict,
                       calib: Path | None) -> dict:
    """The budget judged on this host before the bundle is kept (see the module doc)."""
    from runtime_py.bundle import load_reference
    from runtime_py.runners import runtime_unavailable
    from runtime_py.verify import DevicePipeline, judge, quality_against_reference

    why = runtime_unavailable(manifest["target"])
    if why is None:  # the device's own quality check, on this host's runtime
        inputs, ref = load_reference(bundle, manifest)
        _, aggregate = quality_against_reference(DevicePipeline(bundle, manifest, threads=None), inputs, ref,
                                                 manifest["audio"]["sample_rate"])
        kind, how = HOST_CHECK_KINDS[0], f"runtime_py's quality check with {manifest['target']} on this host"
    else:
        from calibration.evaluate_plan import simulate_reference

        aggregate = simulate_reference(pipeline, plan, calib, bundle, manifest)
        kind = HOST_CHECK_KINDS[1]
        how = (f"fake-quantized PyTorch simulation of the plan, not the lowered graph ({manifest['target']} "
               f"cannot run here: {why}); the lowering report lists where the target departs from the plan")
    lines = judge(aggregate, manifest["quality_budget"])
    return {"kind": kind, "how": how, "status": "pass" if all(line["pass"] for line in lines) else "fail",
            "aggregate": aggregate, "lines": lines}
