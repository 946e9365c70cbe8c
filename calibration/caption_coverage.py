"""PTQ4ADM §5.1, Algorithm 1 for text captions: keyword coverage of the paper's modality and aspect
lists, a template caption writer (or a user command) for uncovered topics, redundancy pruning."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from calibration.coverage import global_coverage, redundancy

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
