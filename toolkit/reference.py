"""A bundle's full-precision reference: synthetic vocals, initial noises, and PyTorch's outputs for them.

A device judges its own outputs against these (paired distances, and the reference's own
seed-to-seed spread), so every example is generated with two seeds. A bundle exported for
``frames`` latent frames has references that long; with LiteFocus they are sampled with the
compensation indices a device draws (``toolkit.generate.sample_latent`` draws call k with
``call=k`` and the config's seed, as ``runtime_py.compensation`` does).
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.checkpoint import Pipeline
from toolkit.data.synth import synth_pair_at_rate
from toolkit.generate import decode_latent, encode_audio, sample_latent
from toolkit.models.litefocus import LiteFocusConfig

REFERENCE_SEEDS = (0, 1)
REFERENCE_EXAMPLES = 2
REFERENCE_DATA_SEED = 20_000  # synthetic pair seed of example 0


def reference_track(pipeline: Pipeline, i: int, *, samples: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reference example ``i``: (vocals, true accompaniment) of one segment (or ``samples``), and the labels."""
    n = pipeline.segment_samples if samples is None else samples
    # The synthesizer writes at least a second (one melody note); longer than asked is cropped.
    seconds = max(1.0, n / pipeline.sample_rate)
    vocals, accompaniment, labels = synth_pair_at_rate(REFERENCE_DATA_SEED + i, seconds=seconds,
                                                       sample_rate=pipeline.sample_rate,
                                                       channels=pipeline.audio_channels)
    return vocals[:, :n].astype(np.float32), accompaniment[:, :n].astype(np.float32), labels


def make_reference(pipeline: Pipeline, *, steps: int, guidance: float, examples: int,
                   seeds: tuple[int, ...], frames: int | None = None,
                   litefocus: LiteFocusConfig | None = None) -> tuple[dict, dict]:
    """Full-precision outputs for ``examples`` synthetic vocals × ``seeds`` initial noises, at
    ``frames`` latent frames (default: the training length), LiteFocus attention if given."""
    d, length = pipeline.latent_shape
    frames = length if frames is None else frames
    samples = pipeline.segment_samples // length * frames
    vocals = np.stack([reference_track(pipeline, i, samples=samples)[0]
                       for i in range(examples)]).astype(np.float32)
    noise = np.stack([
        np.stack([torch.randn((d, frames), generator=torch.Generator().manual_seed(
            1000 * i + s)).numpy() for s in seeds]) for i in range(examples)]).astype(np.float32)
    vocal_latent, latents, audio = [], [], []
    with torch.no_grad():
        for i in range(examples):
            cond = encode_audio(pipeline, torch.from_numpy(vocals[i:i + 1]))
            vocal_latent.append(cond[0].numpy())
            lat_i, aud_i = [], []
            for j in range(len(seeds)):
                lat = sample_latent(pipeline, cond, torch.from_numpy(noise[i, j:j + 1]), steps=steps,
                                    guidance=guidance, litefocus=litefocus)
                lat_i.append(lat[0].numpy())
                aud_i.append(decode_latent(pipeline, lat)[0].numpy())
            latents.append(np.stack(lat_i)); audio.append(np.stack(aud_i))
    inputs = {"vocals": vocals, "noise": noise}
    outputs = {"vocal_latent": np.stack(vocal_latent), "latents": np.stack(latents),
               "audio": np.stack(audio)}
    return inputs, outputs
