"""What a vocal's coverage is measured from (numpy): f0 by a YIN-style difference function,
voicing, vibrato depth, onsets, loudness, spectral centroid and key (PTQ4ADM §5.1's aspects, as
``calibration.coverage`` bins them)."""

from __future__ import annotations

import math

import numpy as np

from toolkit.data import music

# --- measured features (numpy) -----------------------------------------------------------------

F0_MIN_HZ, F0_MAX_HZ = 70.0, 1000.0
F0_FRAME_S, F0_HOP_S = 0.025, 0.01
YIN_THRESHOLD = 0.15  # first dip of the normalised difference below this is the period
VOICING_APERIODICITY = 0.35  # frames whose best dip stays above this are unvoiced
SILENCE_DB = -50.0  # frames this far below the clip's loudest frame are unvoiced regardless


def frames(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
    if x.size < frame:
        x = np.pad(x, (0, frame - x.size))
    n = 1 + (x.size - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    return x[idx]


def f0_autocorrelation(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(f0 Hz per 10 ms frame, voiced mask) from the autocorrelation-based difference function of
    YIN (de Cheveigné & Kawahara 2002): d(τ) = Σ (x_j − x_{j+τ})², cumulative-mean normalised; the
    first dip below ``YIN_THRESHOLD`` picks the period (the plain autocorrelation peak makes octave
    errors on voices with strong formants)."""
    x = music.to_mono(audio)
    w = int(round(F0_FRAME_S * sample_rate))
    hop = int(round(F0_HOP_S * sample_rate))
    tau_max = min(w, int(math.ceil(sample_rate / F0_MIN_HZ)))
    tau_min = max(2, int(sample_rate / min(F0_MAX_HZ, sample_rate / 4)))
    fr = frames(x, w + tau_max, hop)
    n_fft = 1 << int(math.ceil(math.log2(2 * (w + tau_max))))
    a = np.fft.rfft(fr[:, :w], n=n_fft, axis=1)
    b = np.fft.rfft(fr, n=n_fft, axis=1)
    cross = np.fft.irfft(np.conj(a) * b, n=n_fft, axis=1)[:, :tau_max + 1]  # r(τ) = Σ_j x_j x_{j+τ}
    sq = np.cumsum(np.pad(fr**2, ((0, 0), (1, 0))), axis=1)
    e0 = sq[:, w][:, None]
    taus = np.arange(tau_max + 1)
    e_tau = sq[:, taus + w] - sq[:, taus]
    d = np.maximum(e0 + e_tau - 2 * cross, 0.0)
    cum = np.cumsum(d[:, 1:], axis=1)
    cmndf = np.ones_like(d)
    cmndf[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-20)
    seg = cmndf[:, tau_min:tau_max]
    below = seg < YIN_THRESHOLD
    first = np.where(below.any(axis=1), np.argmax(below, axis=1), np.argmin(seg, axis=1))
    # Walk down to the bottom of the dip.
    for _ in range(tau_max):
        nxt = np.minimum(first + 1, seg.shape[1] - 1)
        step = seg[np.arange(seg.shape[0]), nxt] < seg[np.arange(seg.shape[0]), first]
        if not step.any():
            break
        first = np.where(step, nxt, first)
    rows = np.arange(seg.shape[0])
    best = seg[rows, first]
    lag = (tau_min + first).astype(np.float64)
    inner = (first > 0) & (first < seg.shape[1] - 1)
    lo_v = seg[rows, np.clip(first - 1, 0, None)]
    hi_v = seg[rows, np.clip(first + 1, None, seg.shape[1] - 1)]
    den = lo_v - 2 * best + hi_v
    ok = inner & (den > 0)
    lag = lag + np.where(ok, 0.5 * (lo_v - hi_v) / np.where(ok, den, 1.0), 0.0)
    rms_db = 10 * np.log10(np.maximum(e0[:, 0] / w, 1e-20))
    voiced = (best < VOICING_APERIODICITY) & (rms_db > rms_db.max() + SILENCE_DB)
    return sample_rate / lag, voiced


def _hz_to_midi(hz: np.ndarray) -> np.ndarray:
    return 69.0 + 12.0 * np.log2(np.maximum(hz, 1e-6) / 440.0)


def vibrato_depth_cents(midi: np.ndarray, voiced: np.ndarray) -> float:
    """Std (cents) of the voiced pitch around its 150 ms running median, inside voiced runs ≥ 150 ms."""
    width = int(round(0.15 / F0_HOP_S))
    residuals = []
    start = None
    for k, v in enumerate(np.append(voiced, False)):
        if v and start is None:
            start = k
        elif not v and start is not None:
            if k - start >= width:
                run = midi[start:k]
                pad = np.pad(run, width // 2, mode="edge")
                med = np.array([np.median(pad[j:j + width]) for j in range(run.size)])
                residuals.append((run - med)[width // 2: run.size - width // 2])
            start = None
    if not residuals:
        return float("nan")
    r = np.concatenate(residuals)
    return float(np.std(100.0 * r)) if r.size else float("nan")


def onset_times(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times (s): peaks of ``music.onset_strength`` above a third of its maximum, ≥ 80 ms apart."""
    env, rate = music.onset_strength(music.to_mono(audio), sample_rate)
    if env.max() <= 0:
        return np.zeros(0)
    thresh = env.max() / 3.0
    gap = max(1, int(round(0.08 * rate)))
    times, last = [], -gap
    for k in range(1, env.size - 1):
        if env[k] >= thresh and env[k] >= env[k - 1] and env[k] >= env[k + 1] and k - last >= gap:
            times.append(k / rate)
            last = k
    return np.asarray(times)


def measure_features(audio: np.ndarray, sample_rate: int) -> dict[str, float]:
    """Every feature the aspects bin; NaN where a feature cannot be measured (e.g. no voiced frame)."""
    x = music.to_mono(audio)
    nan = float("nan")
    hz, voiced = f0_autocorrelation(x, sample_rate)
    midi = _hz_to_midi(hz)
    if voiced.any():
        vm = midi[voiced]
        median_midi = float(np.median(vm))
        range_semitones = float(np.percentile(vm, 95) - np.percentile(vm, 5))
    else:
        median_midi = range_semitones = nan
    seconds = x.size / sample_rate
    try:
        tempo = float(music.estimate_tempo(x, sample_rate))
    except ValueError:
        tempo = nan
    rms = float(np.sqrt(np.mean(x**2))) if x.size else 0.0
    spec = np.abs(np.fft.rfft(frames(x, 1024, 256) * np.hanning(1024), axis=1)) ** 2
    freqs = np.fft.rfftfreq(1024, 1.0 / sample_rate)
    total = spec.sum()
    centroid = float((spec @ freqs).sum() / total) if total > 0 else nan
    chroma = music.chroma(x, sample_rate).sum(axis=1)
    mode_minor = float(music.estimate_key(chroma)[1] == "minor") if chroma.sum() > 0 else nan
    return {
        "median_midi": median_midi,
        "range_semitones": range_semitones,
        "tempo_bpm": tempo,
        "onsets_per_s": float(len(onset_times(x, sample_rate)) / max(seconds, 1e-9)),
        "rms_dbfs": float(20 * np.log10(max(rms, 1e-10))),
        "centroid_hz": centroid,
        "vibrato_cents": vibrato_depth_cents(midi, voiced),
        "voiced_ratio": float(voiced.mean()),
        "mode_minor": mode_minor,
    }
