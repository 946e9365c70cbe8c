"""Coverage-driven augmentation of the conditioning set: PTQ4ADM §5.1, Algorithm 1, for audio.

The paper covers a set of text captions B_custom aspects with a binary coverage vector per
caption V_t ∈ {0,1}^|B| (topic modelling), the global vector V_final[b] = max_t V_t[b], a GPT that
writes a caption for each uncovered aspect (validated by its own coverage vector), and the
redundancy score R(S) = Σ_{i≠j} 𝕀(V_i = V_j) with re-prompting for variety above τ_redundancy;
it stops at full coverage or after I_max iterations.

Here the conditioning is a vocal. The aspects are musical properties of the vocal, each cut into
bins (:data:`AUDIO_ASPECTS`); an example covers the bin its MEASURED feature falls in (numpy: f0 by
autocorrelation, onsets, RMS, spectral centroid, chroma key), so V has one 1 per aspect whose
feature could be measured. Instead of GPT, a new example aimed at an uncovered bin is made from an
existing one by a signal transform (pitch shift by resampling, phase-vocoder time stretch, gain,
filtering, vibrato by a modulated delay, gating) or re-synthesised with ``toolkit.data.synth``
from a score with chosen parameters; it is kept only if its measured coverage hits the target.

Text conditioning (:func:`augment_captions`) runs the same loop over captions, with keyword
coverage of PTQ4ADM's modality and aspect lists and a template caption writer (or a user command).
"""

from __future__ import annotations

import copy
import math
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from scipy.signal import butter, resample_poly, sosfilt

from toolkit.data import music, synth

# --- aspects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aspect:
    """A measured feature cut into bins: bin i holds values in [edges[i-1], edges[i])."""

    name: str
    feature: str
    edges: tuple[float, ...]  # len(labels) - 1 interior edges, increasing
    labels: tuple[str, ...]
    unit: str = ""

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.labels) - 1 or list(self.edges) != sorted(self.edges):
            raise ValueError(f"aspect {self.name}: needs {len(self.labels) - 1} increasing edges")

    def bin_of(self, value: float | None) -> int | None:
        if value is None or not math.isfinite(value):
            return None
        return int(np.searchsorted(np.asarray(self.edges), value, side="right"))

    def centre(self, index: int) -> float:
        """A value well inside bin ``index`` (the target of a transform)."""
        e = self.edges
        if index == 0:
            return e[0] - (e[1] - e[0]) / 2 if len(e) > 1 else e[0] * 0.7
        if index == len(e):
            return e[-1] + (e[-1] - e[-2]) / 2 if len(e) > 1 else e[0] * 1.4
        return (e[index - 1] + e[index]) / 2


# Bin edges are set for sung melodies; the synthetic vocals (MIDI 53..74, 80..140 BPM, vibrato
# 20..50 cents) fall across them. Edit them, or pass your own list, for other material.
AUDIO_ASPECTS: tuple[Aspect, ...] = (
    Aspect("pitch_register", "median_midi", (57.0, 65.0), ("low", "mid", "high"), "MIDI"),
    Aspect("pitch_range", "range_semitones", (3.0, 7.0), ("narrow", "medium", "wide"), "semitones"),
    Aspect("tempo", "tempo_bpm", (100.0, 125.0), ("slow", "medium", "fast"), "BPM"),
    Aspect("note_density", "onsets_per_s", (2.5, 4.5), ("sparse", "medium", "dense"), "onsets/s"),
    Aspect("loudness", "rms_dbfs", (-26.0, -16.0), ("quiet", "medium", "loud"), "dBFS"),
    Aspect("brightness", "centroid_hz", (400.0, 800.0), ("dark", "medium", "bright"), "Hz"),
    Aspect("vibrato", "vibrato_cents", (12.0,), ("light", "strong"), "cents"),
    Aspect("voiced_ratio", "voiced_ratio", (0.55, 0.8), ("low", "mid", "high"), ""),
    Aspect("mode", "mode_minor", (0.5,), ("major", "minor"), ""),
)


