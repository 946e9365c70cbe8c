import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from toolkit.checkpoint import (
    Pipeline, PipelineConfig, load_checkpoint, save_checkpoint,
)
from toolkit.checkpoint_errors import CheckpointError
from toolkit.config import ConfigError, config_from_dict, config_to_dict
from toolkit.diffusion import CosineSchedule
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=2, latent_scale=0.5),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", tiny_pipeline())


ALL_CONFIGS = [
    *SOFTALIGN_PRESETS.values(), *OOBLECK_PRESETS.values(), CosineSchedule(),
    PipelineConfig(name="x", provenance={"command": "toolkit train", "steps": [1, 2]}),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips(config):
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["type"] == config.TYPE and data["version"] == config.VERSION
    assert config_from_dict(data) == config


def test_config_errors_name_field_and_source():
    data = config_to_dict(SOFTALIGN_PRESETS["tiny"])
    with pytest.raises(ConfigError, match="cfg.json.*version"):
        config_from_dict({**data, "version": 99}, source="cfg.json")
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        config_from_dict({**data, "bogus": 1})
    with pytest.raises(ConfigError, match="type"):
        config_from_dict({**data, "type": "nope"})


def test_round_trip_is_bit_exact(ckpt):
    src = tiny_pipeline()
    loaded = load_checkpoint(ckpt)
    assert loaded.config == src.config
    for a, b in ((src.denoiser, loaded.denoiser), (src.vae, loaded.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        assert torch.equal(src.denoiser(x, torch.tensor([0.3]), x), loaded.denoiser(x, torch.tensor([0.3]), x))
    assert not list(ckpt.parent.glob(".ckpt.*")), "temporary directory left behind"


def test_corrupted_tensor_is_named(ckpt):
    path = ckpt / "denoiser" / "model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[3]
    state[name] = torch.zeros(*state[name].shape, 2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert name in str(err.value) and str(path) in str(err.value)


def test_nan_tensor_is_named(ckpt):
    path = ckpt / "vae" / "model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=f"'{name}'.*NaN"):
        load_checkpoint(ckpt)


def test_truncated_file_names_first_bad_tensor(ckpt):
    path = ckpt / "denoiser" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert str(path) in str(err.value) and "truncated" in str(err.value) and "tensor '" in str(err.value)


def test_mismatched_components_fail(ckpt, tmp_path):
    other = save_checkpoint(tmp_path / "other", Pipeline(
        config=PipelineConfig(name="demo"), denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["demo"]),
        vae=OobleckVAE(OOBLECK_PRESETS["tiny"])))
    with pytest.raises(CheckpointError, match="latent_channels"):
        load_checkpoint(other)
    # weights of one config under another config's config.json
    shutil.copy(other / "denoiser" / "model.safetensors", ckpt / "denoiser" / "model.safetensors")
    with pytest.raises(CheckpointError, match="denoiser/model.safetensors.*tensor '"):
        load_checkpoint(ckpt)


def test_missing_files_and_bad_json(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (ckpt / "vae" / "config.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="vae/config.json.*JSON"):
        load_checkpoint(ckpt)


def test_save_refuses_existing(ckpt):
    with pytest.raises(FileExistsError):
        save_checkpoint(ckpt, tiny_pipeline())


def test_saved_files_follow_the_umask_not_safetensors_private_mode(ckpt):
    """safetensors writes through a private temp file (0600); the toolkit's outputs take the umask."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    weights = sorted(ckpt.rglob("*.safetensors"))
    assert weights
    for path in weights:
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path
