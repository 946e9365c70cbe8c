"""A second model family goes through checkpoint → calibrate → plan → export → verify untouched."""

import json

import pytest
import torch

import tests.second_family as second
from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint, save_checkpoint
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    pipe = Pipeline(config=PipelineConfig(name="conv2d", family=second.NAME, default_steps=3,
                                          default_guidance=2.0),
                    denoiser=second.Conv2dDenoiser(second.Conv2dDenoiserConfig()).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "conv2d", pipe)


@pytest.fixture(scope="module")
def calib_dir(checkpoint, tmp_path_factory):
    from calibration.sampling import calibrate
    from toolkit.data.synth import write_synth_dataset

    data = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(data, n=3, seconds=1.0, sample_rate=8000, seed=0, progress=False)
    return calibrate(load_checkpoint(checkpoint), data, strategy="activation-aware", size=8, steps=3, seed=0,
                     out_dir=tmp_path_factory.mktemp("calib") / "aa", show_progress=False)


def test_family_field_selects_the_builders(checkpoint, tmp_path):
    pipe = load_checkpoint(checkpoint)
    assert isinstance(pipe.denoiser, second.Conv2dDenoiser)
    assert pipe.family.name == second.NAME
    data = json.loads((checkpoint / "pipeline.json").read_text())
    data["family"] = "no-such-family"
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(checkpoint, bad)
    (bad / "pipeline.json").write_text(json.dumps(data))
    from toolkit.checkpoint_errors import CheckpointError

    with pytest.raises(CheckpointError, match="family.*'no-such-family'.*softalign-oobleck"):
        load_checkpoint(bad)


def test_denoiser_follows_the_protocol(checkpoint):
    pipe = load_checkpoint(checkpoint)
    d, length = pipe.latent_shape
    x, cond = torch.randn(2, d, length), torch.randn(2, d, length)
    with torch.no_grad():
        v = pipe.denoiser(x, torch.rand(2), cond)
    assert v.shape == x.shape and d == pipe.vae.config.latent_dim


def test_softalign_presets_do_not_silently_match_another_model(checkpoint):
    from calibration.plan import make_plan
    from calibration.sensitivity import layer_sizes

    pipe = load_checkpoint(checkpoint)
    sizes, fp32 = layer_sizes(pipe.denoiser)
    assert {"down", "up", "mid", "conv_in", "conv_out", "time"} == set(sizes)  # Conv2d, ConvTranspose2d seen
    # SoftAlign's keep-high list: conv_in / conv_out happen to exist here, so it applies in part;
    # a list none of whose patterns matches (written for another model) is refused.
    assert set(make_plan("w8a8", sizes, fp32)["overrides"]) == {"conv_in", "conv_out"}
    with pytest.raises(ValueError, match="match no layer.*vocal"):
        make_plan("w8a8", sizes, fp32, keep_high=(r"vocal\.conv_in", r"attn(\..*)?", r".*\.cross(\..*)?"))
    bad = {"default": {"weights": "int8", "activations": "int8", "granularity": "per_channel"},
           "overrides": {"re:.*\\.cross.*": {"weights": "fp16", "activations": "fp16"}}}
    from calibration.plan import component_assignment

    with pytest.raises(ValueError, match="match no layer"):
        component_assignment(bad, "denoiser", pipe.denoiser)


def test_a_layer_the_plan_cannot_see_is_named():
    from toolkit.families import check_quantizable

    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1), torch.nn.Conv3d(2, 2, 1), torch.nn.Embedding(4, 2))
    with pytest.raises(TypeError, match=r"1 \(Conv3d\).*2 \(Embedding\)"):
        check_quantizable(model, source="model")


@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_calibrate_plan_export_verify(checkpoint, calib_dir, tmp_path, target):
    from calibration.fakequant import quantizable_leaves
    from calibration.plan import make_plan
    from calibration.sensitivity import layer_sizes
    from runtime_py.verify import verify
    from toolkit.bundle import export_bundle
    from toolkit.components import component_specs

    pipe = load_checkpoint(checkpoint)
    sizes, fp32 = layer_sizes(pipe.denoiser)
    dec = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    plan = make_plan("w8a8", sizes, fp32, vae_decoder_layers=dec, model=pipe.config.name,
                     keep_high=pipe.family.keep_high)
    assert plan["overrides"].keys() == {"conv_in", "conv_out"}
    loose = {"latent_snr_db_min": -100.0, "max_relative_to_spread": 1e9}  # random weights: plumbing only
    bundle = export_bundle(pipe, target=target, out_root=tmp_path, plan=plan, calib=calib_dir, steps=2,
                           quality_budget=loose)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == second.NAME
    layers = manifest["components"]["denoiser"]["details"]["lowering"]["layers"]
    assert set(layers) == set(sizes)
    int8 = {n for n, rec in layers.items() if rec["applied"]["weights"] == "int8"}
    assert {"down", "mid", "up"} & int8, layers  # 2-D convolutions really quantized
    report = verify(bundle, runs=1, warmup=0)
    assert report["status"] == "pass", report["reason"]
