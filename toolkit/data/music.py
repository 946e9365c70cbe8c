"""Musical agreement of audio with the known labels of a synthetic pair (numpy only).

- :func:`chroma`: STFT power folded into 12 pitch classes (log-frequency mapping of 55-2000 Hz).
- :func:`chord_agreement`: per labelled chord segment, the mean chroma is matched against the 24
  major/minor triad templates. ``chord_accuracy`` is the fraction of segments whose best template
  is the true chord; chance level is about 1/24 (~0.042). Diminished chords have no template among
  the 24, so they are EXCLUDED from ``chord_accuracy`` (counted in ``n_dim_excluded``); they are
  included in ``chord_cosine``, which uses each true chord's own triad template (dim included).
  A key estimate (Krumhansl-Kessler profiles) is reported as well.
- :func:`tempo_agreement`: tempo from the autocorrelation of an onset-strength envelope (spectral
  flux), judged right when within ``TEMPO_TOLERANCE`` of the true tempo, its double or its half.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
CHROMA_FMIN_HZ = 55.0
CHROMA_FMAX_HZ = 2000.0
CHROMA_MAX_BIN_HZ = 2.7  # STFT bin spacing for chroma: ~1/4 semitone at 55 Hz -> 0.37-0.5 s windows
CHORD_CHANCE_ACCURACY = 1.0 / 24.0
TEMPO_TOLERANCE = 0.04  # relative
ONSET_HOP_S = 0.01
ONSET_WINDOW_S = 0.046
BEAT_WINDOW_S = 0.03  # beat_alignment: onset frames within this of a labelled beat count as "on"
TEMPO_PRIOR_BPM = 120.0  # centre of a log-normal prior (one octave wide) on the beat period
_FRAME_CHUNK = 256  # STFT frames processed at a time, bounds memory on long audio

_TRIADS = {"maj": (0, 4, 7), "min": (0, 3, 7), "dim": (0, 3, 6)}
# Krumhansl-Kessler key profiles (C major / C minor).
_KEY_PROFILES = {
    "major": np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88]),
    "minor": np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17]),
}


def triad_template(root_pc: int, quality: str) -> np.ndarray:
    """Unit-norm 12-vector with ones on the triad's pitch classes."""
    template = np.zeros(12)
    template[[(root_pc + i) % 12 for i in _TRIADS[quality]]] = 1.0
    return template / np.linalg.norm(template)


# The 24 major/minor triad templates: index r is root r major, 12 + r is root r minor.
TEMPLATES = np.stack([triad_template(r, "maj") for r in range(12)] + [triad_template(r, "min") for r in range(12)])
TEMPLATE_NAMES = tuple(NOTE_NAMES[r] for r in range(12)) + tuple(NOTE_NAMES[r] + "m" for r in range(12))


def template_index(root_pc: int, quality: str) -> int:
    if quality not in ("maj", "min"):
        raise ValueError(f"only maj/min chords have one of the 24 templates, got {quality!r}")
    return root_pc % 12 + (12 if quality == "min" else 0)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(N,) or (channels, N) audio as a float64 (N,) channel mean."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 2:
        audio = audio.mean(axis=0)
    if audio.ndim != 1:
        raise ValueError(f"audio must be (N,) or (channels, N), got shape {audio.shape}")
    return audio


def _to_mono(audio: np.ndarray) -> np.ndarray:
    audio = to_mono(audio)
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or Inf samples")
    return audio


