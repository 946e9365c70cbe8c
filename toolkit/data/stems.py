"""Load (vocals, accompaniment) pairs from a stems folder.

Two layouts are read, one track per sub-directory of the root:

- ``<root>/<track>/vocals.wav`` + ``accompaniment.wav`` (what :mod:`toolkit.data.synth` writes;
  a ``labels.json`` beside them is loaded too);
- MUSDB-style ``<root>/<track>/vocals.wav`` + ``drums.wav`` + ``bass.wav`` + ``other.wav``, the
  last three summed into the accompaniment (each resampled first).

When ``accompaniment.wav`` is present it is used and any MUSDB stems beside it are ignored
(``Track.layout`` records which layout was read). Audio is returned as float32 ``(C, N)`` at the
requested sample rate (``scipy.signal.resample_poly`` with the exact rational factor) and channel
count (mono -> stereo duplicates, stereo -> mono averages; other counts are refused), both stems
trimmed to their common length. Anything else wrong raises :class:`StemsError` whose message names
the file, the problem and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

VOCALS = "vocals.wav"
ACCOMPANIMENT = "accompaniment.wav"
MUSDB_ACCOMPANIMENT = ("drums.wav", "bass.wav", "other.wav")
LABELS = "labels.json"
STEM_FILES = (VOCALS, ACCOMPANIMENT, *MUSDB_ACCOMPANIMENT)
SUPPORTED_CHANNELS = (1, 2)


class StemsError(ValueError):
    """A stems folder or file cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Track:
    name: str
    vocals: np.ndarray  # float32 (C, N)
    accompaniment: np.ndarray  # float32 (C, N), same shape as vocals
    sample_rate: int
    labels: dict[str, Any] | None
    layout: str  # "accompaniment" or "musdb"

    @property
    def num_samples(self) -> int:
        return int(self.vocals.shape[1])


def _expected_layouts(track_dir: Path) -> str:
    return (
        f"expected '{track_dir / VOCALS}' with either '{ACCOMPANIMENT}' or MUSDB-style "
        f"{', '.join(repr(n) for n in MUSDB_ACCOMPANIMENT)} beside it"
    )


