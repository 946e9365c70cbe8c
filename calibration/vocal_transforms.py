"""Signal transforms that make a new vocal example aimed at an uncovered bin (the role GPT plays in
PTQ4ADM's Algorithm 1 for captions): phase-vocoder time stretch, pitch shift by resampling,
vibrato by a modulated delay, filtering, gating, and re-synthesis from a score."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
from scipy.signal import butter, resample_poly, sosfilt

from calibration.vocal_features import frames
from toolkit.data import synth

# --- transforms ---------------------------------------------------------------------------------


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """Crop, or loop, ``y`` to ``n`` samples."""
    if y.size >= n:
        return y[:n]
    return np.tile(y, -(-n // max(y.size, 1)))[:n]


def time_stretch(x: np.ndarray, rate: float, *, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """Phase-vocoder time stretch: ``rate`` > 1 is faster (shorter), pitch unchanged."""
    win = np.hanning(n_fft + 1)[:-1]
    pad = np.pad(x, (n_fft // 2, n_fft // 2))
    fr = frames(pad, n_fft, hop) * win
    spec = np.fft.rfft(fr, axis=1)
    steps = np.arange(0, spec.shape[0] - 1, rate)
    omega = 2 * np.pi * hop * np.arange(spec.shape[1]) / n_fft
    phase = np.angle(spec[0])
    out = np.zeros(len(steps) * hop + n_fft)
    norm = np.zeros_like(out)
    for k, s in enumerate(steps):
        i = int(s)
        frac = s - i
        mag = (1 - frac) * np.abs(spec[i]) + frac * np.abs(spec[i + 1])
        frame = np.fft.irfft(mag * np.exp(1j * phase), n=n_fft) * win
        out[k * hop:k * hop + n_fft] += frame
        norm[k * hop:k * hop + n_fft] += win**2
        dphi = np.angle(spec[i + 1]) - np.angle(spec[i]) - omega
        dphi -= 2 * np.pi * np.round(dphi / (2 * np.pi))
        phase = phase + omega + dphi
    out = out / np.maximum(norm, 1e-8)
    return out[n_fft // 2: n_fft // 2 + int(round(x.size / rate))]


def _resample_by(x: np.ndarray, factor: float) -> np.ndarray:
    """Read ``x`` ``factor`` times faster (length / factor)."""
    ratio = Fraction(factor).limit_denominator(64)
    return resample_poly(x, ratio.denominator, ratio.numerator)


def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
    """Pitch shift by resampling, with a phase-vocoder stretch first so the duration is kept."""
    factor = 2.0 ** (semitones / 12.0)
    return _fit_length(_resample_by(time_stretch(x, 1.0 / factor), factor), x.size)


def add_vibrato(x: np.ndarray, sample_rate: int, *, cents: float, rate_hz: float = 5.5) -> np.ndarray:
    """Frequency modulation by a sinusoidally modulated delay: peak deviation ``cents``."""
    dev = 2.0 ** (cents / 1200.0) - 1.0
    depth_s = dev / (2 * np.pi * rate_hz)
    t = np.arange(x.size) / sample_rate
    src = (t - depth_s * (1 + np.sin(2 * np.pi * rate_hz * t))) * sample_rate
    return np.interp(src, np.arange(x.size), x)


def lowpass(x: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    return sosfilt(butter(4, min(cutoff_hz, 0.45 * sample_rate), btype="low", fs=sample_rate, output="sos"), x)


def brighten(x: np.ndarray, sample_rate: int, cutoff_hz: float, *, gain: float = 2.0) -> np.ndarray:
    """Add a high-passed copy: more energy above ``cutoff_hz`` raises the centroid."""
    hp = sosfilt(butter(2, min(cutoff_hz, 0.45 * sample_rate), btype="high", fs=sample_rate, output="sos"), x)
    return x + gain * hp


def gate(x: np.ndarray, sample_rate: int, *, keep_fraction: float, period_s: float = 0.25) -> np.ndarray:
    """Silence the end of every ``period_s`` window, keeping ``keep_fraction`` of it (lowers voicing)."""
    t = (np.arange(x.size) / sample_rate) % period_s
    ramp = np.clip((keep_fraction * period_s - t) / 0.005, 0.0, 1.0)
    return x * ramp


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def _match_rms(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    r = _rms(y)
    return y * (_rms(ref) / r) if r > 0 else y


def _peak_safe(y: np.ndarray) -> np.ndarray:
    p = float(np.abs(y).max()) if y.size else 0.0
    return y * (0.99 / p) if p > 0.99 else y


def resynthesize(rng: np.random.Generator, *, seconds: float, sample_rate: int,
                 mode: str | None = None, transpose: int = 0, range_scale: float = 1.0,
                 tempo_bpm: float | None = None, legato: bool = False, sparse: bool = False) -> np.ndarray:
    """A new vocal from a ``toolkit.data.synth`` score with chosen parameters (mono float64)."""
    labels = synth.sample_score(rng, seconds=max(seconds, synth.MIN_SECONDS))
    for _ in range(32):
        if mode is None or labels["key"]["mode"] == mode:
            break
        labels = synth.sample_score(rng, seconds=max(seconds, synth.MIN_SECONDS))
    labels = copy.deepcopy(labels)
    notes = labels["melody"]
    if tempo_bpm is not None:
        scale = labels["tempo_bpm"] / tempo_bpm
        for n in notes:
            n["start_s"] *= scale
            n["end_s"] *= scale
        notes = [n for n in notes if n["start_s"] < labels["seconds"]]
        for n in notes:
            n["end_s"] = min(n["end_s"], labels["seconds"])
        labels["tempo_bpm"] = float(tempo_bpm)
    if notes:
        centre = float(np.median([n["midi"] for n in notes]))
        for n in notes:
            n["midi"] = int(round(centre + range_scale * (n["midi"] - centre))) + int(transpose)
    if sparse:
        notes = notes[::2]
    if legato and notes:
        for a, b in zip(notes, notes[1:]):
            a["end_s"] = b["start_s"]
        notes[-1]["end_s"] = labels["seconds"]
    labels["melody"] = notes
    # The synthesizer renders at >= 8 kHz; lower model rates (the 2 kHz demo) are resampled to.
    render_rate = max(sample_rate, synth.MIN_SAMPLE_RATE)
    y = synth.render_vocals(labels, rng, sample_rate=render_rate)
    if render_rate == sample_rate:
        return y
    from toolkit.data.stems import resample

    return resample(np.asarray(y, np.float32)[None], render_rate, sample_rate)[0].astype(np.asarray(y).dtype)
