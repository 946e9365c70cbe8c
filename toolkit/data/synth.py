"""Synthetic vocals / accompaniment pairs with known key, tempo, chords and melody.

A pair is made in two steps, both seeded by an explicit ``numpy.random.Generator``:

1. :func:`sample_score` draws the music: key (tonic pitch class, major or natural minor), tempo,
   a diatonic chord progression (one chord per bar or per half bar, 4/4) and a melody in the key
   (chord tones on strong beats, scale steps in between, note lengths on the eighth-note grid,
   some rests). The score *is* the labels dict (JSON-serialisable).
2. :func:`render_vocals` and :func:`render_accompaniment` turn a score into audio. The renderers
   read nothing but the score and their own generator, so a test can transpose the chords of a
   score and render a wrong-key accompaniment with exactly the same timing.

Vocals: a harmonic source (sum of harmonics with spectral tilt) whose pitch follows the melody
with delayed vibrato and optional glides between legato notes, shaped by a cascade of three
vowel formant resonators (the vowel changes per note), ADSR note envelopes and a little breath
noise. Accompaniment: a low-passed pad of detuned triangle/saw voices on the chord tones, a bass
on the chord root on every beat, and drums (kick on 1 and 3, snare on 2 and 4, hi-hats on the
eighths) made of sine and noise bursts.

Everything is numpy; no global RNG is touched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
# Quality of the triad built on each scale degree (diatonic triads).
TRIAD_QUALITIES = {
    "major": ("maj", "min", "min", "maj", "maj", "min", "dim"),
    "minor": ("min", "dim", "maj", "min", "min", "maj", "maj"),
}
QUALITY_INTERVALS = {"maj": (0, 4, 7), "min": (0, 3, 7), "dim": (0, 3, 6)}
QUALITY_SUFFIX = {"maj": "", "min": "m", "dim": "dim"}
ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")
# Progressions as 0-based scale degrees; each loops over the clip.
PROGRESSIONS = {
    "major": (
        (0, 4, 5, 3),  # I V vi IV
        (0, 5, 3, 4),  # I vi IV V
        (5, 3, 0, 4),  # vi IV I V
        (0, 3, 4, 3),  # I IV V IV
        (0, 3, 5, 4),  # I IV vi V
        (1, 4, 0, 5),  # ii V I vi
        (3, 6, 2, 5),  # IV vii° iii vi
    ),
    "minor": (
        (0, 5, 2, 6),  # i VI III VII
        (0, 3, 4, 0),  # i iv v i
        (0, 6, 5, 6),  # i VII VI VII
        (0, 3, 6, 2),  # i iv VII III
        (0, 5, 3, 4),  # i VI iv v
        (0, 1, 4, 0),  # i ii° v i
    ),
}
TEMPO_RANGE_BPM = (80, 140)
BEATS_PER_BAR = 4
PEAK = 0.9  # max |sample| of vocals, accompaniment and their sum
VOCALS_TO_ACCOMPANIMENT_DB = 0.0  # RMS of vocals relative to RMS of accompaniment
# RMS of each accompaniment part relative to the pad (a fixed mix, so chroma stays chord-led).
BASS_TO_PAD_DB = -3.0
DRUMS_TO_PAD_DB = -4.0
MELODY_CENTRE_MIDI = (60, 67)  # the centre of the melody's range is drawn from this (inclusive)
MELODY_HALF_RANGE = 7  # semitones either side of the centre
PAD_ROOT_MIDI = 48  # pad voicing: root position triad with the root in C3..B3
BASS_ROOT_MIDI = 36  # bass root in C2..B2
# Vowel formants (F1, F2, F3) in Hz and their bandwidths in Hz.
VOWELS = {
    "a": ((800.0, 1200.0, 2600.0), (80.0, 90.0, 120.0)),
    "e": ((450.0, 2000.0, 2700.0), (70.0, 100.0, 120.0)),
    "i": ((300.0, 2300.0, 3000.0), (60.0, 100.0, 120.0)),
    "o": ((500.0, 850.0, 2500.0), (70.0, 80.0, 120.0)),
    "u": ((330.0, 800.0, 2400.0), (60.0, 80.0, 120.0)),
}
SUPPORTED_CHANNELS = (1, 2)
MIN_SAMPLE_RATE = 8000
MIN_SECONDS = 1.0  # at least one beat at the slowest tempo, so every clip has a melody note


def midi_to_hz(midi: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def chord_name(root_pc: int, quality: str) -> str:
    return NOTE_NAMES[root_pc % 12] + QUALITY_SUFFIX[quality]


def scale_pitch_classes(tonic_pc: int, mode: str) -> list[int]:
    return [(tonic_pc + step) % 12 for step in SCALES[mode]]


# ---------------------------------------------------------------------------------------------
# Score


def _check_args(seconds: float, sample_rate: int | None = None, channels: int | None = None) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= MIN_SECONDS):
        raise ValueError(f"seconds must be a number >= {MIN_SECONDS}, got {seconds!r}")
    if sample_rate is not None and (not isinstance(sample_rate, int) or sample_rate < MIN_SAMPLE_RATE):
        raise ValueError(f"sample_rate must be an int >= {MIN_SAMPLE_RATE}, got {sample_rate!r}")
    if channels is not None and channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {channels!r}")


def _sample_chords(
    rng: np.random.Generator, *, tonic_pc: int, mode: str, beat_s: float, seconds: float
) -> tuple[list[dict[str, Any]], int]:
    progressions = PROGRESSIONS[mode]
    progression = progressions[int(rng.integers(len(progressions)))]
    chords_per_bar = 1 if rng.random() < 0.7 else 2
    chord_s = beat_s * BEATS_PER_BAR / chords_per_bar
    scale = SCALES[mode]
    chords = []
    for j in range(int(math.ceil(seconds / chord_s - 1e-9))):
        degree = progression[j % len(progression)]
        root_pc = (tonic_pc + scale[degree]) % 12
        quality = TRIAD_QUALITIES[mode][degree]
        roman = ROMAN[degree] if quality == "maj" else ROMAN[degree].lower()
        chords.append(
            {
                "start_s": j * chord_s,
                "end_s": min((j + 1) * chord_s, float(seconds)),
                "root_pc": root_pc,
                "quality": quality,
                "pitch_classes": [(root_pc + i) % 12 for i in QUALITY_INTERVALS[quality]],
                "name": chord_name(root_pc, quality),
                "roman": roman + ("°" if quality == "dim" else ""),
            }
        )
    return chords, chords_per_bar


def _chord_at(chords: list[dict[str, Any]], t_s: float) -> dict[str, Any]:
    for chord in chords:
        if chord["start_s"] <= t_s < chord["end_s"]:
            return chord
    return chords[-1]


def _sample_melody(
    rng: np.random.Generator,
    *,
    tonic_pc: int,
    mode: str,
    chords: list[dict[str, Any]],
    beat_s: float,
    seconds: float,
    low_midi: int,
    high_midi: int,
) -> list[dict[str, Any]]:
    scale_pcs = set(scale_pitch_classes(tonic_pc, mode))
    pitches = [m for m in range(low_midi, high_midi + 1) if m % 12 in scale_pcs]
    eighth_s = beat_s / 2
    total_eighths = int(math.floor(seconds / eighth_s + 1e-9))
    index = len(pitches) // 2  # start near the middle of the range
    notes: list[dict[str, Any]] = []
    u = 2 if total_eighths > 4 and rng.random() < 0.3 else 0  # sometimes a short pickup rest
    last_was_rest = u > 0
    while u < total_eighths:
        if notes and not last_was_rest and rng.random() < 0.15:
            u += int(rng.choice([1, 2]))
            last_was_rest = True
            continue
        last_was_rest = False
        duration = min(int(rng.choice([1, 2, 2, 3, 4])), total_eighths - u)
        strong = u % 4 == 0 or (u % 2 == 0 and duration >= 2)  # beats 1 and 3, or long on-beat notes
        if strong:
            chord_pcs = set(_chord_at(chords, u * eighth_s)["pitch_classes"])
            candidates = [i for i, m in enumerate(pitches) if m % 12 in chord_pcs]
            distance = np.array([abs(pitches[i] - pitches[index]) for i in candidates], dtype=np.float64)
            weights = np.exp(-distance / 3.0)
            index = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
        else:
            step = int(rng.choice([-2, -1, 1, 2], p=[0.15, 0.35, 0.35, 0.15]))
            index = index + step
            if not 0 <= index < len(pitches):  # reflect at the edges of the range
                index -= 2 * step
        notes.append(
            {"start_s": u * eighth_s, "end_s": (u + duration) * eighth_s, "midi": int(pitches[index])}
        )
        u += duration
    return notes


def sample_score(rng: np.random.Generator, *, seconds: float) -> dict[str, Any]:
    """Draw key, tempo, chords and melody for a clip of ``seconds``; returns the labels dict.

    Times are in seconds. Chords are contiguous and cover ``[0, seconds]``; melody notes lie on the
    eighth-note grid, inside the key's scale, and end by ``seconds``.
    """
    _check_args(seconds)
    tonic_pc = int(rng.integers(12))
    mode = "major" if rng.random() < 0.5 else "minor"
    tempo_bpm = float(rng.integers(TEMPO_RANGE_BPM[0], TEMPO_RANGE_BPM[1] + 1))
    beat_s = 60.0 / tempo_bpm
    n_beats = int(math.ceil(seconds / beat_s - 1e-9))
    chords, chords_per_bar = _sample_chords(rng, tonic_pc=tonic_pc, mode=mode, beat_s=beat_s, seconds=seconds)
    centre = int(rng.integers(MELODY_CENTRE_MIDI[0], MELODY_CENTRE_MIDI[1] + 1))
    low, high = centre - MELODY_HALF_RANGE, centre + MELODY_HALF_RANGE
    melody = _sample_melody(
        rng, tonic_pc=tonic_pc, mode=mode, chords=chords, beat_s=beat_s, seconds=seconds,
        low_midi=low, high_midi=high,
    )
    return {
        "key": {
            "tonic_pc": tonic_pc,
            "tonic": NOTE_NAMES[tonic_pc],
            "mode": mode,
            "name": f"{NOTE_NAMES[tonic_pc]} {mode}",
            "scale_pitch_classes": scale_pitch_classes(tonic_pc, mode),
        },
        "tempo_bpm": tempo_bpm,
        "beats_per_bar": BEATS_PER_BAR,
        "chords_per_bar": chords_per_bar,
        "seconds": float(seconds),
        "beat_times_s": [i * beat_s for i in range(n_beats)],
        "chords": chords,
        "melody": melody,
        "melody_range_midi": [low, high],
    }


# ---------------------------------------------------------------------------------------------
# Rendering helpers


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _resonance_gain(f_hz: np.ndarray, centre_hz: float, bandwidth_hz: float) -> np.ndarray:
    """Magnitude of a 2-pole resonator (unit gain at DC, peak ~ centre/bandwidth at centre)."""
    x = f_hz / centre_hz
    q = centre_hz / bandwidth_hz
    return 1.0 / np.sqrt((1.0 - x * x) ** 2 + (x / q) ** 2)


def _spectral_filter(x: np.ndarray, sample_rate: int, gain_of_hz) -> np.ndarray:
    """Zero-phase filtering by a magnitude response given as a function of frequency (FFT)."""
    spectrum = np.fft.rfft(x)
    spectrum *= gain_of_hz(np.fft.rfftfreq(x.size, 1.0 / sample_rate))
    return np.fft.irfft(spectrum, n=x.size)


def _adsr(n: int, sample_rate: int, *, attack_s: float, decay_s: float, sustain: float, hold_n: int,
          release_s: float) -> np.ndarray:
    """ADSR envelope of ``n`` samples whose gate is open for the first ``hold_n`` samples."""
    t = np.arange(n) / sample_rate
    attack = np.clip(t / attack_s, 0.0, 1.0)
    decay = sustain + (1.0 - sustain) * np.exp(-np.maximum(t - attack_s, 0.0) / decay_s)
    env = np.where(t < attack_s, attack, decay)
    gate_s = hold_n / sample_rate
    level_at_release = float(env[min(hold_n, n) - 1]) if hold_n > 0 else 0.0
    release = level_at_release * np.clip(1.0 - (t - gate_s) / release_s, 0.0, 1.0)
    return np.where(t < gate_s, env, release)


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    kernel = np.ones(width) / width
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


# ---------------------------------------------------------------------------------------------
# Vocals


def render_vocals(labels: dict[str, Any], rng: np.random.Generator, *, sample_rate: int) -> np.ndarray:
    """Render the melody of ``labels`` as a voice-like mono signal (float64, shape ``(N,)``)."""
    _check_args(labels["seconds"], sample_rate)
    n = int(round(labels["seconds"] * sample_rate))
    notes = labels["melody"]
    out = np.zeros(n)
    if not notes:
        return out

    # Pitch and formants are planned at a control rate of ~4 ms, then interpolated.
    hop = max(1, int(round(sample_rate * 0.004)))
    n_ctrl = n // hop + 2
    t_ctrl = np.arange(n_ctrl) * hop / sample_rate
    vibrato_hz = rng.uniform(5.0, 6.0)
    vibrato_cents = rng.uniform(20.0, 50.0)
    vibrato_delay_s = rng.uniform(0.15, 0.3)
    vibrato_phase = rng.uniform(0.0, 2.0 * np.pi)
    tilt = rng.uniform(1.0, 1.4)  # harmonic k has amplitude k**-tilt before the formants
    glide_prob = 0.6

    midi_ctrl = np.full(n_ctrl, float(notes[0]["midi"]))
    formants_ctrl = np.zeros((3, n_ctrl))
    bandwidths_ctrl = np.zeros((3, n_ctrl))
    vowel_names = sorted(VOWELS)
    for i, note in enumerate(notes):
        start = note["start_s"]
        until = notes[i + 1]["start_s"] if i + 1 < len(notes) else np.inf  # hold pitch through rests
        region = ((t_ctrl >= start) | (i == 0)) & (t_ctrl < until)  # the first note also fills the lead-in
        midi_ctrl[region] = note["midi"]
        vowel = VOWELS[vowel_names[int(rng.integers(len(vowel_names)))]]
        formants_ctrl[:, region] = np.asarray(vowel[0])[:, None]
        bandwidths_ctrl[:, region] = np.asarray(vowel[1])[:, None]
        previous = notes[i - 1] if i > 0 else None
        if previous is not None and abs(previous["end_s"] - start) < 1e-9 and rng.random() < glide_prob:
            glide_s = rng.uniform(0.03, 0.07)
            in_glide = region & (t_ctrl < start + glide_s)
            frac = (t_ctrl[in_glide] - start) / glide_s
            midi_ctrl[in_glide] = previous["midi"] + (note["midi"] - previous["midi"]) * frac
        # Vibrato fades in after a delay, as singers do on held notes.
        in_note = (t_ctrl >= start) & (t_ctrl < note["end_s"])
        ramp = np.clip((t_ctrl[in_note] - start - vibrato_delay_s) / 0.2, 0.0, 1.0)
        vib = vibrato_cents * ramp * np.sin(2 * np.pi * vibrato_hz * t_ctrl[in_note] + vibrato_phase)
        midi_ctrl[in_note] += vib / 100.0
    smooth = max(1, int(round(0.03 / (hop / sample_rate))))
    formants_ctrl = np.stack([_moving_average(f, smooth) for f in formants_ctrl])
    bandwidths_ctrl = np.stack([_moving_average(b, smooth) for b in bandwidths_ctrl])

    f0_ctrl = midi_to_hz(midi_ctrl)
    t = np.arange(n) / sample_rate
    f0 = np.interp(t, t_ctrl, f0_ctrl)
    phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate
    nyquist_guard = 0.45 * sample_rate
    n_harmonics = int(min(48, nyquist_guard // f0_ctrl.min()))
    for k in range(1, n_harmonics + 1):
        fk = k * f0_ctrl
        amp = k ** (-tilt) * (fk < nyquist_guard)
        for j in range(3):
            amp = amp * _resonance_gain(fk, formants_ctrl[j], bandwidths_ctrl[j])
        out += np.interp(t, t_ctrl, amp) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))

    env = np.zeros(n)
    for note in notes:
        s0 = int(round(note["start_s"] * sample_rate))
        hold = int(round(note["end_s"] * sample_rate)) - s0
        release_s = rng.uniform(0.05, 0.1)
        length = min(n - s0, hold + int(release_s * sample_rate) + 1)
        if length <= 0:
            continue
        note_env = rng.uniform(0.8, 1.0) * _adsr(
            length, sample_rate, attack_s=rng.uniform(0.015, 0.05), decay_s=0.08,
            sustain=rng.uniform(0.65, 0.85), hold_n=hold, release_s=release_s,
        )
        env[s0:s0 + length] = np.maximum(env[s0:s0 + length], note_env)
    voiced = out * env
    breath = _spectral_filter(rng.standard_normal(n), sample_rate,
                              lambda f: 1.0 / np.sqrt(1.0 + (1500.0 / np.maximum(f, 1.0)) ** 4))
    voiced += 0.04 * _rms(voiced) / max(_rms(breath), 1e-12) * breath * env
    return voiced


# ---------------------------------------------------------------------------------------------
# Accompaniment


def _render_pad(labels: dict[str, Any], rng: np.random.Generator, *, sample_rate: int, n: int) -> np.ndarray:
    out = np.zeros(n)
    detune_cents = rng.uniform(5.0, 10.0)
    cutoff_hz = rng.uniform(1200.0, 2000.0)
    saw_mix = 0.25
    max_harmonics = 12
    for chord in labels["chords"]:
        s0 = int(round(chord["start_s"] * sample_rate))
        hold = int(round(chord["end_s"] * sample_rate)) - s0
        length = min(n - s0, hold + int(0.08 * sample_rate))
        if length <= 0:
            continue
        t = np.arange(length) / sample_rate
        root_midi = PAD_ROOT_MIDI + chord["root_pc"]
        voices = [root_midi + (pc - chord["root_pc"]) % 12 for pc in chord["pitch_classes"]]
        segment = np.zeros(length)
        for midi in voices:
            for cents in (-detune_cents, detune_cents):
                f = float(midi_to_hz(midi)) * 2.0 ** (cents / 1200.0)
                k = np.arange(1, max_harmonics + 1)
                k = k[k * f < 0.45 * sample_rate]
                triangle = np.where(k % 2 == 1, 1.0 / k**2, 0.0)
                amp = (triangle + saw_mix / k) / np.sqrt(1.0 + (k * f / cutoff_hz) ** 4)
                phases = rng.uniform(0, 2 * np.pi, size=k.size)
                segment += amp @ np.sin(2 * np.pi * f * k[:, None] * t[None, :] + phases[:, None])
        env = _adsr(length, sample_rate, attack_s=0.04, decay_s=0.3, sustain=0.85, hold_n=hold, release_s=0.08)
        out[s0:s0 + length] += segment * env
    return out


def _render_bass(labels: dict[str, Any], rng: np.random.Generator, *, sample_rate: int, n: int) -> np.ndarray:
    out = np.zeros(n)
    beat_s = 60.0 / labels["tempo_bpm"]
    for beat_t in labels["beat_times_s"]:
        chord = _chord_at(labels["chords"], beat_t)
        midi = BASS_ROOT_MIDI + chord["root_pc"] + (12 if rng.random() < 0.1 else 0)
        f = float(midi_to_hz(midi))
        s0 = int(round(beat_t * sample_rate))
        hold = int(0.9 * beat_s * sample_rate)
        length = min(n - s0, hold + int(0.02 * sample_rate))
        if length <= 0:
            continue
        t = np.arange(length) / sample_rate
        tone = np.sin(2 * np.pi * f * t) + 0.4 * np.sin(4 * np.pi * f * t) + 0.15 * np.sin(6 * np.pi * f * t)
        env = _adsr(length, sample_rate, attack_s=0.005, decay_s=0.3, sustain=0.0, hold_n=hold, release_s=0.02)
        out[s0:s0 + length] += rng.uniform(0.85, 1.0) * tone * env
    return out


def _render_drums(labels: dict[str, Any], rng: np.random.Generator, *, sample_rate: int, n: int) -> np.ndarray:
    sr = sample_rate
    t_kick = np.arange(int(0.3 * sr)) / sr
    kick_f = 48.0 + 80.0 * np.exp(-t_kick / 0.03)
    kick = np.sin(2 * np.pi * np.cumsum(kick_f) / sr) * np.exp(-t_kick / 0.12)
    t_snare = np.arange(int(0.2 * sr)) / sr
    snare_noise = np.diff(rng.standard_normal(t_snare.size + 1))  # first difference: brighter noise
    snare = (0.6 * snare_noise * np.exp(-t_snare / 0.07)
             + 0.5 * np.sin(2 * np.pi * 190.0 * t_snare) * np.exp(-t_snare / 0.05))
    t_hat = np.arange(int(0.08 * sr)) / sr
    hat_noise = np.diff(rng.standard_normal(t_hat.size + 2), n=2)
    hat = 0.25 * hat_noise * np.exp(-t_hat / 0.02)

    out = np.zeros(n)

    def hit(sample: np.ndarray, time_s: float, gain: float) -> None:
        s0 = int(round(time_s * sr))
        if s0 >= n:
            return
        length = min(sample.size, n - s0)
        out[s0:s0 + length] += gain * sample[:length]

    beat_s = 60.0 / labels["tempo_bpm"]
    for i, beat_t in enumerate(labels["beat_times_s"]):
        in_bar = i % labels["beats_per_bar"]
        hit(kick if in_bar in (0, 2) else snare, beat_t, rng.uniform(0.85, 1.0))
        hit(hat, beat_t, rng.uniform(0.9, 1.0))
        hit(hat, beat_t + beat_s / 2, rng.uniform(0.5, 0.7))
    return out


def render_accompaniment(labels: dict[str, Any], rng: np.random.Generator, *, sample_rate: int) -> np.ndarray:
    """Render pad + bass + drums for ``labels`` (float64, shape ``(N,)``, pad at unit RMS)."""
    _check_args(labels["seconds"], sample_rate)
    n = int(round(labels["seconds"] * sample_rate))
    pad_rng, bass_rng, drums_rng = rng.spawn(3)
    pad = _render_pad(labels, pad_rng, sample_rate=sample_rate, n=n)
    bass = _render_bass(labels, bass_rng, sample_rate=sample_rate, n=n)
    drums = _render_drums(labels, drums_rng, sample_rate=sample_rate, n=n)
    out = np.zeros(n)
    for part, db in ((pad, 0.0), (bass, BASS_TO_PAD_DB), (drums, DRUMS_TO_PAD_DB)):
        rms = _rms(part)
        if rms > 0:
            out += 10.0 ** (db / 20.0) * part / rms
    return out


# ---------------------------------------------------------------------------------------------
# Pairs and datasets


def _as_generator(rng: np.random.Generator | int) -> tuple[np.random.Generator, int | None]:
    if isinstance(rng, np.random.Generator):
        return rng, None
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng)), int(rng)
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def synth_pair(
    rng: np.random.Generator | int, *, seconds: float, sample_rate: int, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One seeded (vocals, accompaniment, labels) triple; audio is float32 ``(channels, N)``.

    ``rng`` is a ``numpy.random.Generator`` (consumed) or an int seed; the seed is recorded in
    ``labels["seed"]`` only when an int is given (a Generator's seed is not recoverable).
    Mix: vocals RMS = accompaniment RMS + ``VOCALS_TO_ACCOMPANIMENT_DB``; then one common gain sets
    the largest peak of vocals, accompaniment and their sum to ``PEAK``. Stereo duplicates mono.
    """
    _check_args(seconds, sample_rate, channels)
    generator, seed = _as_generator(rng)
    labels = sample_score(generator, seconds=seconds)
    vocals_rng, accompaniment_rng = generator.spawn(2)
    vocals = render_vocals(labels, vocals_rng, sample_rate=sample_rate)
    accompaniment = render_accompaniment(labels, accompaniment_rng, sample_rate=sample_rate)
    vocals_rms, accompaniment_rms = _rms(vocals), _rms(accompaniment)
    if vocals_rms > 0 and accompaniment_rms > 0:
        vocals *= accompaniment_rms / vocals_rms * 10.0 ** (VOCALS_TO_ACCOMPANIMENT_DB / 20.0)
    peak = max(np.abs(vocals).max(), np.abs(accompaniment).max(), np.abs(vocals + accompaniment).max())
    if peak > 0:
        vocals *= PEAK / peak
        accompaniment *= PEAK / peak
    labels["sample_rate"] = int(sample_rate)
    labels["channels"] = int(channels)
    labels["seed"] = seed
    labels["mix"] = {"peak": PEAK, "vocals_to_accompaniment_db": VOCALS_TO_ACCOMPANIMENT_DB}
    as_channels = lambda x: np.repeat(x.astype(np.float32)[None, :], channels, axis=0)  # noqa: E731
    return as_channels(vocals), as_channels(accompaniment), labels


