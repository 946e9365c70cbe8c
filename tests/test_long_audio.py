"""Long audio (issue 18): one-pass, windowed and segmented generation, chunked VAE, the generate verb."""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch

from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint
from toolkit.cli import main
from toolkit.generate import (
    decode_latent, decode_latent_chunked, encode_audio, encode_audio_chunked, generate_accompaniment,
    latent_frames_for, sample_latent, sample_latent_windows, seam_error, window_starts,
)
from toolkit.models.litefocus import LiteFocusConfig, compensation_indices
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=2, default_guidance=2.0, latent_scale=0.5),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


def vocal(samples, seed=0):
    return (0.3 * np.random.default_rng(seed).standard_normal((1, samples))).astype(np.float32)


def test_modes_agree_bit_for_bit_at_the_training_length():
    pipe = tiny_pipeline()
    for n in (pipe.segment_samples, 50):  # a whole training segment, and a shorter vocal
        v = vocal(n)
        ref = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=3, mode="segments")
        for mode in ("onepass", "windows"):
            out = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=3, mode=mode,
                                         litefocus=LiteFocusConfig())
            np.testing.assert_array_equal(out, ref, err_msg=mode)


@pytest.mark.parametrize("mode", ["onepass", "windows", "segments"])
def test_long_vocal_gives_an_accompaniment_as_long(mode):
    pipe = tiny_pipeline()
    v = vocal(5 * pipe.segment_samples + 37)
    latents, stats = [], {}
    out = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=0, mode=mode, latents=latents, stats=stats)
    assert out.shape == v.shape and np.isfinite(out).all()
    assert stats["mode"] == mode and stats["peak_rss_mib"] > 0
    if mode == "segments":
        assert len(latents) == 6 and stats["denoiser_call_frames"] == 16
    else:
        frames = latent_frames_for(pipe, v.shape[1])
        assert frames % pipe.denoiser.config.downsampling == 0 and frames * 8 >= v.shape[1]
        assert len(latents) == 1 and latents[0].shape == (4, frames) == (4, stats["latent_frames"])
        assert stats["denoiser_call_frames"] == (frames if mode == "onepass" else 16)


def test_onepass_refuses_latents_over_the_limit():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="max_frames"):
        generate_accompaniment(pipe, vocal(800), steps=1, guidance=2.0, seed=0, mode="onepass", max_frames=64)
    with pytest.raises(ValueError, match="mode must be"):
        generate_accompaniment(pipe, vocal(80), steps=1, guidance=2.0, seed=0, mode="whole")


def test_onepass_litefocus_with_every_key_is_dense():
    pipe = tiny_pipeline()
    v = vocal(4 * pipe.segment_samples)
    dense = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=0, mode="onepass")
    full = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=0, mode="onepass",
                                  litefocus=LiteFocusConfig(ratio=1.0, band=1))
    sparse = generate_accompaniment(pipe, v, steps=2, guidance=2.0, seed=0, mode="onepass",
                                    litefocus=LiteFocusConfig(ratio=0.1, band=1))
    np.testing.assert_allclose(full, dense, rtol=1e-4, atol=1e-5)
    assert np.isfinite(sparse).all() and not np.allclose(sparse, dense, atol=1e-5)


