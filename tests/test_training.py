import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from toolkit.checkpoint import load_checkpoint
from toolkit.data.synth import write_synth_dataset
from toolkit.diffusion import CosineSchedule, v_loss
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet
from toolkit.training import (DenoiserTrainArgs, VAETrainArgs, bandpass, train_denoiser, train_vae,
                              waveform_l1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "stems"
    write_synth_dataset(root, n=4, seconds=1.024, sample_rate=8000, seed=0, progress=False)
    return root


def test_waveform_l1_below_a_cutoff_ignores_what_lies_above_it():
    sr, t = 2000, torch.arange(2000, dtype=torch.float64) / 2000
    low, high = torch.sin(2 * torch.pi * 100 * t), torch.sin(2 * torch.pi * 900 * t)
    assert torch.allclose(bandpass(low + high, sr, 0.0, 600.0), low, atol=1e-4)
    target = (low + high).reshape(1, 1, -1)
    assert float(waveform_l1(low.reshape(1, 1, -1), target, sr, 600.0)) < 1e-4  # the 900 Hz part is free
    assert float(waveform_l1(low.reshape(1, 1, -1), target, sr, 0.0)) > 0.5  # full band: it counts
    assert float(waveform_l1(-low.reshape(1, 1, -1), target, sr, 600.0)) > 0.5  # a wrong phase below it


def test_waveform_l1_in_a_band_ignores_both_sides_of_it():
    sr, t = 2000, torch.arange(2000, dtype=torch.float64) / 2000
    kick, pad, hat = (torch.sin(2 * torch.pi * f * t) for f in (60, 300, 900))
    target = (kick + pad + hat).reshape(1, 1, -1)
    # A reconstruction with the kick's phase flipped and no hat: free outside 127-600 Hz ...
    flipped = (-kick + pad).reshape(1, 1, -1)
    assert float(waveform_l1(flipped, target, sr, 600.0, highpass_hz=127.0)) < 1e-4
    assert float(waveform_l1(flipped, target, sr, 600.0)) > 0.5  # the low-pass alone sees the kick
    # ... but not inside it, with or without an upper edge.
    wrong_pad = (kick - pad + hat).reshape(1, 1, -1)
    assert float(waveform_l1(wrong_pad, target, sr, 600.0, highpass_hz=127.0)) > 0.5
    assert float(waveform_l1(wrong_pad, target, sr, 0.0, highpass_hz=127.0)) > 0.5
    assert float(waveform_l1(flipped, target, sr, 0.0, highpass_hz=127.0)) > 0.5  # the hat, above


def test_waveform_l1_weights_each_example():
    sr, t = 2000, torch.arange(2000, dtype=torch.float64) / 2000
    x = torch.sin(2 * torch.pi * 300 * t).reshape(1, 1, -1)
    target, pred = torch.cat([x, x]), torch.cat([-x, x])  # the first example is wrong, the second right
    wrong = float(waveform_l1(pred, target, sr, 0.0))
    assert wrong > 0.5
    assert float(waveform_l1(pred, target, sr, 0.0, weights=torch.tensor([0.0, 1.0]))) == 0.0
    assert float(waveform_l1(pred, target, sr, 0.0, weights=torch.tensor([2.0, 0.0]))) == pytest.approx(2 * wrong)


def test_v_loss_decreases_on_tiny_model():
    torch.manual_seed(0)
    model = SoftAlignUNet(SOFTALIGN_PRESETS["tiny"])
    sched = CosineSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 16, generator=g)
    cond = x0.roll(1, dims=-1)

    def eval_loss():
        with torch.no_grad():
            return v_loss(model, x0, cond, schedule=sched, generator=torch.Generator().manual_seed(7)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_gen = torch.Generator().manual_seed(1)
    for _ in range(80):
        loss = v_loss(model, x0, cond, schedule=sched, generator=train_gen)
        opt.zero_grad(); loss.backward(); opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def _weights(path):
    pipe = load_checkpoint(path)
    return {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}


def test_train_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    vae = train_vae(tiny_data, tmp_path / "vae", VAETrainArgs(preset="tiny", steps=4, batch_size=2,
                    segment_samples=4096), show_progress=False)
    args = DenoiserTrainArgs(preset="tiny", steps=6, batch_size=4)
    full = train_denoiser(tiny_data, vae, tmp_path / "full", args, show_progress=False, name="tiny")
    assert train_denoiser(tiny_data, vae, tmp_path / "resumed", args, show_progress=False,
                          stop_at=3, name="tiny") is None
    state = torch.load(tmp_path / "resumed-state" / "train_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"], "optimizer state must be saved"
    resumed = train_denoiser(tiny_data, vae, tmp_path / "resumed", args, show_progress=False, name="tiny")
    a, b = _weights(full), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    prov = load_checkpoint(resumed).config.provenance
    assert prov["trained_with"] == "toolkit train" and prov["args"]["steps"] == 6
    with pytest.raises(ValueError, match="different arguments"):
        train_denoiser(tiny_data, vae, tmp_path / "resumed", DenoiserTrainArgs(preset="tiny", steps=7,
                       batch_size=4), show_progress=False, stop_at=1)


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True,
                          check=check)


