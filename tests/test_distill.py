import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint
from toolkit.config import ConfigError, config_from_dict, config_to_dict
from toolkit.data.synth import write_synth_dataset
from toolkit.diffusion import CosineSchedule, make_table
from toolkit.distill import (
    LATENTS_FILE, STATE_FILE, WEIGHTINGS, DistillArgs, distill, guided_target, teacher_target,
)
from toolkit.generate import generate_accompaniment
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

REPO = Path(__file__).resolve().parents[1]
SNRS = torch.tensor([0.1, 1.0, 4.0, 10.0, 100.0], dtype=torch.float64)


# --- loss weights (seed 003 §3.3) -------------------------------------------------------------------


@pytest.mark.parametrize("name, gamma, expected", [
    ("truncated-snr", 5.0, [1.0, 1.0, 4.0, 10.0, 100.0]),  # eq. 7: max(SNR, 1)
    ("snr-plus-one", 5.0, [1.1, 2.0, 5.0, 11.0, 101.0]),  # eq. 8: SNR + 1
    ("min-snr", 5.0, [0.1, 1.0, 4.0, 5.0, 5.0]),  # eq. 9: min(SNR, γ)
    ("bsa", 5.0, [1.1, 2.0, 5.0, 5.0, 5.0]),  # eq. 10: min(SNR + 1, γ)
    ("min-snr", 2.0, [0.1, 1.0, 2.0, 2.0, 2.0]),
    ("bsa", 2.0, [1.1, 2.0, 2.0, 2.0, 2.0]),
])
def test_weightings_follow_seed_003_equations(name, gamma, expected):
    got = WEIGHTINGS[name](SNRS, gamma=gamma)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_bsa_is_the_default_with_gamma_5():
    assert DistillArgs().weighting == "bsa" and DistillArgs().gamma == 5.0
    assert float(WEIGHTINGS["bsa"](torch.tensor(1e6))) == 5.0
    assert float(WEIGHTINGS["bsa"](torch.tensor(0.0))) == 1.0  # pure noise keeps weight 1 ...
    assert float(WEIGHTINGS["min-snr"](torch.tensor(0.0))) == 0.0  # ... where min-SNR drops it


def test_distill_args_round_trip_and_validate():
    args = DistillArgs(start_steps=32, rounds=2, weighting="min-snr", guidance=2.0, fold=False)
    data = json.loads(json.dumps(config_to_dict(args)))
    assert config_from_dict(data) == args
    with pytest.raises(ConfigError, match="start_steps"):
        DistillArgs(start_steps=12, rounds=3)
    with pytest.raises(ConfigError, match="weighting"):
        DistillArgs(weighting="snr")
    with pytest.raises(ConfigError, match="fold_iterations"):
        DistillArgs(fold=False, fold_iterations=10)
    with pytest.raises(ConfigError, match="rounds"):
        DistillArgs(rounds=0)
    stage = DistillArgs(start_steps=16, rounds=2, iterations=5, fold_iterations=7)
    assert (stage.first_round, stage.student_steps(0), stage.round_iterations(0)) == (0, 16, 7)
    assert [stage.steps_before(k) for k in (0, 1, 2)] == [0, 7, 12]

def test_learning_rate_warms_up_then_decays_linearly_to_zero():
    args = DistillArgs(lr=1e-4, warmup=4, lr_decay="linear")
    lrs = [args.lr_at(s, 100) for s in range(100)]
    assert lrs[:4] == pytest.approx([1e-4 * (s + 1) / 4 * (1 - s / 100) for s in range(4)])
    assert max(lrs) == pytest.approx(1e-4 * (1 - 3 / 100))  # peak where the warm-up ends
    assert lrs[99] == pytest.approx(1e-6) and all(b <= a for a, b in zip(lrs[3:], lrs[4:]))
    constant = DistillArgs(lr=1e-4, warmup=0, lr_decay="none")
    assert constant.lr_at(0, 10) == constant.lr_at(9, 10) == 1e-4
    assert (DistillArgs().warmup, DistillArgs().lr_decay) == (200, "linear")
    with pytest.raises(ConfigError, match="lr_decay"):
        DistillArgs(lr_decay="cosine")


# --- the teacher's two DDIM steps, by hand -------------------------------------------------------


def analytic_teacher(z, t, cond):
    """A v-predictor simple enough to follow by hand: affine in z and cond, depending on t."""
    tt = t.reshape(-1, 1, 1).to(z.dtype)
    return 0.3 * z + (1.0 - tt) * cond - 0.1 * tt


