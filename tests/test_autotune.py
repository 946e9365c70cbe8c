"""Plan search through neural-compressor's tuning loop (calibration/autotune.py), on a tiny seeded
pipeline: INC's stopping rule picks the candidate, the budget bounds the candidates, and
neural-compressor is imported only by this option."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("neural_compressor.torch.quantization")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from calibration.sampling import calibrate
    from toolkit.checkpoint import Pipeline, PipelineConfig
    from toolkit.data.synth import write_synth_dataset
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    pipe = Pipeline(config=PipelineConfig(name="tiny", default_steps=2),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())
    root = tmp_path_factory.mktemp("autotune")
    write_synth_dataset(root / "synth", n=2, seconds=1.0, sample_rate=8000, seed=0, progress=False)
    calib = calibrate(pipe, root / "synth", strategy="uniform", size=4, steps=2, seed=0, out_dir=root / "calib",
                      show_progress=False, augment=False)
    return pipe, calib


def _plan(tiny, **kw):
    from calibration.autotune import autotune_plan

    pipe, calib = tiny
    args = dict(budget=None, sensitivity=None, sensitivity_source=None, min_snr_db=30.0, max_trials=3, n_eval=1,
                vae_decoder_layers=None)
    args.update(kw)
    return autotune_plan(pipe, "w8a8", calib, **args)


def test_inc_stops_at_the_first_candidate_that_meets_the_target(tiny):
    plan = _plan(tiny, min_snr_db=1.0)
    search = plan["search"]
    assert search["trials"][0]["latent_snr_db"] >= 1.0
    assert len(search["trials"]) == 1 and search["chosen"] == 0 and search["target_met"]
    assert plan["overrides"] == {} and search["moves"] == []


def test_inc_returns_the_best_trial_when_no_candidate_meets_the_target(tiny):
    plan = _plan(tiny, min_snr_db=99.0, max_trials=3)
    search = plan["search"]
    assert len(search["trials"]) == 3 and not search["target_met"]
    best = max(range(3), key=lambda i: search["trials"][i]["latent_snr_db"])
    assert search["chosen"] == search["trials"][best]["candidate"]
    raised = search["candidates"][search["chosen"]]["raised_to_fp16"]
    assert len(plan["overrides"]) == raised == len(search["moves"])
    assert all(v["weights"] == "fp16" for v in plan["overrides"].values())


def test_candidates_respect_the_size_budget(tiny):
    sizes = [c["size_ratio"] for c in _plan(tiny, min_snr_db=99.0, max_trials=1)["search"]["candidates"]]
    assert sizes == sorted(sizes) and len(sizes) > 2
    budget = (sizes[1] + sizes[2]) / 2
    plan = _plan(tiny, min_snr_db=99.0, budget=budget, max_trials=2)
    assert [c["size_ratio"] for c in plan["search"]["candidates"]] == sizes[:2]
    assert plan["budget"]["met"] and plan["budget"]["size_ratio"] <= budget
    with pytest.raises(ValueError, match="over the budget"):
        _plan(tiny, budget=sizes[0] * 0.9)


def test_neural_compressor_is_imported_only_by_the_autotune_option():
    code = ("import sys, calibration.plan, calibration.gptq, calibration.fakequant, toolkit.cli; "
            "toolkit.cli.build_parser().parse_args(['plan', '--out', 'x.json']); "
            "assert 'neural_compressor' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
