"""The training pairs as VAE latents, encoded once and cached beside the run's state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.checkpoint import Pipeline
from toolkit.fingerprint import module_digest
from toolkit.training import save_state

LATENTS_FILE = "latents.pt"


# --- data -------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent_pairs(pipeline: Pipeline, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocal, accompaniment) latents of every whole ``segment_samples`` segment of every track,
    through ``toolkit.generate.encode_audio`` (VAE mean × latent_scale), the denoiser's inputs."""
    from toolkit.generate import encode_audio
    from toolkit.training import load_audio_set

    tracks = load_audio_set(Path(data_dir), sample_rate=pipeline.sample_rate,
                            channels=pipeline.audio_channels)
    seg = pipeline.segment_samples
    vocals, accs = [], []
    for track in tracks:
        starts = range(0, track.num_samples - seg + 1, seg)
        if not starts:
            continue
        v = torch.from_numpy(np.stack([track.vocals[:, s:s + seg] for s in starts])).float()
        a = torch.from_numpy(np.stack([track.accompaniment[:, s:s + seg] for s in starts])).float()
        vocals.append(encode_audio(pipeline, v)); accs.append(encode_audio(pipeline, a))
    if not vocals:
        raise ValueError(f"{data_dir}: no track is at least one segment ({seg} samples, "
                         f"{seg / pipeline.sample_rate:.3f} s) long")
    return torch.cat(vocals), torch.cat(accs)


def cached_latents(pipeline: Pipeline, data_dir: Path, state_dir: Path, *,
                   write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents of ``data_dir``, encoded once and kept in ``state_dir/latents.pt`` (keyed by the
    data folder, the VAE weights, the segment length and the latent scale)."""
    key = {"data": str(Path(data_dir).resolve()), "vae_sha256": module_digest(pipeline.vae),
           "segment_samples": pipeline.segment_samples, "latent_scale": pipeline.config.latent_scale}
    path = state_dir / LATENTS_FILE
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return cached["vocals"], cached["accompaniment"]
    vocals, accs = encode_latent_pairs(pipeline, Path(data_dir))
    if write:
        save_state(state_dir, {"key": key, "vocals": vocals, "accompaniment": accs}, name=LATENTS_FILE)
    return vocals, accs