def hand_two_steps(z, cond, i, n, w, schedule):
    """Algorithm 1 for one example, written out: rows of the 2N-step sampler table give α, σ."""
    table = make_table(schedule, 2 * n)
    r = 2 * (n - i)  # row of t = i/N; t' = r + 1, t'' = r + 2
    a, s = table.alpha[r], table.sigma[r]
    a1, s1 = table.alpha[r + 1], table.sigma[r + 1]
    a2, s2 = table.alpha[r + 2], table.sigma[r + 2]

    def v(zz, tt):
        t = torch.tensor([tt], dtype=torch.float64)
        v_c = analytic_teacher(zz, t, cond)
        v_u = analytic_teacher(zz, t, torch.zeros_like(cond))
        return v_u + w * (v_c - v_u)

    x = a * z - s * v(z, table.t[r])  # x̂_η(z_t)
    z1 = a1 * x + s1 / s * (z - a * x)  # z_{t'}
    x1 = a1 * z1 - s1 * v(z1, table.t[r + 1])  # x̂_η(z_{t'})
    z2 = a2 * x1 + s2 / s1 * (z1 - a1 * x1)  # z_{t''}
    if i == 1:
        return x1, z2, (a, s, a2, s2)
    return (z2 - s2 / s * z) / (a2 - s2 / s * a), z2, (a, s, a2, s2)


@pytest.mark.parametrize("w, fold", [(2.5, True), (1.0, True), (1.0, False)])
def test_teacher_target_is_two_hand_ddim_steps(w, fold):
    schedule, n = CosineSchedule(), 4
    g = torch.Generator().manual_seed(0)
    i = torch.tensor([4, 3, 2, 1])  # t = 1 (pure noise) down to the last step (t'' = 0)
    z = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    got = teacher_target(analytic_teacher, z, i / n, cond, schedule=schedule, n_steps=n,
                         guidance=w, fold=fold)
    for b in range(4):
        want, z2, (a, s, a2, s2) = hand_two_steps(z[b:b + 1], cond[b:b + 1], int(i[b]), n, w, schedule)
        assert torch.allclose(got[b:b + 1], want, rtol=0, atol=1e-10), int(i[b])
        # The point of x̃: one student DDIM step t → t'' with x̂ = x̃ lands where the teacher's two did.
        one_step = a2 * got[b:b + 1] + s2 / s * (z[b:b + 1] - a * got[b:b + 1])
        assert torch.allclose(one_step, z2, rtol=0, atol=1e-10), int(i[b])


def test_teacher_target_refuses_off_grid_times_and_unfolded_guidance():
    z = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match="grid"):
        teacher_target(analytic_teacher, z, torch.tensor([0.3]), z, schedule=CosineSchedule(),
                       n_steps=4, guidance=1.0, fold=True)
    with pytest.raises(ValueError, match="guidance"):
        teacher_target(analytic_teacher, z, torch.tensor([0.5]), z, schedule=CosineSchedule(),
                       n_steps=4, guidance=3.0, fold=False)


def test_guided_target_is_the_teachers_cfg_x0_at_the_same_time():
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    z = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    w = 2.5
    got = guided_target(analytic_teacher, z, t, cond, schedule=schedule, guidance=w)
    table = make_table(schedule, 4)  # rows 0..4: t = 1, 0.75, 0.5, 0.25, 0
    for b in range(4):
        a, s = table.alpha[b], table.sigma[b]
        tb = t[b:b + 1]
        v_c = analytic_teacher(z[b:b + 1], tb, cond[b:b + 1])
        v_u = analytic_teacher(z[b:b + 1], tb, torch.zeros_like(cond[b:b + 1]))
        want = a * z[b:b + 1] - s * (v_u + w * (v_c - v_u))  # x̂ = α z − σ ṽ
        assert torch.allclose(got[b:b + 1], want, rtol=0, atol=1e-10), b


