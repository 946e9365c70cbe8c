"""Oobleck VAE: config, shapes, Stable Audio Open key layout and loading, export folding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from toolkit.checkpoint_errors import CheckpointError
from toolkit.config import ConfigError, config_from_dict, config_to_dict
from toolkit.models.oobleck import (
    OOBLECK_PRESETS,
    FoldedSnakeBeta,
    OobleckConfig,
    OobleckVAE,
    SnakeBeta,
    count_parameters,
    fold_for_export,
    load_sao_autoencoder,
)

FOLD_ATOL = 1e-5

# Key names and shapes of the Stable Audio Open autoencoder, read off stable-audio-tools
# (autoencoders.py OobleckEncoder/OobleckDecoder with legacy weight_norm, blocks.py SnakeBeta) and
# checked against those classes built with the SAO config: 365 tensors, 156,112,514 parameters.
SAO_KEYS = {
    "encoder.layers.0.weight_v": (128, 2, 7),
    "encoder.layers.0.weight_g": (128, 1, 1),
    "encoder.layers.0.bias": (128,),
    # encoder block 1, residual unit 0, first Snake
    "encoder.layers.1.layers.0.layers.0.alpha": (128,),
    "encoder.layers.1.layers.0.layers.0.beta": (128,),
    # encoder block 1, residual unit 0, dilated k7 conv
    "encoder.layers.1.layers.0.layers.1.weight_v": (128, 128, 7),
    # encoder block 1 downsampling conv (stride 2 -> kernel 4)
    "encoder.layers.1.layers.4.weight_v": (128, 128, 4),
    # encoder block 5: 1024 -> 2048, stride 8 -> kernel 16
    "encoder.layers.5.layers.4.weight_v": (2048, 1024, 16),
    "encoder.layers.6.alpha": (2048,),
    "encoder.layers.7.weight_v": (128, 2048, 3),
    "encoder.layers.7.bias": (128,),
    "decoder.layers.0.weight_v": (2048, 64, 7),
    "decoder.layers.1.layers.0.alpha": (2048,),
    # decoder block 1 ConvTranspose: weight is [in, out, k], weight_g is [in, 1, 1]
    "decoder.layers.1.layers.1.weight_g": (2048, 1, 1),
    "decoder.layers.1.layers.1.weight_v": (2048, 1024, 16),
    "decoder.layers.1.layers.1.bias": (1024,),
    "decoder.layers.1.layers.2.layers.1.weight_v": (1024, 1024, 7),
    "decoder.layers.5.layers.1.weight_g": (128, 1, 1),
    "decoder.layers.5.layers.1.weight_v": (128, 128, 4),
    "decoder.layers.6.beta": (128,),
    "decoder.layers.7.weight_g": (2, 1, 1),
    "decoder.layers.7.weight_v": (2, 128, 7),
}
SAO_TENSOR_COUNT = 365


def _meta_sao() -> OobleckVAE:
    with torch.device("meta"):
        return OobleckVAE(OOBLECK_PRESETS["sao"])


def _randomise(vae: OobleckVAE, seed: int) -> OobleckVAE:
    """Give Snake non-trivial α, β (they initialise to log 1 = 0) so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, SnakeBeta):
                module.alpha.copy_(0.3 * torch.randn(module.alpha.shape, generator=gen))
                module.beta.copy_(0.3 * torch.randn(module.beta.shape, generator=gen))
    return vae.eval()


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OOBLECK_PRESETS))
def test_config_round_trips(name):
    config = OOBLECK_PRESETS[name]
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "change, field",
    [
        ({"channels": 0}, "channels"),
        ({"audio_channels": -1}, "audio_channels"),
        ({"latent_dim": 2.0}, "latent_dim"),
        ({"sample_rate": True}, "sample_rate"),
        ({"c_mults": (1, 2, 4)}, "strides"),
        ({"c_mults": ()}, "c_mults"),
        ({"c_mults": [1, 2]}, "c_mults"),
        ({"strides": (2, 0)}, "strides"),
        ({"strides": (2, 3)}, "strides"),
        ({"final_tanh": 1}, "final_tanh"),
    ],
)
def test_config_rejects(change, field):
    with pytest.raises(ConfigError, match=f"OobleckConfig.{field}"):
        dataclasses.replace(OOBLECK_PRESETS["tiny"], **change)


def test_presets():
    assert OOBLECK_PRESETS["sao"].downsampling == 2048
    assert OOBLECK_PRESETS["demo"].downsampling == 32
    assert OOBLECK_PRESETS["tiny"].downsampling == 8


# --- model -------------------------------------------------------------------------------------


def test_sao_parameter_count():
    assert 150e6 <= count_parameters(_meta_sao()) <= 162e6


@pytest.mark.parametrize("name, frames", [("tiny", 5), ("demo", 3)])
def test_encode_decode_shapes(name, frames):
    config = OOBLECK_PRESETS[name]
    torch.manual_seed(0)
    vae = OobleckVAE(config).eval()
    audio = torch.randn(2, config.audio_channels, frames * config.downsampling)
    with torch.no_grad():
        mean, scale = vae.encode(audio)
        latent = vae.encode_latent(audio)
        drawn = vae.encode_latent(audio, sample=True, generator=torch.Generator().manual_seed(1))
        again = vae.encode_latent(audio, sample=True, generator=torch.Generator().manual_seed(1))
        out = vae.decode(latent)
        step = vae(audio, generator=torch.Generator().manual_seed(2))
    assert mean.shape == scale.shape == latent.shape == (2, config.latent_dim, frames)
    assert torch.equal(latent, mean)
    assert torch.equal(drawn, again) and not torch.equal(drawn, mean)
    assert out.shape == audio.shape
    assert step.reconstruction.shape == audio.shape
    assert step.kl.dim() == 0 and torch.isfinite(step.kl)
    assert bool((step.std > 0).all())