def bin_names(aspects: Sequence[Aspect] = AUDIO_ASPECTS) -> list[str]:
    """The names of B_custom: ``aspect:bin`` in coverage-vector order."""
    return [f"{a.name}:{label}" for a in aspects for label in a.labels]


# --- measured features (numpy) -----------------------------------------------------------------

F0_MIN_HZ, F0_MAX_HZ = 70.0, 1000.0
F0_FRAME_S, F0_HOP_S = 0.025, 0.01
YIN_THRESHOLD = 0.15  # first dip of the normalised difference below this is the period
VOICING_APERIODICITY = 0.35  # frames whose best dip stays above this are unvoiced
SILENCE_DB = -50.0  # frames this far below the clip's loudest frame are unvoiced regardless


def _frames(x: np.ndarray, frame: int, hop: int) -> np.ndarray:
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
    fr = _frames(x, w + tau_max, hop)
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
    spec = np.abs(np.fft.rfft(_frames(x, 1024, 256) * np.hanning(1024), axis=1)) ** 2
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


def coverage_vector(features: dict[str, float], aspects: Sequence[Aspect] = AUDIO_ASPECTS) -> np.ndarray:
    """V ∈ {0,1}^|B|: for each aspect, a 1 at the bin its feature falls in (none if unmeasured)."""
    v = []
    for a in aspects:
        one_hot = [0] * len(a.labels)
        b = a.bin_of(features.get(a.feature))
        if b is not None:
            one_hot[b] = 1
        v.extend(one_hot)
    return np.asarray(v, dtype=np.int8)