def test_cli_help_lists_verbs():
    out = run_cli("--help").stdout
    for verb in ("run", "models", "data", "train-vae", "train", "generate", "evaluate", "export",
                 "report", "matrix", "calibrate", "sensitivity", "plan", "distill"):
        assert verb in out


def test_cli_models_json():
    rows = json.loads(run_cli("models", "--json").stdout)
    by = {(r["component"], r["name"]): r for r in rows}
    assert 14e6 <= by[("denoiser", "paper")]["parameters"] <= 16e6
    assert by[("denoiser", "paper")]["latent_shape"] == [64, 1024]
    assert 150e6 <= by[("vae", "sao")]["parameters"] <= 162e6
    assert by[("vae", "sao")]["downsampling"] == 2048 and by[("vae", "sao")]["sample_rate"] == 44100


def test_cli_data_synth(tmp_path):
    run_cli("data", "synth", "--out", str(tmp_path / "d"), "--n", "2", "--seconds", "1.5",
            "--sample-rate", "8000")
    tracks = sorted((tmp_path / "d").iterdir())
    assert len(tracks) == 2
    for t in tracks:
        assert {p.name for p in t.iterdir()} == {"vocals.wav", "accompaniment.wav", "labels.json"}
        assert json.loads((t / "labels.json").read_text())["chords"]


def test_cli_reports_bad_checkpoint(tmp_path):
    import numpy as np
    import soundfile as sf

    vocals = tmp_path / "x.wav"  # a real vocal file: the missing checkpoint is the only fault
    sf.write(vocals, np.zeros(2000, dtype=np.float32), 2000)
    res = run_cli("generate", "--checkpoint", str(tmp_path / "none"), "--vocals", str(vocals), "--out",
                  str(tmp_path / "o.wav"), check=False)
    assert res.returncode == 2 and "checkpoint directory not found" in res.stderr


def test_demo_checkpoint_loads_and_generates(tmp_path):
    """The embedded demo loads through the user-facing loader and `generate` writes a full WAV."""
    import soundfile as sf

    from toolkit.checkpoint import DEMO_CHECKPOINT, load_checkpoint
    from toolkit.data.synth import synth_pair

    pipe = load_checkpoint(None)
    assert pipe.path == DEMO_CHECKPOINT
    # The demo is the distilled student (guidance folded); its teacher's training is in its provenance.
    prov = pipe.config.provenance
    assert prov["distilled_with"] == "toolkit distill" and pipe.config.guidance_folded
    assert pipe.config.default_steps == prov["student_steps"]
    teacher = prov["teacher_provenance"]
    assert teacher["trained_with"] == "toolkit train" and teacher["command"].startswith("toolkit train")
    assert teacher["vae"]["trained_with"] == "toolkit train-vae" and teacher["wall_time_s_last_run"] > 0
    assert load_checkpoint(DEMO_CHECKPOINT.parent / "demo-teacher").config.provenance == teacher
    vocals, _, _ = synth_pair(3, seconds=3.0, sample_rate=16000)
    sf.write(tmp_path / "vocals.wav", vocals.T, 16000)
    run_cli("generate", "--vocals", str(tmp_path / "vocals.wav"), "--out", str(tmp_path / "acc.wav"),
            "--steps", "4", "--seed", "0")
    acc, rate = sf.read(tmp_path / "acc.wav", always_2d=True)
    assert rate == 16000 and acc.shape[0] == vocals.shape[-1]
    assert np.isfinite(acc).all() and np.sqrt(np.mean(acc**2)) > 1e-3
