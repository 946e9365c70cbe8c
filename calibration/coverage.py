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

Text conditioning (:func:`calibration.caption_coverage.augment_captions`) runs the same loop over
captions. The measured features live in :mod:`calibration.vocal_features`, the transforms and the
re-synthesis in :mod:`calibration.vocal_transforms`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.vocal_features import measure_features
from calibration.vocal_transforms import (
    _fit_length,
    _match_rms,
    _peak_safe,
    add_vibrato,
    brighten,
    gate,
    lowpass,
    pitch_shift,
    resynthesize,
    time_stretch,
)
from toolkit.data import music

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