def global_coverage(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """V_final[b] = max_i V_i[b]."""
    return np.max(np.stack(vectors), axis=0) if len(vectors) else np.zeros(0, dtype=np.int8)


def redundancy(vectors: Sequence[np.ndarray]) -> int:
    """PTQ4ADM's R(S) = Σ_{i≠j} 𝕀(V_i = V_j), over ordered pairs (a group of k equal vectors adds k(k−1))."""
    counts = Counter(np.asarray(v).tobytes() for v in vectors)
    return int(sum(k * (k - 1) for k in counts.values()))


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
    fr = _frames(pad, n_fft, hop) * win
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


# --- Algorithm 1 for audio --------------------------------------------------------------------


@dataclass
class Example:
    """One conditioning example: mono audio, where it came from, its features and coverage vector."""

    name: str
    audio: np.ndarray
    source: str
    transforms: list[str]
    features: dict[str, float] = field(default_factory=dict)
    vector: np.ndarray | None = None


def _candidates(ex: Example, aspect: Aspect, target: int, sample_rate: int,
                rng: np.random.Generator) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """Transforms of ``ex`` that aim ``aspect``'s feature at bin ``target``, most direct first."""
    x, f, goal = ex.audio, ex.features, aspect.centre(target)
    seconds = x.size / sample_rate
    cur = f.get(aspect.feature, float("nan"))
    seed = int(rng.integers(2**31))
    fresh = lambda **kw: (lambda: _match_rms(resynthesize(  # noqa: E731
        np.random.default_rng(seed), seconds=seconds, sample_rate=sample_rate, **kw)[:x.size], x))
    out: list[tuple[str, Callable[[], np.ndarray]]] = []
    name = aspect.name
    if name == "pitch_register":
        shift = goal - cur if math.isfinite(cur) else 0.0
        out.append((f"pitch_shift({shift:+.1f} st)", lambda: pitch_shift(x, shift)))
        out.append((f"resynth(transpose {round(goal - 60):+d})", fresh(transpose=round(goal - 60))))
    elif name == "pitch_range":
        scale = goal / cur if math.isfinite(cur) and cur > 0 else 1.0
        out.append((f"resynth(range x{scale:.2f})", fresh(range_scale=float(np.clip(scale, 0.0, 3.0)))))
        out.append((f"resynth(range x{2.0 if target else 0.2})", fresh(range_scale=2.0 if target else 0.2)))
    elif name in ("tempo", "note_density"):
        rate = goal / cur if math.isfinite(cur) and cur > 0 else 1.0
        rate = float(np.clip(rate, 0.5, 2.0))
        out.append((f"time_stretch(x{rate:.2f})", lambda: _fit_length(time_stretch(x, rate), x.size)))
        if name == "tempo":
            out.append((f"resynth(tempo {goal:.0f})", fresh(tempo_bpm=float(np.clip(goal, 50, 200)))))
        else:
            out.append(("resynth(sparse)" if target == 0 else "resynth(tempo 160)",
                        fresh(sparse=True) if target == 0 else fresh(tempo_bpm=160.0)))
    elif name == "loudness":
        gain_db = goal - cur if math.isfinite(cur) else 0.0
        out.append((f"gain({gain_db:+.1f} dB)", lambda: _peak_safe(x * 10 ** (gain_db / 20))))
    elif name == "brightness":
        if target == 0:
            out.append(("lowpass(700 Hz)", lambda: _match_rms(lowpass(x, sample_rate, 700.0), x)))
            out.append(("lowpass(400 Hz)", lambda: _match_rms(lowpass(x, sample_rate, 400.0), x)))
        else:
            out.append(("brighten(1500 Hz)", lambda: _match_rms(brighten(x, sample_rate, 1500.0), x)))
            out.append(("brighten(800 Hz, x8)",
                        lambda: _match_rms(brighten(x, sample_rate, 800.0, gain=8.0), x)))
            out.append(("pitch_shift(+12 st)+brighten(1500 Hz, x4)", lambda: _match_rms(
                brighten(pitch_shift(x, 12.0), sample_rate, 1500.0, gain=4.0), x)))
    elif name == "vibrato":
        if target == 1:
            out.append(("vibrato(60 cents)", lambda: add_vibrato(x, sample_rate, cents=60.0)))
        else:
            out.append(("resynth()", fresh()))
    elif name == "voiced_ratio":
        if target == 0:
            out.append(("gate(45%)", lambda: gate(x, sample_rate, keep_fraction=0.45)))
        out.append(("resynth(legato)" if target else "resynth(sparse)",
                    fresh(legato=True) if target else fresh(sparse=True)))
    elif name == "mode":
        out.append((f"resynth(mode {aspect.labels[target]})", fresh(mode=aspect.labels[target])))
    return out


def _measure(ex: Example, sample_rate: int, aspects: Sequence[Aspect]) -> Example:
    ex.features = measure_features(ex.audio, sample_rate)
    ex.vector = coverage_vector(ex.features, aspects)
    return ex


def _nearest_source(examples: list[Example], aspect: Aspect, target: int) -> list[Example]:
    """Examples ordered by how close their feature is to the target bin (unmeasured last)."""
    goal = aspect.centre(target)

    def key(ex: Example) -> float:
        v = ex.features.get(aspect.feature, float("nan"))
        return abs(v - goal) if math.isfinite(v) else math.inf

    return sorted(examples, key=key)


def augment_audio(
    clips: Sequence[tuple[str, np.ndarray]],
    sample_rate: int,
    *,
    aspects: Sequence[Aspect] = AUDIO_ASPECTS,
    max_iterations: int = 8,
    redundancy_threshold: int = 0,
    seed: int = 0,
    sources_per_target: int = 2,
) -> tuple[list[Example], dict]:
    """Algorithm 1 over vocal clips ``[(name, audio (N,) or (C, N))]``: returns S_final and the report.

    Each iteration tries, for every uncovered bin, the transforms of :func:`_candidates` on the
    ``sources_per_target`` examples nearest to it, and adds the first whose measured coverage hits
    the bin. Then, while R(S) > ``redundancy_threshold``, a duplicate (a vector shared with another
    example) is diversified (moved to another bin of some aspect so that its vector is new) or,
    failing that, pruned: a duplicate never adds coverage, so coverage is unchanged.
    """
    rng = np.random.default_rng(seed)
    names = bin_names(aspects)
    examples = [_measure(Example(n, music.to_mono(a), source=n, transforms=[]), sample_rate, aspects)
                for n, a in clips]
    if not examples:
        raise ValueError("no conditioning clips to cover")
    initial = global_coverage([e.vector for e in examples])
    history, added, pruned, diversified = [], [], [], []
    offsets = np.cumsum([0] + [len(a.labels) for a in aspects])
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        covered = global_coverage([e.vector for e in examples])
        missing = [b for b in range(len(names)) if not covered[b]]
        if not missing:
            iteration -= 1
            break
        for b in missing:
            if global_coverage([e.vector for e in examples])[b]:
                continue
            ai = int(np.searchsorted(offsets, b, side="right") - 1)
            aspect, target = aspects[ai], b - offsets[ai]
            originals = [e for e in examples if not e.transforms] or examples
            done = False
            for src in _nearest_source(originals, aspect, target)[:sources_per_target]:
                for label, make in _candidates(src, aspect, target, sample_rate, rng):
                    cand = _measure(Example(f"{src.name}+{names[b]}", np.asarray(make(), np.float64),
                                            source=src.source, transforms=[*src.transforms, label]),
                                    sample_rate, aspects)
                    if cand.vector[b]:  # validated by its measured coverage
                        examples.append(cand)
                        added.append({"name": cand.name, "target": names[b], "transforms": cand.transforms,
                                      "iteration": iteration})
                        done = True
                        break
                if done:
                    break
        history.append({"iteration": iteration,
                        "covered": int(global_coverage([e.vector for e in examples]).sum()),
                        "examples": len(examples), "redundancy": redundancy([e.vector for e in examples])})
    # Redundancy: diversify or prune duplicates while R > τ.
    guard = 0
    while redundancy([e.vector for e in examples]) > redundancy_threshold and guard < 4 * len(examples):
        guard += 1
        counts = Counter(e.vector.tobytes() for e in examples)
        dup = next(e for e in reversed(examples) if counts[e.vector.tobytes()] > 1)
        seen = {e.vector.tobytes() for e in examples}
        replaced = False
        for ai in rng.permutation(len(aspects)):
            aspect = aspects[ai]
            here = aspect.bin_of(dup.features.get(aspect.feature))
            for target in range(len(aspect.labels)):
                if target == here:
                    continue
                for label, make in _candidates(dup, aspect, target, sample_rate, rng)[:1]:
                    cand = _measure(Example(f"{dup.name}~{aspect.name}:{aspect.labels[target]}",
                                            np.asarray(make(), np.float64), source=dup.source,
                                            transforms=[*dup.transforms, label]), sample_rate, aspects)
                    if cand.vector.tobytes() not in seen:
                        examples[examples.index(dup)] = cand
                        diversified.append({"from": dup.name, "to": cand.name, "transforms": cand.transforms})
                        replaced = True
                        break
                if replaced:
                    break
            if replaced:
                break
        if not replaced:
            examples.remove(dup)
            pruned.append(dup.name)
    final = global_coverage([e.vector for e in examples])
    report = {
        "modality": "audio",
        "bins": names,
        "aspects": {
            a.name: {"feature": a.feature, "unit": a.unit, "edges": list(a.edges),
                     "bins": {label: bool(final[offsets[i] + j]) for j, label in enumerate(a.labels)}}
            for i, a in enumerate(aspects)
        },
        "initial_covered": int(initial.sum()),
        "covered": int(final.sum()),
        "total_bins": len(names),
        "full_coverage": bool(final.all()),
        "uncovered": [n for n, c in zip(names, final) if not c],
        "iterations": iteration,
        "max_iterations": max_iterations,
        "redundancy": redundancy([e.vector for e in examples]),
        "redundancy_threshold": redundancy_threshold,
        "history": history,
        "added": added,
        "diversified": diversified,
        "pruned": pruned,
        "examples": [{"name": e.name, "source": e.source, "transforms": e.transforms,
                      "features": {k: (None if not math.isfinite(v) else round(v, 4))
                                   for k, v in e.features.items()},
                      "covers": [n for n, c in zip(names, e.vector) if c]} for e in examples],
    }
    return examples, report


# --- Algorithm 1 for text captions ------------------------------------------------------------

# PTQ4ADM §4: modalities and aspects, each with the keywords that mark a caption as covering it.
TEXT_TOPICS: dict[str, tuple[str, ...]] = {
    "modality:speech": ("speech", "speaking", "talking", "speaks", "voice", "narrat", "conversation"),
    "modality:music": ("music", "song", "melody", "guitar", "piano", "drum", "orchestra", "singing"),
    "modality:environmental": ("rain", "wind", "traffic", "street", "forest", "ocean", "waves", "crowd"),
    "modality:sound_effects": ("explosion", "door", "footsteps", "beep", "click", "whoosh", "engine"),
    "modality:human_vocalizations": ("laugh", "cough", "scream", "breath", "whistl", "cry", "sneez"),
    "modality:animal": ("dog", "bird", "cat", "cow", "horse", "bark", "chirp", "meow", "animal"),
    "modality:abstract": ("drone", "synth", "abstract", "ambient", "glitch", "noise texture"),
    "aspect:temporal_coherence": ("continuous", "steady", "gradually", "sustained", "then", "followed by"),
    "aspect:spatial_coherence": ("distant", "close", "left", "right", "stereo", "far away", "nearby"),
    "aspect:loudness": ("loud", "quiet", "soft", "faint", "booming", "whisper"),
    "aspect:rhythmic_structure": ("rhythm", "beat", "tempo", "rhythmic", "pulse", "steady beat"),
    "aspect:pitch": ("high-pitched", "low-pitched", "high pitched", "low pitched", "pitch", "deep", "shrill"),
    "aspect:texture": ("texture", "grainy", "smooth", "rough", "dense", "sparse", "layered"),
    "aspect:harmonicity": ("harmonic", "chord", "tonal", "harmony", "in tune", "dissonant"),
    "aspect:reverberation": ("reverb", "echo", "hall", "cathedral", "cavernous", "dry room"),
    "aspect:articulation": ("staccato", "legato", "plucked", "sharp attack", "crisp", "slurred"),
}

# The template writer's phrase for each topic (a caption generator command can replace it).
TEXT_PHRASES: dict[str, str] = {
    "modality:speech": "a man speaking",
    "modality:music": "piano music",
    "modality:environmental": "rain falling on a street",
    "modality:sound_effects": "a door slamming",
    "modality:human_vocalizations": "a child laughing",
    "modality:animal": "a dog barking",
    "modality:abstract": "an abstract synth drone",
    "aspect:temporal_coherence": "a sound that continues steadily, then fades gradually",
    "aspect:spatial_coherence": "heard from far away on the left",
    "aspect:loudness": "very loud",
    "aspect:rhythmic_structure": "with a steady beat",
    "aspect:pitch": "high-pitched",
    "aspect:texture": "with a grainy texture",
    "aspect:harmonicity": "with rich harmonic chords",
    "aspect:reverberation": "with a long reverb in a large hall",
    "aspect:articulation": "played staccato",
}


def caption_vector(caption: str, topics: dict[str, tuple[str, ...]] = TEXT_TOPICS) -> np.ndarray:
    """Keyword topic coverage of one caption (case-insensitive substring match)."""
    text = caption.lower()
    return np.asarray([int(any(k in text for k in kws)) for kws in topics.values()], dtype=np.int8)


def template_caption(topic: str, context: str, rng: np.random.Generator) -> str:
    """A caption aimed at ``topic``: the context caption joined with the topic's phrase."""
    phrase = TEXT_PHRASES[topic]
    if topic.startswith("modality:"):
        return f"{phrase}, {context[0].lower() + context[1:]}" if context else phrase
    joiner = (", ", " and ", " - ")[int(rng.integers(3))]
    return f"{context.rstrip('.')}{joiner}{phrase}"


def command_caption_writer(command: Sequence[str]) -> Callable[[str, str, np.random.Generator], str]:
    """A caption writer that runs a user's generator: stdin gets the prompt, stdout is the caption."""
    def write(topic: str, context: str, rng: np.random.Generator) -> str:
        prompt = (f"Write one short audio caption that clearly covers '{topic}'. "
                  f"Vary it from this one: {context}\n")
        done = subprocess.run(list(command), input=prompt, capture_output=True, text=True, timeout=120,
                              check=True)
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    return write


def augment_captions(
    captions: Sequence[str],
    *,
    topics: dict[str, tuple[str, ...]] = TEXT_TOPICS,
    writer: Callable[[str, str, np.random.Generator], str] = template_caption,
    max_iterations: int = 4,
    redundancy_threshold: int = 0,
    seed: int = 0,
) -> tuple[list[str], dict]:
    """Algorithm 1 over captions: add validated captions for uncovered topics, diversify duplicates."""
    rng = np.random.default_rng(seed)
    names = list(topics)
    final = list(captions)
    vectors = [caption_vector(c, topics) for c in final]
    history, added, diversified, pruned = [], [], [], []
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        covered = global_coverage(vectors) if vectors else np.zeros(len(names), np.int8)
        missing = [b for b in range(len(names)) if not covered[b]]
        if not missing:
            iteration -= 1
            break
        for b in missing:
            context = final[int(rng.integers(len(final)))] if final else ""
            cand = writer(names[b], context, rng)
            v = caption_vector(cand, topics)
            if cand and v[b]:
                final.append(cand)
                vectors.append(v)
                added.append({"caption": cand, "target": names[b], "iteration": iteration})
        history.append({"iteration": iteration, "covered": int(global_coverage(vectors).sum()),
                        "captions": len(final), "redundancy": redundancy(vectors)})
    guard = 0
    while redundancy(vectors) > redundancy_threshold and guard < 4 * len(final):
        guard += 1
        counts = Counter(v.tobytes() for v in vectors)
        i = max(k for k, v in enumerate(vectors) if counts[v.tobytes()] > 1)
        seen = {v.tobytes() for v in vectors}
        replaced = False
        for b in rng.permutation(len(names)):
            if vectors[i][b]:
                continue
            cand = writer(names[b], final[i], rng)
            v = caption_vector(cand, topics)
            if cand and v.tobytes() not in seen:
                diversified.append({"from": final[i], "to": cand})
                final[i], vectors[i] = cand, v
                replaced = True
                break
        if not replaced:
            pruned.append(final.pop(i))
            vectors.pop(i)
    cov = global_coverage(vectors)
    report = {
        "modality": "text",
        "bins": names,
        "aspects": {n: bool(c) for n, c in zip(names, cov)},
        "covered": int(cov.sum()),
        "total_bins": len(names),
        "full_coverage": bool(cov.all()),
        "uncovered": [n for n, c in zip(names, cov) if not c],
        "iterations": iteration,
        "max_iterations": max_iterations,
        "redundancy": redundancy(vectors),
        "redundancy_threshold": redundancy_threshold,
        "history": history,
        "added": added,
        "diversified": diversified,
        "pruned": pruned,
        "captions": final,
    }
    return final, report


def report_json_safe(report: dict[str, Any]) -> dict[str, Any]:
    """The report with numpy scalars turned into Python numbers (json.dumps-ready)."""
    def fix(o):
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        return o
    return fix(report)