# --- the loop on a tiny pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-data") / "stems"
    write_synth_dataset(root, n=4, seconds=1.0, sample_rate=8000, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    pipe = Pipeline(config=PipelineConfig(name="tiny", default_steps=8),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())
    return save_checkpoint(tmp_path_factory.mktemp("distill-teacher") / "ckpt", pipe)


def _weights(path):
    return {k: v.clone() for k, v in load_checkpoint(path).denoiser.state_dict().items()}


def test_rounds_halve_steps_and_write_complete_checkpoints(tiny_teacher, tiny_data, tmp_path):
    teacher = load_checkpoint(tiny_teacher)
    args = DistillArgs(start_steps=8, rounds=2, iterations=2, batch_size=4, lr=1e-3)
    paths = distill(teacher, tiny_data, tmp_path / "out", args, show_progress=False)
    assert [p.name for p in paths] == ["round-1-4steps", "round-2-2steps"]
    teacher_vae = teacher.vae.state_dict()
    for k, (path, steps) in enumerate(zip(paths, (4, 2)), start=1):
        pipe = load_checkpoint(path)
        assert pipe.config.default_steps == steps and pipe.config.guidance_folded
        assert pipe.config.latent_scale == teacher.config.latent_scale
        prov = pipe.config.provenance
        assert (prov["round"], prov["weighting"], prov["gamma"], prov["iterations"]) == (k, "bsa", 5.0, 2)
        assert prov["teacher_steps"] == 2 * steps and np.isfinite(prov["loss_last_100"])
        assert all(torch.equal(v, teacher_vae[n]) for n, v in pipe.vae.state_dict().items())
        acc = generate_accompaniment(pipe, np.zeros((1, 300), np.float32), steps=steps,
                                     guidance=pipe.config.default_guidance, seed=0)
        assert acc.shape == (1, 300) and np.isfinite(acc).all()
    before, after = teacher.denoiser.state_dict(), _weights(paths[0])
    assert any(not torch.equal(before[n], after[n]) for n in before), "the student must have trained"
    assert (tmp_path / "out-state" / LATENTS_FILE).is_file()
    # A rerun of a finished run does nothing and returns the same checkpoints.
    assert distill(teacher, tiny_data, tmp_path / "out", args, show_progress=False) == paths


def test_folding_stage_is_round_0_and_the_rounds_distil_the_folded_model(tiny_teacher, tiny_data,
                                                                         tmp_path):
    teacher = load_checkpoint(tiny_teacher)
    args = DistillArgs(start_steps=8, rounds=1, iterations=2, fold_iterations=3, batch_size=4,
                       lr=1e-3, guidance=3.0)
    paths = distill(teacher, tiny_data, tmp_path / "out", args, show_progress=False)
    assert [p.name for p in paths] == ["round-0-8steps", "round-1-4steps"]
    folded, student = load_checkpoint(paths[0]), load_checkpoint(paths[1])
    assert folded.config.guidance_folded and folded.config.default_steps == 8
    prov = folded.config.provenance
    assert (prov["round"], prov["iterations"], prov["teacher_steps"]) == (0, 3, 8)
    assert "Meng" in prov["method"]
    assert student.config.provenance["iterations"] == 2 and student.config.default_steps == 4
    # Resume across the stage boundary: stop inside round 0, then inside round 1.
    out = tmp_path / "resumed"
    assert distill(teacher, tiny_data, out, args, show_progress=False, stop_at=2) is None
    assert distill(teacher, tiny_data, out, args, show_progress=False, stop_at=4) is None
    state = torch.load(tmp_path / "resumed-state" / STATE_FILE, weights_only=False)
    assert (state["round"], state["step"]) == (1, 1)
    resumed = distill(teacher, tiny_data, out, args, show_progress=False)
    for a_path, b_path in zip(paths, resumed):
        a, b = _weights(a_path), _weights(b_path)
        assert all(torch.equal(a[k], b[k]) for k in a), a_path.name
    # A folded teacher has nothing left to fold.
    with pytest.raises(ValueError, match="already folds"):
        distill(folded, tiny_data, tmp_path / "again", args, show_progress=False)


class CountingDenoiser:
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner):
        self.inner, self.config, self.batches = inner, inner.config, []

    def __call__(self, z, t, cond):
        self.batches.append(z.shape[0])
        return self.inner(z, t, cond)


@pytest.mark.parametrize("fold", [True, False])
def test_guidance_folding_sets_checkpoint_and_calls_once_per_step(tiny_teacher, tiny_data, tmp_path,
                                                                  fold):
    teacher = load_checkpoint(tiny_teacher)
    args = DistillArgs(start_steps=4, rounds=1, iterations=1, batch_size=2, guidance=3.0, fold=fold)
    (path,) = distill(teacher, tiny_data, tmp_path / "out", args, show_progress=False)
    pipe = load_checkpoint(path)
    assert pipe.config.guidance_folded is fold and pipe.config.default_guidance == 3.0
    counter = CountingDenoiser(pipe.denoiser)
    generate_accompaniment(dataclasses.replace(pipe, denoiser=counter),
                           np.zeros((1, pipe.segment_samples), np.float32),
                           steps=pipe.config.default_steps, guidance=3.0, seed=0)
    # Folded: one conditional call per step; not folded: the conditional and null branches (2B).
    assert counter.batches == [1 if fold else 2] * 2


