"""Checkpoints (ARCHITECTURE.md): ``pipeline.json`` + ``denoiser/`` + ``vae/``, each config.json + model.safetensors.

A checkpoint is written to a temporary sibling directory and renamed when complete. Loading checks
every file before any weight is used: an unreadable or truncated file, a config that does not
validate, and a tensor that does not match its config are errors naming the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toolkit.atomic import atomic_directory, save_safetensors
from toolkit.checkpoint_errors import CheckpointError, check_state_dict
from toolkit.config import ConfigError, config_from_dict, config_to_dict, register, require
from toolkit.diffusion import CosineSchedule
from toolkit.families import DEFAULT_FAMILY, FAMILIES, ModelFamily, get_family

FORMAT_VERSION = 1
PIPELINE_FILE = "pipeline.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo"


@register
@dataclass(frozen=True)
class PipelineConfig:
    """What a device and every verb need to know about a checkpoint besides the weights."""

    TYPE = "pipeline"
    VERSION = 1

    name: str
    family: str = DEFAULT_FAMILY  # selects the denoiser and autoencoder builders (toolkit.families)
    parameterization: str = "v"
    schedule_train_steps: int = 800
    schedule_offset: float = 0.008
    default_steps: int = 50
    default_guidance: float = 3.0
    guidance_folded: bool = False  # a distilled student that predicts the guided v itself
    # The denoiser works on VAE means × latent_scale (≈ unit variance); decoding divides it back.
    latent_scale: float = 1.0
    # Free-form provenance: how the weights were trained or distilled (command, time, data, ...).
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = "PipelineConfig"
        require(bool(self.name) and "/" not in self.name, n, "name", "must be a non-empty word")
        require(self.parameterization == "v", n, "parameterization",
                "only v-prediction is supported (seed 000 eq. 4)")
        require(self.default_steps >= 1, n, "default_steps", "must be >= 1")
        require(self.default_guidance >= 0, n, "default_guidance", "must be >= 0")
        require(isinstance(self.provenance, dict), n, "provenance", "must be a JSON object")
        require(self.latent_scale > 0, n, "latent_scale", "must be positive")
        require(self.family in FAMILIES, n, "family",
                f"{self.family!r} is not a registered model family (known: {', '.join(sorted(FAMILIES))})")

    @property
    def schedule(self) -> CosineSchedule:
        return CosineSchedule(train_steps=self.schedule_train_steps, offset=self.schedule_offset)


@dataclass
class Pipeline:
    """A loaded checkpoint: the config, the denoiser and the VAE (both in eval mode).

    The denoiser and the VAE follow the protocols of :mod:`toolkit.families`.
    """

    config: PipelineConfig
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    path: Path | None = None

    @property
    def family(self) -> ModelFamily:
        return get_family(self.config.family)

    @property
    def sample_rate(self) -> int:
        return self.vae.config.sample_rate

    @property
    def audio_channels(self) -> int:
        return self.vae.config.audio_channels

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.denoiser.config.latent_shape

    @property
    def segment_samples(self) -> int:
        """Audio samples that one denoiser latent spans."""
        return self.denoiser.config.latent_length * self.vae.config.downsampling


def check_compatible(config: PipelineConfig, den, vae, *, source: str) -> None:
    if den.latent_channels != vae.latent_dim:
        raise CheckpointError(
            f"{source}: denoiser latent_channels={den.latent_channels} but the VAE's "
            f"latent_dim={vae.latent_dim}; the two components were not trained together"
        )
    if abs(den.schedule_offset - config.schedule_offset) > 0:
        raise CheckpointError(
            f"{source}: denoiser schedule_offset={den.schedule_offset} but pipeline.json says "
            f"{config.schedule_offset}"
        )


def save_component(directory: Path, config: Any, module: torch.nn.Module) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_safetensors(state, directory / WEIGHTS_FILE,
                     metadata={"config_type": config.TYPE, "format_version": str(FORMAT_VERSION)})


def save_checkpoint(out_dir: Path, pipeline: Pipeline, *, overwrite: bool = False) -> Path:
    """Write ``pipeline`` to ``out_dir`` atomically (temporary sibling directory, then rename)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / PIPELINE_FILE).write_text(
            json.dumps({"format_version": FORMAT_VERSION, **config_to_dict(pipeline.config)},
                       indent=2) + "\n")
        save_component(tmp / "denoiser", pipeline.denoiser.config, pipeline.denoiser)
        save_component(tmp / "vae", pipeline.vae.config, pipeline.vae)
    return out_dir


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a checkpoint needs pipeline.json, "
                              "denoiser/ and vae/ (see ARCHITECTURE.md)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _check_safetensors_layout(path: Path) -> None:
    """Name the first tensor whose bytes lie past the end of a (truncated) safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file holds {size}; "
                                  "the file is truncated or not safetensors")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: header is not valid JSON; not a safetensors file") from None
    data_bytes = size - 8 - n
    entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
    for _, name, entry in entries:
        if entry["data_offsets"][1] > data_bytes:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {entry['data_offsets'][1]} of the data "
                f"but the file holds {data_bytes}; the file is truncated, re-copy it"
            )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, with errors that name the file (and the tensor when truncated)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    _check_safetensors_layout(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None


def load_component(directory: Path, config_cls: type, module_cls: type):
    cfg_path = directory / CONFIG_FILE
    try:
        config = config_from_dict(_read_json(cfg_path), source=str(cfg_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, config_cls):
        raise CheckpointError(f"{cfg_path}: field 'type' is {config.TYPE!r}, expected "
                              f"{config_cls.TYPE!r} for {directory.name}/")
    module = module_cls(config)
    weights_path = directory / WEIGHTS_FILE
    state = load_weights(weights_path)
    check_state_dict(module, state, source=str(weights_path))
    module.load_state_dict(state)
    return module.eval()


def load_checkpoint(path: Path | None = None) -> Pipeline:
    """Load a checkpoint directory (default: the demo model embedded in the package)."""
    path = Path(path) if path is not None else DEMO_CHECKPOINT
    if not path.is_dir():
        hint = (" (the embedded demo is missing: run the training commands in README.md)"
                if path == DEMO_CHECKPOINT else "")
        raise CheckpointError(f"{path}: checkpoint directory not found{hint}")
    pj = path / PIPELINE_FILE
    data = _read_json(pj)
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{pj}: field 'format_version' is {version!r}, this toolkit reads "
                              f"{FORMAT_VERSION}")
    try:
        config = config_from_dict(data, source=str(pj))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    family = get_family(config.family)
    denoiser = load_component(path / "denoiser", family.denoiser_config, family.denoiser)
    vae = load_component(path / "vae", family.autoencoder_config, family.autoencoder)
    check_compatible(config, denoiser.config, vae.config, source=str(pj))
    return Pipeline(config=config, denoiser=denoiser, vae=vae, path=path)