def list_tracks(root: str | os.PathLike) -> list[Path]:
    """Sorted track directories under ``root``: sub-directories holding any known stem file.

    Hidden directories (names starting with '.', e.g. a dataset still being written) are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise StemsError(f"{root}: not a directory; pass the folder that holds one sub-folder per track")
    tracks = [
        d for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and any((d / f).is_file() for f in STEM_FILES)
    ]
    if not tracks:
        raise StemsError(
            f"{root}: no track folders found; each track needs its own sub-folder, "
            f"{_expected_layouts(root / '<track>')}"
        )
    return tracks


def read_audio(path: Path, *, sample_rate: int, channels: int) -> np.ndarray:
    """Read one file as float32 (channels, N) at ``sample_rate``; checks everything but silence."""
    import soundfile

    if not path.is_file():
        raise StemsError(f"{path}: file is missing; {_expected_layouts(path.parent)}")
    if path.stat().st_size == 0:
        raise StemsError(f"{path}: file is empty (0 bytes); re-export or re-copy this stem")
    try:
        data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, soundfile.SoundFileError, RuntimeError, OSError) as error:
        raise StemsError(
            f"{path}: unreadable or corrupt audio file ({error}); re-export it as WAV (PCM or float)"
        ) from None
    if data.shape[0] == 0:
        raise StemsError(f"{path}: empty file (0 samples); re-export this stem with its audio")
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise StemsError(
            f"{path}: contains {bad} NaN/Inf samples; re-export it (a float WAV written from a "
            "broken render) or replace it"
        )
    n_channels = data.shape[1]
    audio = data.T  # (C, N)
    if n_channels != channels:
        if n_channels == 1 and channels == 2:
            audio = np.repeat(audio, 2, axis=0)
        elif n_channels == 2 and channels == 1:
            audio = audio.mean(axis=0, keepdims=True)
        else:
            raise StemsError(
                f"{path}: has {n_channels} channels; only mono and stereo files are supported, "
                "downmix it to stereo or mono first"
            )
    return resample(audio, int(file_rate), sample_rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling of (C, N) float audio along the last axis (float32 out)."""
    if from_rate != to_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(to_rate, from_rate)
        audio = resample_poly(audio, ratio.numerator, ratio.denominator, axis=-1)
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_track(track_dir: str | os.PathLike, *, sample_rate: int, channels: int) -> Track:
    """Load one track folder (either layout) as float32 ``(channels, N)`` stems at ``sample_rate``."""
    track_dir = Path(track_dir)
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {channels!r}")
    if not track_dir.is_dir():
        raise StemsError(f"{track_dir}: not a directory; {_expected_layouts(track_dir)}")

    present = {name for name in STEM_FILES if (track_dir / name).exists()}
    if not present:
        raise StemsError(
            f"{track_dir}: neither layout present (no {', '.join(STEM_FILES)}); {_expected_layouts(track_dir)}"
        )
    if VOCALS not in present:
        raise StemsError(f"{track_dir / VOCALS}: file is missing; {_expected_layouts(track_dir)}")
    if ACCOMPANIMENT in present:
        layout, accompaniment_files = "accompaniment", (ACCOMPANIMENT,)
    elif any(name in present for name in MUSDB_ACCOMPANIMENT):
        missing = [name for name in MUSDB_ACCOMPANIMENT if name not in present]
        if missing:
            raise StemsError(
                f"{track_dir / missing[0]}: file is missing (MUSDB-style track needs "
                f"{', '.join(MUSDB_ACCOMPANIMENT)}; missing {', '.join(missing)}); add the missing "
                f"stems or provide a single '{ACCOMPANIMENT}'"
            )
        layout, accompaniment_files = "musdb", MUSDB_ACCOMPANIMENT
    else:
        raise StemsError(
            f"{track_dir}: neither layout present (only {VOCALS}); add '{ACCOMPANIMENT}' or MUSDB-style "
            f"{', '.join(MUSDB_ACCOMPANIMENT)}"
        )

    vocals = read_audio(track_dir / VOCALS, sample_rate=sample_rate, channels=channels)
    parts = [read_audio(track_dir / name, sample_rate=sample_rate, channels=channels) for name in accompaniment_files]
    length = min(vocals.shape[1], *(p.shape[1] for p in parts))
    accompaniment = np.zeros((channels, length), dtype=np.float32)
    for part in parts:
        accompaniment += part[:, :length]
    vocals = np.ascontiguousarray(vocals[:, :length])

    accompaniment_desc = (
        f"'{track_dir / ACCOMPANIMENT}'" if layout == "accompaniment"
        else f"the accompaniment (sum of {', '.join(str(track_dir / n) for n in MUSDB_ACCOMPANIMENT)})"
    )
    vocals_silent, accompaniment_silent = not vocals.any(), not accompaniment.any()
    if vocals_silent and accompaniment_silent:
        raise StemsError(
            f"{track_dir}: both '{track_dir / VOCALS}' and {accompaniment_desc} are silent (all zeros); "
            "the track has no audio, remove it from the folder or re-export its stems"
        )
    if vocals_silent:
        raise StemsError(
            f"{track_dir / VOCALS}: stem is silent (all zeros); a pair needs vocals, "
            "remove this track or re-export its vocals"
        )
    if accompaniment_silent:
        raise StemsError(
            f"{accompaniment_desc}: stem is silent (all zeros); a pair needs an accompaniment, "
            "remove this track or re-export its accompaniment"
        )

    labels = None
    labels_path = track_dir / LABELS
    if labels_path.is_file():
        try:
            labels = json.loads(labels_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StemsError(f"{labels_path}: not valid JSON ({error}); fix or delete it") from None
    return Track(name=track_dir.name, vocals=vocals, accompaniment=accompaniment,
                 sample_rate=sample_rate, labels=labels, layout=layout)


def segment_starts(num_samples: int, *, segment_samples: int, hop_samples: int | None = None) -> list[int]:
    """Starts of the complete segments of ``segment_samples`` every ``hop_samples`` (default: no overlap)."""
    if segment_samples <= 0:
        raise ValueError(f"segment_samples must be positive, got {segment_samples}")
    hop = segment_samples if hop_samples is None else hop_samples
    if hop <= 0:
        raise ValueError(f"hop_samples must be positive, got {hop_samples}")
    return list(range(0, num_samples - segment_samples + 1, hop))


def segments(
    track: Track, *, segment_samples: int, hop_samples: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligned (vocals, accompaniment) views of shape ``(C, segment_samples)``; a tail shorter
    than a segment is dropped (a track shorter than one segment gives an empty list)."""
    return [
        (track.vocals[:, s:s + segment_samples], track.accompaniment[:, s:s + segment_samples])
        for s in segment_starts(track.num_samples, segment_samples=segment_samples, hop_samples=hop_samples)
    ]


def crop(track: Track, *, segment_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One aligned random crop ``(C, segment_samples)`` of vocals and accompaniment (views)."""
    if segment_samples <= 0:
        raise ValueError(f"segment_samples must be positive, got {segment_samples}")
    if track.num_samples < segment_samples:
        raise ValueError(
            f"track {track.name!r} has {track.num_samples} samples, fewer than segment_samples="
            f"{segment_samples}; use a shorter segment or drop this track"
        )
    start = int(rng.integers(0, track.num_samples - segment_samples + 1))
    return track.vocals[:, start:start + segment_samples], track.accompaniment[:, start:start + segment_samples]