def test_encode_rejects_bad_lengths():
    vae = OobleckVAE(OOBLECK_PRESETS["tiny"])
    with pytest.raises(ValueError, match="multiple of the downsampling"):
        vae.encode(torch.zeros(1, 1, 12))
    with pytest.raises(ValueError, match="audio must be"):
        vae.encode(torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 3, 2))


# --- Stable Audio Open key layout and loading -----------------------------------------------------


def test_sao_key_layout():
    state = _meta_sao().state_dict()
    assert len(state) == SAO_TENSOR_COUNT
    for name, shape in SAO_KEYS.items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, name
    assert "decoder.layers.7.bias" not in state
    assert not any(name.endswith(".weight") for name in state)  # all convs are weight-normed


@pytest.fixture(scope="module")
def sao_files(tmp_path_factory):
    """A random SAO-sized state dict under pretransform.model., plus diffusion-model strays, saved
    as .safetensors and as .ckpt with {"state_dict": ...}."""
    gen = torch.Generator().manual_seed(0)
    bare = {
        name: torch.randn(ref.shape, generator=gen) for name, ref in _meta_sao().state_dict().items()
    }
    full = {f"pretransform.model.{name}": t for name, t in bare.items()}
    full["model.model.transformer.layers.0.self_attn.to_qkv.weight"] = torch.randn(6, 4, generator=gen)
    full["model.model.preprocess_conv.weight"] = torch.randn(3, 3, 1, generator=gen)
    root = tmp_path_factory.mktemp("sao")
    st_path, ckpt_path = root / "model.safetensors", root / "model.ckpt"
    save_file(full, str(st_path))
    torch.save({"state_dict": full}, ckpt_path)
    return bare, st_path, ckpt_path


def test_load_sao_checkpoints_bit_identical(sao_files):
    bare, st_path, ckpt_path = sao_files
    for path in (st_path, ckpt_path):
        vae = load_sao_autoencoder(path)
        assert not vae.training
        loaded = vae.state_dict()
        assert loaded.keys() == bare.keys()
        for name, tensor in bare.items():
            assert torch.equal(loaded[name], tensor), (path, name)
        assert all(p.device.type == "cpu" for p in vae.parameters())
        del vae, loaded


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return OobleckVAE(OOBLECK_PRESETS["tiny"]).state_dict()


def test_load_bare_keys(tmp_path):
    state = _tiny_state()
    path = tmp_path / "ae.safetensors"
    save_file(state, str(path))
    vae = load_sao_autoencoder(path, OOBLECK_PRESETS["tiny"])
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())


def test_load_wrong_shape_names_tensor_and_file(tmp_path):
    state = {f"pretransform.model.{k}": v for k, v in _tiny_state().items()}
    state["pretransform.model.decoder.layers.1.layers.1.weight_g"] = torch.ones(3, 1, 1)
    path = tmp_path / "wrong_shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(path, OOBLECK_PRESETS["tiny"])
    assert "decoder.layers.1.layers.1.weight_g" in str(info.value)
    assert "wrong_shape.safetensors" in str(info.value)


def test_load_missing_tensor_names_tensor_and_file(tmp_path):
    state = {f"pretransform.model.{k}": v for k, v in _tiny_state().items()}
    del state["pretransform.model.encoder.layers.1.layers.0.layers.0.alpha"]
    path = tmp_path / "missing.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(path, OOBLECK_PRESETS["tiny"])
    assert "encoder.layers.1.layers.0.layers.0.alpha" in str(info.value)
    assert "missing.ckpt" in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_truncated_file_names_file(tmp_path, suffix):
    state = _tiny_state()
    path = tmp_path / f"truncated{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"truncated{suffix}"):
        load_sao_autoencoder(path, OOBLECK_PRESETS["tiny"])


def test_load_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_sao_autoencoder(tmp_path / "nope.safetensors")


# --- export form ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, frames", [("tiny", 6), ("demo", 2)])
def test_fold_for_export_matches(name, frames):
    config = OOBLECK_PRESETS[name]
    torch.manual_seed(0)
    vae = _randomise(OobleckVAE(config), seed=1)
    folded = fold_for_export(vae)

    names = folded.state_dict().keys()
    assert not any("weight_g" in k or "weight_v" in k for k in names)
    assert not any(isinstance(m, SnakeBeta) for m in folded.modules())
    assert any(isinstance(m, FoldedSnakeBeta) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    assert any("weight_g" in k for k in vae.state_dict())  # the original is untouched

    audio = torch.randn(2, config.audio_channels, frames * config.downsampling)
    with torch.no_grad():
        latent = vae.encode_latent(audio)
        latent_folded = folded.encode_latent(audio)
        out, out_folded = vae.decode(latent), folded.decode(latent)
    torch.testing.assert_close(latent_folded, latent, atol=FOLD_ATOL, rtol=0)
    torch.testing.assert_close(out_folded, out, atol=FOLD_ATOL, rtol=0)