def test_unfolding_a_folded_teacher_is_refused(tiny_teacher, tiny_data, tmp_path):
    teacher = load_checkpoint(tiny_teacher)
    folded = dataclasses.replace(teacher, config=dataclasses.replace(teacher.config,
                                                                     guidance_folded=True))
    with pytest.raises(ValueError, match="unfold"):
        distill(folded, tiny_data, tmp_path / "out", DistillArgs(start_steps=4, rounds=1, fold=False),
                show_progress=False)


def test_resume_restores_optimizer_and_matches_uninterrupted_run(tiny_teacher, tiny_data, tmp_path):
    teacher = load_checkpoint(tiny_teacher)
    args = DistillArgs(start_steps=4, rounds=2, iterations=3, batch_size=4, lr=1e-3)
    full = distill(teacher, tiny_data, tmp_path / "full", args, show_progress=False)
    resumed_out = tmp_path / "resumed"
    # Stop in the middle of round 1, then in the middle of round 2, then finish.
    assert distill(teacher, tiny_data, resumed_out, args, show_progress=False, stop_at=2) is None
    state = torch.load(tmp_path / "resumed-state" / STATE_FILE, weights_only=False)
    assert (state["round"], state["step"]) == (1, 2) and state["optimizer"]["state"], \
        "optimizer state must be saved"
    assert distill(teacher, tiny_data, resumed_out, args, show_progress=False, stop_at=4) is None
    state = torch.load(tmp_path / "resumed-state" / STATE_FILE, weights_only=False)
    assert (state["round"], state["step"]) == (2, 1) and state["optimizer"]["state"]
    resumed = distill(teacher, tiny_data, resumed_out, args, show_progress=False)
    assert [p.name for p in resumed] == [p.name for p in full]
    for a_path, b_path in zip(full, resumed):
        a, b = _weights(a_path), _weights(b_path)
        for k in a:
            assert torch.equal(a[k], b[k]), (a_path.name, k)
    with pytest.raises(ValueError, match="different arguments"):
        distill(teacher, tiny_data, resumed_out, dataclasses.replace(args, lr=2e-3),
                show_progress=False)


def test_ddp_two_cpu_processes_gloo(tiny_teacher, tiny_data, tmp_path):
    flags = ["--data", str(tiny_data), "--start-steps", "4", "--rounds", "1", "--iterations", "2",
             "--batch-size", "4", "--lr", "1e-3", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "toolkit.distill", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "ddp"),
           *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    pipe = load_checkpoint(tmp_path / "ddp" / "round-1-2steps")
    assert pipe.config.provenance["world_size"] == 2 and pipe.config.default_steps == 2
    # Each rank trains on its slice of one global batch: the same steps as a single process.
    single = distill(load_checkpoint(tiny_teacher), tiny_data, tmp_path / "single",
                     DistillArgs(start_steps=4, rounds=1, iterations=2, batch_size=4, lr=1e-3, seed=1),
                     show_progress=False)
    a, b = _weights(single[0]), pipe.denoiser.state_dict()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diff.mean()) < 1e-5, float(diff.mean())


def test_ema_weights_are_written_taught_from_and_resumed(tiny_teacher, tiny_data, tmp_path):
    teacher = load_checkpoint(tiny_teacher)
    raw_args = DistillArgs(start_steps=4, rounds=1, iterations=3, batch_size=4, lr=1e-2)
    ema_args = dataclasses.replace(raw_args, ema=0.5)
    (raw,) = distill(teacher, tiny_data, tmp_path / "raw", raw_args, show_progress=False)
    (ema,) = distill(teacher, tiny_data, tmp_path / "ema", ema_args, show_progress=False)
    t0, r, e = _weights(tiny_teacher), _weights(raw), _weights(ema)
    # Same batches and updates; the EMA lies between the start (the teacher) and the raw student.
    for k in t0:
        if t0[k].is_floating_point() and not torch.equal(t0[k], r[k]):
            assert not torch.equal(e[k], r[k]), k
            assert float((e[k] - t0[k]).abs().sum()) < float((r[k] - t0[k]).abs().sum()) + 1e-12, k
    assert load_checkpoint(ema).config.provenance["ema"] == 0.5
    out = tmp_path / "ema-resumed"
    assert distill(teacher, tiny_data, out, ema_args, show_progress=False, stop_at=2) is None
    assert torch.load(tmp_path / "ema-resumed-state" / STATE_FILE, weights_only=False)["ema"] is not None
    (resumed,) = distill(teacher, tiny_data, out, ema_args, show_progress=False)
    got = _weights(resumed)
    assert all(torch.equal(got[k], e[k]) for k in e)
