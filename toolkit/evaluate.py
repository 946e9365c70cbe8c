"""Musical agreement of generated accompaniment with the true labels of held-out synthetic pairs.

For each held-out track the model hears only the vocal; its accompaniment is scored against the
track's known chords (chroma vs the 24 major/minor triad templates), tempo and beats. A model with
the same architecture and random weights gives the "no learning" figure in the same run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from toolkit.checkpoint import Pipeline
from toolkit.data.music import AGREEMENT_FIELDS, agreement
from toolkit.data.stems import Track, list_tracks, load_track
from toolkit.generate import generate_accompaniment
from toolkit.models.oobleck import OobleckVAE

__all__ = ["AGREEMENT_FIELDS", "musical_agreement", "reconstruct", "score_tracks"]


@torch.no_grad()
def reconstruct(vae: OobleckVAE, audio: np.ndarray, segment: int) -> np.ndarray:
    """Encode (posterior mean) and decode ``audio`` (C, N) segment by segment, the last one
    zero-padded, as generation does; (C, N) back. What the VAE lets through to the denoiser."""
    x = torch.as_tensor(audio, dtype=torch.float32).reshape(1, audio.shape[0], -1)
    n = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, (-n) % segment))
    out = [vae.decode(vae.encode_latent(x[..., s:s + segment])) for s in range(0, x.shape[-1], segment)]
    return torch.cat(out, -1)[0, :, :n].numpy()


def score_tracks(pipeline: Pipeline, data_dir: Path, render: Callable[[Track], np.ndarray], *,
                 max_tracks: int | None = None, show_progress: bool = True) -> dict:
    """Chord accuracy / cosine, key, tempo and beat agreement of ``render(track)`` with each labelled
    track of ``data_dir`` (loaded at the pipeline's rate): the means, and ``per_track`` rows."""
    from tqdm import tqdm

    rows = []
    for path in tqdm(list_tracks(data_dir)[:max_tracks], desc="evaluate", disable=not show_progress,
                     file=sys.stderr):
        track = load_track(path, sample_rate=pipeline.sample_rate, channels=pipeline.audio_channels)
        if track.labels is None or "chords" not in track.labels:
            raise ValueError(f"{path}: no labels.json with chords; evaluate needs labelled "
                             "synthetic pairs (toolkit data synth)")
        rows.append({"track": track.name,
                     **agreement(render(track), pipeline.sample_rate, track.labels)})

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"tracks": len(rows), **{k: mean(k) for k in AGREEMENT_FIELDS}, "per_track": rows}


def musical_agreement(
    pipeline: Pipeline,
    data_dir: Path,
    *,
    steps: int,
    guidance: float,
    seed: int = 0,
    max_tracks: int | None = None,
    show_progress: bool = True,
    mode: str = "segments",
) -> dict:
    """Mean chord accuracy / cosine, key, tempo and beat agreement of the accompaniment generated from
    each labelled track's vocal in ``data_dir``. ``mode``: how a track longer than the training
    length is generated (``toolkit.generate.GENERATION_MODES``); ``segments`` keeps the figures
    published before one-pass generation existed comparable."""
    result = score_tracks(
        pipeline, data_dir,
        lambda track: generate_accompaniment(pipeline, track.vocals, steps=steps, guidance=guidance, seed=seed,
                                             mode=mode),
        max_tracks=max_tracks, show_progress=show_progress)
    return {"tracks": result["tracks"], "steps": steps, "guidance": guidance, "seed": seed, "mode": mode,
            **{k: result[k] for k in AGREEMENT_FIELDS}, "chance_chord_accuracy": 1 / 24,
            "per_track": result["per_track"]}