def _stft_power_frames(x: np.ndarray, n_fft: int, hop: int):
    """Yield (first_frame_index, power (frames, n_fft//2+1)) chunks of a centred Hann STFT."""
    padded = np.pad(x, (n_fft // 2, n_fft // 2))
    n_frames = 1 + x.size // hop
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]
    hann = np.hanning(n_fft + 1)[:-1]
    for start in range(0, n_frames, _FRAME_CHUNK):
        spectrum = np.fft.rfft(windows[start:start + _FRAME_CHUNK] * hann, axis=-1)
        yield start, spectrum.real**2 + spectrum.imag**2


def chroma_n_fft(sample_rate: int) -> int:
    return 2 ** int(math.ceil(math.log2(sample_rate / CHROMA_MAX_BIN_HZ)))


def chroma(
    audio_mono: np.ndarray,
    sample_rate: int,
    *,
    hop_s: float = 0.05,
    fmin_hz: float = CHROMA_FMIN_HZ,
    fmax_hz: float = CHROMA_FMAX_HZ,
) -> np.ndarray:
    """Chromagram ``(12, T)``: STFT power of ``fmin_hz..fmax_hz`` summed per nearest pitch class.

    Frame ``t`` is centred at ``t * hop_samples / sample_rate`` s (``hop_samples = round(hop_s *
    sample_rate)``); see :func:`chroma_frame_times`. Values are raw power sums (not normalised).
    The window is long (``chroma_n_fft``) so that bins are ~2.7 Hz apart, a quarter of a semitone
    at 55 Hz, which bass notes need.
    """
    x = _to_mono(audio_mono)
    hop = max(1, int(round(hop_s * sample_rate)))
    n_fft = chroma_n_fft(sample_rate)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    selected = np.flatnonzero((freqs >= fmin_hz) & (freqs <= min(fmax_hz, sample_rate / 2)))
    pitch_class = np.rint(69.0 + 12.0 * np.log2(freqs[selected] / 440.0)).astype(int) % 12
    fold = np.zeros((selected.size, 12))
    fold[np.arange(selected.size), pitch_class] = 1.0
    out = np.zeros((12, 1 + x.size // hop))
    for start, power in _stft_power_frames(x, n_fft, hop):
        out[:, start:start + power.shape[0]] = (power[:, selected] @ fold).T
    return out


def chroma_frame_times(n_frames: int, sample_rate: int, *, hop_s: float = 0.05) -> np.ndarray:
    hop = max(1, int(round(hop_s * sample_rate)))
    return np.arange(n_frames) * hop / sample_rate


def estimate_key(chroma_vector: np.ndarray) -> tuple[int, str]:
    """(tonic_pc, mode) whose rotated Krumhansl-Kessler profile correlates best with the chroma."""
    best, best_r = (0, "major"), -np.inf
    for mode, profile in _KEY_PROFILES.items():
        for tonic in range(12):
            r = np.corrcoef(chroma_vector, np.roll(profile, tonic))[0, 1]
            if r > best_r:
                best, best_r = (tonic, mode), r
    return best


def chord_agreement(
    audio: np.ndarray, sample_rate: int, labels: dict[str, Any], *, hop_s: float = 0.05
) -> dict[str, Any]:
    """How well the audio's harmony matches ``labels["chords"]`` (and key).

    Per chord segment, frames whose centres lie in the segment's inner part (a guard of a quarter
    window, at most a quarter of the segment, at each end) are L2-normalised and averaged. Returns
    ``chord_accuracy`` (maj/min segments whose best of the 24 templates is the true chord; dim
    chords excluded; chance ~ 1/24; None when no segment could be scored), ``chord_cosine`` (mean
    cosine with the true chord's template, dim included), counts, the predicted chord names, and
    ``key_estimate`` / ``key_correct`` (tonic and mode) / ``key_correct_or_relative``.
    """
    x = _to_mono(audio)
    seconds = float(labels["seconds"])
    if x.size / sample_rate < seconds - 0.1:
        raise ValueError(
            f"audio lasts {x.size / sample_rate:.2f} s but the labels describe {seconds:.2f} s; "
            "score audio rendered for these labels (same duration)"
        )
    c = chroma(x, sample_rate, hop_s=hop_s)
    times = chroma_frame_times(c.shape[1], sample_rate, hop_s=hop_s)
    energy = c.sum(axis=0)
    active = energy > 1e-6 * max(float(energy.max()), 1e-30)  # skip frames 60 dB below the loudest
    normalised = c / np.maximum(np.linalg.norm(c, axis=0, keepdims=True), 1e-30)
    guard_s = chroma_n_fft(sample_rate) / sample_rate / 4

    hits, cosines, predicted = [], [], []
    n_dim_excluded = n_unscored = 0
    for chord in labels["chords"]:
        start, end = chord["start_s"], chord["end_s"]
        guard = min(guard_s, (end - start) / 4)
        frames = active & (times >= start + guard) & (times < end - guard)
        if not frames.any():
            n_unscored += 1
            predicted.append(None)
            continue
        mean = normalised[:, frames].mean(axis=1)
        mean /= max(float(np.linalg.norm(mean)), 1e-30)
        best = int(np.argmax(TEMPLATES @ mean))
        predicted.append(TEMPLATE_NAMES[best])
        cosines.append(float(triad_template(chord["root_pc"], chord["quality"]) @ mean))
        if chord["quality"] == "dim":
            n_dim_excluded += 1
        else:
            hits.append(best == template_index(chord["root_pc"], chord["quality"]))

    overall = normalised[:, active].mean(axis=1) if active.any() else np.zeros(12)
    key_tonic, key_mode = estimate_key(overall)
    true_tonic, true_mode = labels["key"]["tonic_pc"], labels["key"]["mode"]
    relative_tonic = (true_tonic + (9 if true_mode == "major" else 3)) % 12
    relative_mode = "minor" if true_mode == "major" else "major"
    key_correct = (key_tonic, key_mode) == (true_tonic, true_mode)
    return {
        "chord_accuracy": float(np.mean(hits)) if hits else None,
        "chord_cosine": float(np.mean(cosines)) if cosines else None,
        "chance_accuracy": CHORD_CHANCE_ACCURACY,
        "n_chords": len(labels["chords"]),
        "n_scored": len(hits),
        "n_dim_excluded": n_dim_excluded,
        "n_unscored": n_unscored,
        "predicted_chords": predicted,
        "key_estimate": f"{NOTE_NAMES[key_tonic]} {key_mode}",
        "key_correct": bool(key_correct),
        "key_correct_or_relative": bool(key_correct or (key_tonic, key_mode) == (relative_tonic, relative_mode)),
    }


def onset_strength(audio_mono: np.ndarray, sample_rate: int, *, hop_s: float = ONSET_HOP_S) -> tuple[np.ndarray, float]:
    """Spectral flux of log-compressed STFT magnitude; returns (envelope, frames per second)."""
    x = _to_mono(audio_mono)
    hop = max(1, int(round(hop_s * sample_rate)))
    n_fft = 2 ** int(round(math.log2(ONSET_WINDOW_S * sample_rate)))
    frames = []
    for _, power in _stft_power_frames(x, n_fft, hop):
        frames.append(np.sqrt(power))
    magnitude = np.concatenate(frames, axis=0)
    log_mag = np.log1p(100.0 * magnitude / max(float(magnitude.max()), 1e-30))
    flux = np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=1)
    flux = np.concatenate([[0.0], flux])
    # Remove the slowly varying part so the autocorrelation sees onsets, not loudness.
    width = max(1, int(round(1.0 / (hop / sample_rate))))
    local_mean = np.convolve(flux, np.ones(width) / width, mode="same")
    return np.maximum(flux - local_mean, 0.0), sample_rate / hop


def _parabolic_peak(values: np.ndarray, i: int) -> float:
    if 0 < i < values.size - 1:
        a, b, c = values[i - 1], values[i], values[i + 1]
        denominator = a - 2 * b + c
        if denominator < 0:
            return i + 0.5 * (a - c) / denominator
    return float(i)


def estimate_tempo(
    audio_mono: np.ndarray, sample_rate: int, *, min_bpm: float = 40.0, max_bpm: float = 240.0
) -> float:
    """Tempo in BPM from the autocorrelation of the onset envelope (weighted by a prior on 120 BPM).

    The beat lag is refined by parabolic interpolation at the largest multiple (up to 4 beats)
    that still fits in half the clip, which makes it precise to a fraction of a hop.
    """
    env, frame_rate = onset_strength(audio_mono, sample_rate)
    env = env - env.mean()
    n = env.size
    spectrum = np.fft.rfft(env, n=2 * n)
    ac = np.fft.irfft(spectrum.real**2 + spectrum.imag**2)[:n]
    ac /= max(ac[0], 1e-30)
    lo = max(1, int(math.floor(60.0 / max_bpm * frame_rate)))
    hi = min(n - 2, int(math.ceil(60.0 / min_bpm * frame_rate)))
    if hi <= lo:
        raise ValueError(f"audio too short to estimate a tempo between {min_bpm} and {max_bpm} BPM")
    lags = np.arange(lo, hi + 1)
    bpm = 60.0 * frame_rate / lags
    prior = np.exp(-0.5 * np.log2(bpm / TEMPO_PRIOR_BPM) ** 2)
    i = lo + int(np.argmax(ac[lo:hi + 1] * prior))
    lag = _parabolic_peak(ac, i)
    for multiple in (4, 3, 2):
        centre = int(round(multiple * lag))
        if centre + 3 >= n // 2:
            continue
        window = ac[centre - 2:centre + 3]
        j = centre - 2 + int(np.argmax(window))
        lag = _parabolic_peak(ac, j) / multiple
        break
    return 60.0 * frame_rate / lag


def tempo_agreement(
    audio: np.ndarray, sample_rate: int, labels: dict[str, Any], *, tolerance: float = TEMPO_TOLERANCE
) -> dict[str, Any]:
    """Estimated tempo vs ``labels["tempo_bpm"]``; a match within ``tolerance`` of x1, x2 or x0.5."""
    estimate = estimate_tempo(audio, sample_rate)
    true_bpm = float(labels["tempo_bpm"])
    errors = {factor: abs(estimate / (true_bpm * factor) - 1.0) for factor in (1.0, 2.0, 0.5)}
    factor = min(errors, key=errors.get)
    return {
        "tempo_bpm_estimate": float(estimate),
        "tempo_bpm_true": true_bpm,
        "octave_factor": factor,
        "relative_error": float(errors[factor]),
        "tolerance": tolerance,
        "tempo_match": bool(errors[factor] <= tolerance),
        "tempo_match_exact_octave": bool(errors[1.0] <= tolerance),
    }


def beat_alignment(audio: np.ndarray, sample_rate: int, labels: dict[str, Any], *,
                   window_s: float = BEAT_WINDOW_S) -> float:
    """Mean onset strength within ``window_s`` of the labelled beats over the mean elsewhere.

    1 means onsets bear no relation to the beat; the synthetic accompaniment (a drum hit and a bass
    note on every beat) scores far above it. Unlike the tempo match it also needs the right phase:
    onsets at the right tempo but between the beats score below 1.
    """
    env, frame_rate = onset_strength(audio, sample_rate)
    on = np.zeros(env.size, dtype=bool)
    reach = int(round(window_s * frame_rate))
    for beat_s in labels["beat_times_s"]:
        i = int(round(beat_s * frame_rate))
        on[max(0, i - reach):min(env.size, i + reach + 1)] = True
    if on.all() or not on.any():
        raise ValueError("beat_alignment needs frames both near and away from the labelled beats")
    return float(env[on].mean() / max(float(env[~on].mean()), 1e-12))


AGREEMENT_FIELDS = ("chord_accuracy", "chord_cosine", "key_correct_or_relative", "tempo_match",
                    "beat_alignment")


def agreement(audio: np.ndarray, sample_rate: int, labels: dict[str, Any]) -> dict[str, Any]:
    """The :data:`AGREEMENT_FIELDS` of ``audio`` against a synthetic track's ``labels``."""
    chords = chord_agreement(audio, sample_rate, labels)
    return {"chord_accuracy": chords["chord_accuracy"], "chord_cosine": chords["chord_cosine"],
            "key_correct_or_relative": chords["key_correct_or_relative"],
            "tempo_match": tempo_agreement(audio, sample_rate, labels)["tempo_match"],
            "beat_alignment": beat_alignment(audio, sample_rate, labels)}
