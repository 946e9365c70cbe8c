"""Musical agreement of generated accompaniment with the true labels of held-out synthetic pairs.

For each held-out track the model hears only the vocal; its accompaniment is scored against the
track's known chords (chroma vs the 24 major/minor triad templates) and tempo. A model with the
same architecture and random weights gives the "no learning" figure in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from toolkit.checkpoint import Pipeline
from toolkit.data.music import chord_agreement, tempo_agreement
from toolkit.data.stems import list_tracks, load_track
from toolkit.generate import generate_accompaniment


def musical_agreement(
    pipeline: Pipeline,
    data_dir: Path,
    *,
    steps: int,
    guidance: float,
    seed: int = 0,
    max_tracks: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Mean chord accuracy / cosine, key and tempo agreement over labelled tracks of ``data_dir``."""
    from tqdm import tqdm

    tracks = list_tracks(data_dir)[:max_tracks]
    rows = []
    for path in tqdm(tracks, desc="evaluate", disable=not show_progress, file=sys.stderr):
        track = load_track(path, sample_rate=pipeline.sample_rate, channels=pipeline.audio_channels)
        if track.labels is None or "chords" not in track.labels:
            raise ValueError(f"{path}: no labels.json with chords; evaluate needs labelled "
                             "synthetic pairs (toolkit data synth)")
        acc = generate_accompaniment(pipeline, track.vocals, steps=steps, guidance=guidance, seed=seed)
        chords = chord_agreement(acc, pipeline.sample_rate, track.labels)
        tempo = tempo_agreement(acc, pipeline.sample_rate, track.labels)
        rows.append({"track": track.name, "chord_accuracy": chords["chord_accuracy"],
                     "chord_cosine": chords["chord_cosine"],
                     "key_correct_or_relative": chords["key_correct_or_relative"],
                     "tempo_match": tempo["tempo_match"]})

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "tracks": len(rows), "steps": steps, "guidance": guidance, "seed": seed,
        "chord_accuracy": mean("chord_accuracy"), "chord_cosine": mean("chord_cosine"),
        "key_correct_or_relative": mean("key_correct_or_relative"),
        "tempo_match": mean("tempo_match"), "chance_chord_accuracy": 1 / 24,
        "per_track": rows,
    }