def track_seed(seed: int, index: int) -> int:
    """The seed of track ``index`` in a dataset seeded with ``seed`` (independent of the size n)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _progress(iterable, *, total: int, enabled: bool, desc: str):
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(iterable):
            yield item
            print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)
        return
    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr)


def write_synth_dataset(
    out_dir: str | os.PathLike,
    *,
    n: int,
    seconds: float,
    sample_rate: int,
    channels: int = 1,
    seed: int = 0,
    progress: bool = True,
    subtype: str = "FLOAT",
) -> list[Path]:
    """Write ``n`` pairs as ``<out_dir>/synth_XXXXX/{vocals.wav, accompaniment.wav, labels.json}``.

    The tracks are written to a temporary sibling directory that is renamed to ``out_dir`` only
    when all are complete. Track ``i`` is seeded by :func:`track_seed` ``(seed, i)``, so it is the
    same whatever ``n`` is. ``subtype`` is the soundfile subtype (``FLOAT`` is lossless here).
    Returns the track directories (under ``out_dir``).
    """
    import soundfile

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _check_args(seconds, sample_rate, channels)
    if subtype not in ("FLOAT", "PCM_16", "PCM_24"):
        raise ValueError(f"subtype must be FLOAT, PCM_16 or PCM_24, got {subtype!r}")
    out_dir = Path(out_dir)

    def refuse_if_occupied() -> None:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise FileExistsError(
                f"{out_dir}: already exists and is not an empty directory; "
                "choose a new output directory or remove this one first"
            )

    refuse_if_occupied()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp_dir, 0o777 & ~mask)  # tempfile's 0700 is not what a dataset folder should be
    names = [f"synth_{i:05d}" for i in range(n)]
    try:
        for i in _progress(range(n), total=n, enabled=progress, desc=f"synth {out_dir.name}"):
            track_dir = tmp_dir / names[i]
            track_dir.mkdir()
            s = track_seed(seed, i)
            vocals, accompaniment, labels = synth_pair(s, seconds=seconds, sample_rate=sample_rate,
                                                       channels=channels)
            labels.update({"track": names[i], "index": i, "dataset_seed": int(seed)})
            soundfile.write(track_dir / "vocals.wav", vocals.T, sample_rate, subtype=subtype)
            soundfile.write(track_dir / "accompaniment.wav", accompaniment.T, sample_rate, subtype=subtype)
            (track_dir / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
        refuse_if_occupied()
        if out_dir.exists():
            out_dir.rmdir()  # empty: replace it
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / name for name in names]


def synth_pair_at_rate(
    seed: int, *, seconds: float, sample_rate: int, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``synth_pair`` for any model rate: rendered at ≥ MIN_SAMPLE_RATE, then resampled."""
    from toolkit.data.stems import resample

    render_rate = max(sample_rate, MIN_SAMPLE_RATE)
    vocals, accompaniment, labels = synth_pair(seed, seconds=seconds, sample_rate=render_rate,
                                               channels=channels)
    labels = {**labels, "sample_rate": sample_rate, "rendered_at_hz": render_rate}
    return (resample(vocals, render_rate, sample_rate), resample(accompaniment, render_rate, sample_rate),
            labels)