class Recorder(torch.nn.Module):
    """The denoiser, recording the compensation indices of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, x, t, cond, comp_idx=None, *, litefocus=None):
        self.seen.append(None if comp_idx is None else comp_idx.clone())
        return self.model(x, t, cond, comp_idx, litefocus=litefocus)


def test_sampler_draws_fresh_indices_per_call_from_the_seed():
    pipe = tiny_pipeline()
    rec = Recorder(pipe.denoiser)
    pipe = dataclasses.replace(pipe, denoiser=rec)
    lf = LiteFocusConfig(ratio=0.25, band=1, seed=11)
    frames = 64
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 4, frames, generator=g), torch.randn(1, 4, frames, generator=g)
    sample_latent(pipe, cond, noise, steps=3, guidance=2.0, litefocus=lf)
    assert len(rec.seen) == 3  # one call per step: CFG's two branches share the draw
    for call, idx in enumerate(rec.seen):
        torch.testing.assert_close(idx, compensation_indices(frames // 2, 0.25, seed=11, call=call))
    assert not torch.equal(rec.seen[0], rec.seen[1])


def test_window_starts_cover_the_latent():
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(42, 16, 8) == [0, 8, 16, 24, 26]
    with pytest.raises(ValueError):
        window_starts(8, 16, 8)


def test_windows_without_overlap_are_independent_windows():
    # hop = window: MultiDiffusion's average has one term per frame, each window its own trajectory
    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    joint = sample_latent_windows(pipe, cond, noise, steps=2, guidance=2.0, hop=16)
    for s in (0, 16):
        alone = sample_latent(pipe, cond[..., s:s + 16], noise[..., s:s + 16], steps=2, guidance=2.0)
        torch.testing.assert_close(joint[..., s:s + 16], alone)
    overlapped = sample_latent_windows(pipe, cond, noise, steps=2, guidance=2.0)  # hop 8
    assert not torch.allclose(overlapped, joint)


def test_chunked_vae_matches_whole_vae_on_the_demo():
    pipe = load_checkpoint()
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 512, generator=g)
    err = seam_error(pipe, latent, chunk_frames=128, context_frames=32)
    assert err["max_abs_at_seams_rel"] < 1e-5 and err["rms_rel"] < 1e-5, err
    cut = seam_error(pipe, latent, chunk_frames=128, context_frames=0)  # no context: the seams show
    assert cut["max_abs_at_seams_rel"] > 100 * err["max_abs_at_seams_rel"]
    with torch.no_grad():
        audio = decode_latent(pipe, latent)
        whole = encode_audio(pipe, audio)
        chunked = encode_audio_chunked(pipe, audio, chunk_frames=128, context_frames=32)
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
        torch.testing.assert_close(decode_latent_chunked(pipe, latent, chunk_frames=1024), audio, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_pipeline())


@pytest.mark.parametrize("extra", [[], ["--attention", "litefocus", "--compensation", "0.2"],
                                   ["--mode", "windows"], ["--mode", "segments"]])
def test_generate_verb(tiny_checkpoint, tmp_path, capsys, extra):
    wav = tmp_path / "vocals.wav"
    sf.write(wav, vocal(2000)[0], 8000)  # 0.25 s, 15.6 training segments of the tiny model
    out = tmp_path / "acc.wav"
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--vocals", str(wav), "--out", str(out),
                 "--steps", "1", *extra]) == 0
    audio, rate = sf.read(out)
    assert rate == 8000 and audio.shape == (2000,) and np.isfinite(audio).all()
    printed = capsys.readouterr().out
    mode = extra[1] if extra and extra[0] == "--mode" else "onepass"
    assert f"mode {mode}" in printed and "peak RSS" in printed
    assert ("litefocus attention" in printed) == ("litefocus" in extra)


def test_generate_verb_refuses_litefocus_options_with_dense(tiny_checkpoint, tmp_path, capsys):
    wav = tmp_path / "vocals.wav"
    sf.write(wav, vocal(800)[0], 8000)
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--vocals", str(wav),
                 "--out", str(tmp_path / "a.wav"), "--compensation", "0.3"]) == 2
    assert "apply to --attention litefocus" in capsys.readouterr().err


def test_attention_maps_verb(tiny_checkpoint, tmp_path, capsys):
    import json

    from toolkit.attention_maps import analyse
    from toolkit.data.synth import write_synth_dataset

    data = tmp_path / "data"
    write_synth_dataset(data, n=2, seconds=1.0, sample_rate=8000, channels=1, seed=0)
    out = tmp_path / "maps"
    assert main(["attention-maps", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--out", str(out),
                 "--frames", "32", "--timesteps", "0.8", "0.2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["maps"]) == {"global", "cross_down1", "cross_up1"}
    maps = np.load(out / "maps.npz")
    assert maps["global"].shape == (2, 16, 16)  # 32 frames, bottleneck 16
    np.testing.assert_allclose(maps["global"].sum(axis=-1), 1.0, rtol=1e-5)  # rows are distributions
    assert (out / "attention_maps.png").is_file() and (out / "offset_profiles.png").is_file()
    assert "suggested LiteFocus" in capsys.readouterr().out
    # the analysis on known maps: a pure diagonal band of ±2, and uniform attention
    n = 16
    band = (np.abs(np.arange(n)[:, None] - np.arange(n)[None]) <= 2).astype(float)
    a = analyse(band / band.sum(axis=1, keepdims=True))
    assert a["band_mass"][2] == pytest.approx(1.0) and a["band_for_90pct"] == 2
    u = analyse(np.full((n, n), 1.0 / n))
    assert u["band_mass"][4] == pytest.approx(u["uniform_band_mass"][4]) and u["suggested"]["lags"] == []


def test_long_audio_benchmark_rows_at_tiny_size():
    from benchmarks.long_audio import build_table, measure

    rows = [measure({"config": "tiny", "multiple": m, "attention": a, "compensation": 0.25, "runs": 1,
                     "warmup": 0, "threads": 1, "seed": 0}) for m in (1, 4) for a in ("dense", "litefocus")]
    assert all(r["output_finite"] and r["gflops"] > 0 and 0 < r["soft_alignment_flop_share"] < 1 for r in rows)
    by = {(r["multiple"], r["attention"]): r for r in rows}
    # dense up to the training length: the same call; beyond it LiteFocus scores fewer keys
    assert by[(1, "dense")]["gflops"] == by[(1, "litefocus")]["gflops"]
    assert by[(4, "litefocus")]["global_scores_mib"] < by[(4, "dense")]["global_scores_mib"]
    table = build_table(rows + [{"multiple": 8, "attention": "dense", "error": "timeout after 1 s"}]).splitlines()
    assert len(table) == 2 + 5 and "timeout" in table[-1] and "1.00×" in table[2]


def test_seam_onset_ratio_sees_clicks_at_the_seams():
    from benchmarks.long_audio import seam_onset_ratio

    sr, seg = 2000, 0.5
    rng = np.random.default_rng(0)
    audio = 0.01 * rng.standard_normal((1, 4 * sr)).astype(np.float32)
    smooth = seam_onset_ratio(audio, sr, seg)
    clicked = audio.copy()
    for k in (1, 2, 3):
        clicked[0, int(k * seg * sr):int(k * seg * sr) + 20] += 1.0
    assert seam_onset_ratio(clicked, sr, seg) > 3 * smooth
    assert seam_onset_ratio(audio[:, :sr // 4], sr, seg) is None  # shorter than a segment: no seam
