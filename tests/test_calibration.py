"""Calibration (PTQ4ADM): quality measures, coverage, activation-aware sampling, fake quantization,
sensitivity and plans, on tiny seeded models."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from calibration import caption_coverage as cc
from calibration import coverage as cv
from calibration import quality

SR = 8000


def _tone(hz: float, seconds: float = 1.0, *, amplitude: float = 0.3, sample_rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * hz * t)


# ------------------------------------------------------------------------------------ quality


def test_frechet_distance_of_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    # N(0, I) vs N(μ, 4I): ‖μ‖² + tr(I + 4I − 2·2I) = 2 + 3.
    assert quality.frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert quality.frechet_distance([a[:100], a[100:]], a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_is_finite_with_singular_covariances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 16))  # fewer frames than dimensions: rank-deficient covariance
    b = rng.normal(size=(5, 16))
    assert np.isfinite(quality.frechet_distance(a, b))
    with pytest.raises(ValueError, match="dimensions"):
        quality.frechet_distance(a, rng.normal(size=(5, 8)))


def test_log_mel_frechet_separates_different_sounds():
    same = quality.log_mel_frechet([_tone(220)], [_tone(220, amplitude=0.3)], SR)
    near = quality.log_mel_frechet([_tone(220)], [_tone(233)], SR)
    far = quality.log_mel_frechet([_tone(220)], [_tone(1500)], SR)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert near < far


def test_safetensors_embedding_model_loads_and_embeds(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path = tmp_path / "emb.safetensors"
    save_file({"layers.0.weight": rng.normal(size=(8, 64)).astype(np.float32),
               "layers.0.bias": np.zeros(8, np.float32),
               "layers.1.weight": rng.normal(size=(4, 8)).astype(np.float32)}, str(path))
    model = quality.load_embedding_model(path)
    assert isinstance(model, quality.EmbeddingModel)
    e = model.embed(_tone(440), SR)
    assert e.ndim == 2 and e.shape[1] == 4
    assert np.isfinite(quality.audio_frechet([_tone(440)], [_tone(880)], SR, model=model))


def test_torchscript_embedding_model_loads_and_embeds(tmp_path):
    import torch

    class Frames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(80, 6)

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            n = audio.shape[-1] // 80
            return self.proj(audio[0, : n * 80].reshape(n, 80))

    path = tmp_path / "emb.pt"
    torch.jit.script(Frames()).save(str(path))
    model = quality.load_embedding_model(path)
    assert model.embed(_tone(440), SR).shape == (100, 6)
    with pytest.raises(ValueError, match="unknown embedding file type"):
        (tmp_path / "x.onnx").write_bytes(b"0")
        quality.load_embedding_model(tmp_path / "x.onnx")


def test_visqol_reports_unavailable_without_the_package():
    result = quality.visqol(_tone(440), _tone(440), SR)
    if quality.visqol_unavailable() is None:
        assert result["status"] == "ok"
    else:
        assert result["status"] == "unavailable" and "visqol" in result["reason"]


# ------------------------------------------------------------------------------------ coverage


def test_measured_features_follow_the_signal():
    f = cv.measure_features(_tone(440.0), SR)  # A4 = MIDI 69
    assert f["median_midi"] == pytest.approx(69.0, abs=0.3)
    assert f["voiced_ratio"] > 0.9
    assert f["rms_dbfs"] == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=0.5)
    quiet = cv.measure_features(_tone(440.0, amplitude=0.01), SR)
    assert quiet["rms_dbfs"] < f["rms_dbfs"] - 25
    shifted = cv.measure_features(cv.pitch_shift(_tone(440.0), -7.0), SR)
    assert shifted["median_midi"] == pytest.approx(62.0, abs=0.5)
    vib = cv.measure_features(cv.add_vibrato(_tone(440.0), SR, cents=60.0), SR)
    assert vib["vibrato_cents"] > f["vibrato_cents"] + 10


def test_coverage_vector_is_one_hot_per_measured_aspect():
    aspects = (cv.Aspect("register", "median_midi", (57.0, 65.0), ("low", "mid", "high")),
               cv.Aspect("loudness", "rms_dbfs", (-26.0,), ("quiet", "loud")))
    v = cv.coverage_vector({"median_midi": 69.0, "rms_dbfs": -40.0}, aspects)
    assert v.tolist() == [0, 0, 1, 1, 0]
    v = cv.coverage_vector({"median_midi": float("nan"), "rms_dbfs": -10.0}, aspects)
    assert v.tolist() == [0, 0, 0, 0, 1]  # an unmeasured feature covers nothing
    assert cv.global_coverage([np.array([1, 0, 0]), np.array([0, 0, 1])]).tolist() == [1, 0, 1]


def test_redundancy_counts_ordered_pairs_of_equal_vectors():
    a, b = np.array([1, 0, 1]), np.array([0, 1, 1])
    assert cv.redundancy([a, b]) == 0
    assert cv.redundancy([a, a.copy(), b]) == 2  # Σ_{i≠j}: (0,1) and (1,0)
    assert cv.redundancy([a, a, a, b, b]) == 3 * 2 + 2 * 1


def test_augment_audio_reaches_coverage_and_removes_redundancy():
    from toolkit.data import synth

    clip = synth.synth_pair(0, seconds=1.0, sample_rate=SR)[0][0]
    # Two identical clips: R = 2 at the start, and most bins uncovered.
    examples, report = cv.augment_audio([("a", clip), ("b", clip.copy())], SR, max_iterations=8, seed=0)
    assert report["covered"] > report["initial_covered"]
    assert report["redundancy"] <= report["redundancy_threshold"] == 0
    assert len(report["history"]) == report["iterations"] <= 8
    covers = {e["name"]: e["covers"] for e in report["examples"]}
    for added in report["added"]:  # every added example was validated on its measured coverage
        if added["name"] in covers:  # (unless later replaced to diversify a duplicate)
            assert added["target"] in covers[added["name"]]
    assert [e.name for e in examples] == list(covers)
    json.dumps(report)
    assert set(report["aspects"]) == {a.name for a in cv.AUDIO_ASPECTS}


def test_augment_captions_covers_every_topic_with_templates():
    captions = ["a dog barking in the distance", "a dog barking in the distance", "piano music"]
    final, report = cc.augment_captions(captions, max_iterations=3)
    assert report["full_coverage"] and report["uncovered"] == []
    assert report["redundancy"] == 0
    assert cv.redundancy([cc.caption_vector(c) for c in final]) == 0
    assert "piano music" in final


# ------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def tiny_pipeline():
    import torch

    from toolkit.checkpoint import Pipeline, PipelineConfig
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=4),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from toolkit.data.synth import write_synth_dataset

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(out, n=4, seconds=1.0, sample_rate=8000, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def calib_dir(tiny_pipeline, synth_dir, tmp_path_factory):
    from calibration.sampling import calibrate

    out = tmp_path_factory.mktemp("calib") / "aa"
    return calibrate(tiny_pipeline, synth_dir, strategy="activation-aware", size=12, steps=4, seed=0,
                     out_dir=out, show_progress=False)


def test_tau_var_fallback_lowers_the_threshold_until_a_layer_qualifies():
    from calibration.sampling import TAU_REDUCTION, select_layers

    var = np.array([1.0, 4.0, 0.3])
    sel = select_layers(var)  # 10 % of the max: layers 0 and 1 qualify, no fallback
    assert sel.reductions == 0 and sel.qualifying == (0, 1)
    assert sel.layer_probability.sum() == pytest.approx(1.0) and sel.layer_probability[2] == 0
    sel = select_layers(var, tau_var=100.0)  # nothing qualifies: halve until the top layer does
    assert sel.qualifying == (1,)
    assert sel.reductions == int(np.ceil(np.log(100.0 / 4.0) / np.log(1 / TAU_REDUCTION)))
    assert sel.tau_var <= 4.0 < sel.tau_var / TAU_REDUCTION
    with pytest.raises(ValueError):
        select_layers(np.zeros(3))


def test_sampling_probabilities_sum_to_one():
    from calibration.sampling import (activation_aware_probabilities, normal_probabilities,
                                      uniform_probabilities)

    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, size=(6, 10))
    v[:, 7] *= 50  # one step with much larger activations takes most of the mass
    p, q, _ = activation_aware_probabilities(v)
    assert p.sum() == pytest.approx(1.0) and np.allclose(q.sum(axis=1), 1.0)
    assert int(np.argmax(p)) == 7
    assert uniform_probabilities(10).sum() == pytest.approx(1.0)
    t = np.linspace(1.0, 0.1, 10)
    pn = normal_probabilities(t)
    assert pn.sum() == pytest.approx(1.0)
    inner = pn[1:-1]
    assert t[1:-1][np.argmax(inner)] == pytest.approx(0.4)  # PTQ4DM: the mode at 0.4 T
    from scipy.stats import norm
    assert pn[-1] == pytest.approx(norm.cdf(0.15, 0.4, 0.4))  # clamping: the tail lands on the end


def test_calibrate_writes_the_calibration_set(calib_dir, tiny_pipeline):
    from calibration.sampling import hooked_layers, load_calibration_set

    cs = load_calibration_set(calib_dir)
    m = cs.manifest
    assert m["strategy"] == "activation-aware" and m["size"] == 12
    assert cs.x_t.shape == (12, *tiny_pipeline.latent_shape) and cs.cond.shape == cs.x_t.shape
    assert cs.t.shape == (12,) and bool(((cs.t > 0) & (cs.t <= 1)).all())
    stats = json.loads((calib_dir / "layer_stats.json").read_text())
    assert stats["layers"] == list(hooked_layers(tiny_pipeline.denoiser, tiny_pipeline.family.attention_types))
    assert any("attn" in n for n in stats["layers"]) and "conv_out" in stats["layers"]
    assert sum(stats["step_probability"]["activation-aware"]) == pytest.approx(1.0)
    assert sum(stats["drawn_steps"]) == 12
    cov = json.loads((calib_dir / "coverage.json").read_text())
    assert cov["covered"] >= cov["initial_covered"] and "aspects" in cov
    assert not any(p.name.startswith(".") for p in calib_dir.parent.iterdir())  # no partial dirs left
    with pytest.raises(FileExistsError):
        from calibration.sampling import calibrate

        calibrate(tiny_pipeline, calib_dir, strategy="uniform", size=2, steps=2, seed=0, out_dir=calib_dir)


def test_calibrate_cli_parser_registers_the_verb():
    import argparse

    from calibration.sampling import add_calibrate_parser

    p = argparse.ArgumentParser()
    add_calibrate_parser(p.add_subparsers(dest="verb"))
    args = p.parse_args(["calibrate", "--data", "d", "--strategy", "normal", "--size", "8", "--out", "o"])
    assert args.strategy == "normal" and args.size == 8 and args.checkpoint is None and callable(args.func)


# ---------------------------------------------------------------- fake quantization, sensitivity

# Whole tiny denoiser at W8A8 (per-channel int8 weights, min/max int8 activations) against fp32,
# on the calibration intermediates. Measured ≈ 30 dB here; the floor leaves room for seeds.
MIN_SQNR_DB_W8A8 = 20.0


def test_weight_fake_quantization_is_per_channel_symmetric():
    import torch

    from calibration.fakequant import fake_quantize_weight

    w = torch.tensor([[0.1, -0.5, 0.25], [10.0, 2.0, -3.0]])
    q = fake_quantize_weight(w, 8)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)  # on each row's own grid
    assert torch.allclose(q.abs().amax(dim=1), w.abs().amax(dim=1))  # extremes are exact
    q4 = fake_quantize_weight(w, 4)
    assert len(torch.unique(torch.round(q4[1] / (10.0 / 7)))) <= 15


def test_fake_quantization_at_8_bits_keeps_the_tiny_model_above_the_sqnr_floor(tiny_pipeline, calib_dir):
    from calibration.fakequant import (PRECISIONS, activation_ranges, denoiser_sqnr_db, quantizable_leaves,
                                       quantized_copy)
    from calibration.sampling import load_calibration_set

    calib = load_calibration_set(calib_dir)
    den = tiny_pipeline.denoiser
    ranges = activation_ranges(den, calib)
    everything = {n: PRECISIONS["w8a8"] for n in quantizable_leaves(den)}
    sqnr8 = denoiser_sqnr_db(den, quantized_copy(den, everything, ranges), calib)
    assert sqnr8 >= MIN_SQNR_DB_W8A8
    w4 = {n: PRECISIONS["w4a8"] for n in quantizable_leaves(den)}
    assert denoiser_sqnr_db(den, quantized_copy(den, w4, ranges), calib) < sqnr8
    # The original is untouched.
    assert denoiser_sqnr_db(den, den, calib) == float("inf")
    p_ranges = activation_ranges(den, calib, observer="percentile", percentile=99.0)
    name = next(iter(ranges))
    assert ranges[name][0] <= p_ranges[name][0] <= p_ranges[name][1] <= ranges[name][1]


def test_sensitivity_resumes_after_interruption(tiny_pipeline, calib_dir, tmp_path):
    from calibration.fakequant import quantizable_leaves
    from calibration.sensitivity import sensitivity

    leaves = list(quantizable_leaves(tiny_pipeline.denoiser))
    out = tmp_path / "sens.json"
    first = sensitivity(tiny_pipeline, calib_dir, out_path=out, n_eval=2, layers=leaves[:2],
                        show_progress=False, plot=False)
    assert list(first["layers"]) == leaves[:2] and not first["complete"]
    saved = json.loads(out.read_text())
    saved["layers"][leaves[0]]["w8a8"]["latent_snr_db"] = -123.0  # a marker: must survive a resume
    out.write_text(json.dumps(saved))
    table = sensitivity(tiny_pipeline, calib_dir, out_path=out, n_eval=2, show_progress=False)
    assert table["complete"] and list(table["layers"]) == leaves
    assert table["layers"][leaves[0]]["w8a8"]["latent_snr_db"] == -123.0
    row = table["layers"]["conv_out"]
    assert row["w8a8"]["latent_snr_db"] > row["w4a8"]["latent_snr_db"]
    assert out.with_suffix(".png").is_file()
    with pytest.raises(ValueError, match="settings"):
        sensitivity(tiny_pipeline, calib_dir, out_path=out, n_eval=1, show_progress=False)


# ------------------------------------------------------------------------------------ plans


def _sizes_and_table():
    names = ["conv_in", "down.0.res.0.conv1", "down.0.res.0.conv2", "mid.0.conv1", "attn.qkv", "conv_out"]
    params = [100, 4000, 4000, 16000, 3000, 100]
    sizes = {n: {"weight_params": p, "bias_params": 0} for n, p in zip(names, params)}
    snr = {"down.0.res.0.conv1": (45, 30), "down.0.res.0.conv2": (60, 50), "mid.0.conv1": (70, 55),
           "attn.qkv": (40, 20), "conv_in": (35, 15), "conv_out": (30, 10)}
    table = {"settings": {"model": "t"}, "fp32_bytes": 4 * sum(params) + 400,
             "layers": {n: {"weight_params": sizes[n]["weight_params"],
                            "w8a8": {"latent_snr_db": a, "log_mel_l1": 0.0},
                            "w4a8": {"latent_snr_db": b, "log_mel_l1": 0.0}} for n, (a, b) in snr.items()}}
    return sizes, table


def test_preset_keeps_first_last_and_attention_high():
    from calibration.plan import make_plan

    sizes, _ = _sizes_and_table()
    plan = make_plan("w8a8", sizes, 4 * sum(s["weight_params"] for s in sizes.values()))
    assert plan["default"] == {"weights": "int8", "activations": "int8", "granularity": "per_channel"}
    assert set(plan["overrides"]) == {"conv_in", "conv_out", "attn.qkv"}
    assert all(o["weights"] == "fp16" for o in plan["overrides"].values())
    assert plan["budget"]["met"] is None


@pytest.mark.parametrize("preset", ["w8a16", "w8a8", "w4a8"])
def test_plan_respects_its_budget(preset):
    from calibration.plan import make_plan, parse_budget

    sizes, table = _sizes_and_table()
    budget = parse_budget("size=0.30")
    plan = make_plan(preset, sizes, table["fp32_bytes"], budget=budget, sensitivity=table)
    assert plan["budget"]["met"] and plan["budget"]["planned_bytes"] <= 0.30 * table["fp32_bytes"]
    assert plan["budget"]["size"] == 0.30 and plan["sensitivity"]["layers"]
    # Under a tighter budget the largest, least sensitive layer gives up bits first.
    small = make_plan(preset, sizes, table["fp32_bytes"], budget=0.20, sensitivity=table)
    assert small["budget"]["met"] and small["budget"]["size_ratio"] <= 0.20
    lowered = [m["layer"] for m in small["search"]["moves"] if m["why"] == "over budget"]
    if preset != "w4a8":
        assert lowered[0] == "mid.0.conv1"
    assert not any(m["layer"] in ("conv_in", "conv_out", "attn.qkv") for m in small["search"]["moves"]
                   if m["why"] == "over budget")  # the layers that hurt most are lowered last
    tight = make_plan(preset, sizes, table["fp32_bytes"], budget=0.05, sensitivity=table)
    assert tight["budget"]["met"] is False  # int4 everywhere is 1/8 of fp32: it says so, no pretending
    with pytest.raises(ValueError):
        parse_budget("bytes=3")


def test_sensitivity_decides_which_layers_stay_high():
    from calibration.plan import make_plan, predicted_snr_db
    from calibration.precision import LayerPrecision

    sizes, table = _sizes_and_table()
    # Errors add as independent noise: two layers at 30 dB alone predict 27 dB together.
    two = {"conv_in": LayerPrecision("int8", "int8"), "conv_out": LayerPrecision("int8", "int8")}
    table2 = {"layers": {n: {"w8a8": {"latent_snr_db": 30.0}} for n in two}}
    assert predicted_snr_db(two, table2) == pytest.approx(30 - 10 * np.log10(2))
    # Loose target: the literature's kept-high layers are measured harmless enough and quantized.
    loose = make_plan("w8a8", sizes, table["fp32_bytes"], sensitivity=table, min_snr_db=20.0)
    assert loose["overrides"] == {} and loose["search"]["predicted_latent_snr_db"] >= 20.0
    # Strict target: the worst layers move up, worst first (conv_out 30 dB, then conv_in 35 dB).
    strict = make_plan("w8a8", sizes, table["fp32_bytes"], sensitivity=table, min_snr_db=38.0)
    raised = [m["layer"] for m in strict["search"]["moves"] if m["why"].startswith("largest error")]
    assert raised[:2] == ["conv_out", "conv_in"]
    assert strict["search"]["predicted_latent_snr_db"] >= 38.0
    assert set(strict["overrides"]) >= {"conv_out", "conv_in"}


def test_component_assignment_resolves_sections_and_patterns():
    from calibration.plan import component_assignment, make_plan
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE, fold_for_export
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    den = SoftAlignUNet(SOFTALIGN_PRESETS["tiny"])
    vae = fold_for_export(OobleckVAE(OOBLECK_PRESETS["tiny"]))  # weight norm folded: plain convs
    from calibration.fakequant import quantizable_leaves
    from calibration.sensitivity import layer_sizes

    sizes, fp32 = layer_sizes(den)
    dec_layers = [f"decoder.{n}" for n in quantizable_leaves(vae.decoder)]
    plan = make_plan("w8a8", sizes, fp32, vae_decoder_layers=dec_layers)
    a = component_assignment(plan, "denoiser", den)
    assert set(a) == set(sizes) and a["conv_in"].weights == "fp16" and a["mid.0.conv1"].weights == "int8"
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = vae.decoder
    d = component_assignment(plan, "vae_decoder", Wrap())
    assert len(dec_layers) > 2
    assert d[dec_layers[0]].weights == "fp16" and d[dec_layers[-1]].weights == "fp16"
    assert all((d[n].weights, d[n].activations) == ("int8", "fp16") for n in dec_layers[1:-1])
    assert component_assignment(plan, "vae_encoder", Wrap()) is None
    plan["overrides"] = {"re:down\\..*": {"weights": "fp32", "activations": "fp32"}}
    a = component_assignment(plan, "denoiser", den)
    assert all(p.weights == "fp32" for n, p in a.items() if n.startswith("down."))
    plan["overrides"] = {"no.such.layer": {"weights": "fp32", "activations": "fp32"}}
    with pytest.raises(KeyError, match="no.such.layer"):
        component_assignment(plan, "denoiser", den, source="plan.json")


def test_cli_parsers_register(tmp_path):
    import argparse

    from calibration.plan import add_plan_parser
    from calibration.sensitivity import add_sensitivity_parser

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb")
    add_sensitivity_parser(sub)
    add_plan_parser(sub)
    a = p.parse_args(["sensitivity", "--calib", "c", "--out", "s.json"])
    assert a.resume and a.precision is None and callable(a.func)
    sizes, table = _sizes_and_table()
    table["complete"] = True
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps(table))
    out = tmp_path / "plan.json"
    a = p.parse_args(["plan", "--preset", "w4a8", "--sensitivity", str(sens), "--budget", "size=0.30",
                      "--out", str(out)])
    assert a.func(a) == 0
    plan = json.loads(out.read_text())
    assert plan["name"] == "w4a8" and plan["budget"]["met"]


def test_resynthesis_below_the_synthesizer_rate():
    """The 2 kHz demo's coverage loop resynthesizes below the synthesizer's 8 kHz floor."""
    import numpy as np

    from calibration.vocal_transforms import resynthesize

    y = resynthesize(np.random.default_rng(0), seconds=1.0, sample_rate=2000)
    assert y.shape[-1] == 2000 and np.isfinite(y).all() and np.abs(y).max() > 0


def _tiny_plan(pipe, preset="w8a8"):
    from calibration.fakequant import quantizable_leaves
    from calibration.plan import make_plan
    from calibration.sensitivity import layer_sizes
    from toolkit.components import component_specs

    sizes, fp32 = layer_sizes(pipe.denoiser)
    dec = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    return make_plan(preset, sizes, fp32, vae_decoder_layers=dec, model=pipe.config.name)


def test_evaluate_plan_reports_quality_loss_and_size(tiny_pipeline, calib_dir, synth_dir):
    from calibration.evaluate_plan import evaluate_plan

    ev = evaluate_plan(tiny_pipeline, _tiny_plan(tiny_pipeline), calib_dir, synth_dir, steps=2, guidance=2.0,
                       max_tracks=2, show_progress=False)
    assert ev["tracks"] == 2
    # Something was quantized (not identical), nothing exploded.
    assert 0.0 < ev["paired"]["latent_snr_db"] < 200.0
    assert all(np.isfinite(v["worst"]) for v in ev["relative_to_spread"].values())
    fd = ev["frechet_log_mel"]
    assert fd["change"] == pytest.approx(fd["quantized_to_truth"] - fd["fp32_to_truth"])
    assert set(ev["musical_agreement"]) == {"fp32", "quantized"}
    size = ev["size"]
    assert size["vae_encoder"]["ratio"] == 1.0  # the encoder stays float
    assert 0.25 < size["denoiser"]["ratio"] < 1.0 and 0.25 < size["vae_decoder"]["ratio"] < 1.0


def test_score_tracks_tells_the_true_accompaniment_from_noise(tiny_pipeline, synth_dir):
    from toolkit.evaluate import AGREEMENT_FIELDS, score_tracks

    rng = np.random.default_rng(0)
    true = score_tracks(tiny_pipeline, synth_dir, lambda t: t.accompaniment, show_progress=False)
    noise = score_tracks(tiny_pipeline, synth_dir, lambda t: rng.standard_normal(t.accompaniment.shape),
                         show_progress=False)
    assert true["tracks"] == noise["tracks"] == 4
    assert set(AGREEMENT_FIELDS) <= set(true) and set(AGREEMENT_FIELDS) <= set(true["per_track"][0])
    assert true["beat_alignment"] > 3.0 and noise["beat_alignment"] < 1.5
    assert true["chord_cosine"] > noise["chord_cosine"]


def test_quantized_bundle_is_refused_when_it_breaks_its_budget(tiny_pipeline, calib_dir, tmp_path):
    from runtime_py.verify import verify
    from toolkit.bundle import export_bundle
    from toolkit.export_errors import QualityBudgetError

    plan = _tiny_plan(tiny_pipeline)
    impossible = {"latent_snr_db_min": 150.0}  # int8 never gets there
    with pytest.raises(QualityBudgetError, match="latent_snr_db"):
        export_bundle(tiny_pipeline, target="onnx", out_root=tmp_path, plan=plan, calib=calib_dir, steps=2,
                      quality_budget=impossible)
    assert not (tmp_path / "tiny-onnx-w8a8").exists()  # nothing half-written left behind
    forced = export_bundle(tiny_pipeline, target="onnx", out_root=tmp_path, plan=plan, calib=calib_dir,
                           steps=2, quality_budget=impossible, force=True)
    manifest = json.loads((forced / "manifest.json").read_text())
    assert forced.name == "tiny-onnx-w8a8" and manifest["host_check"]["status"] == "fail"
    assert manifest["components"]["vae_encoder"]["details"].get("lowering") is None  # float
    for name in ("denoiser", "vae_decoder"):
        lowering = manifest["components"][name]["details"]["lowering"]
        assert any(e["applied"]["weights"] == "int8" for e in lowering["layers"].values())
    loose = {"latent_snr_db_min": -100.0, "max_relative_to_spread": 1e9}
    ok = export_bundle(tiny_pipeline, target="onnx", out_root=tmp_path / "ok", plan=plan, calib=calib_dir,
                       steps=2, quality_budget=loose)
    report = verify(ok, runs=1, warmup=0)
    assert report["status"] == "pass" and report["budget"]["limits"] == loose
    # The host check is the device's own check: the same figures.
    host = json.loads((ok / "manifest.json").read_text())["host_check"]["aggregate"]
    assert host["latent_snr_db"] == pytest.approx(report["quality"]["aggregate"]["latent_snr_db"], abs=1e-3)
