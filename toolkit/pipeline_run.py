"""``toolkit run``: the main job on a checkpoint (default: the embedded demo).

Synthesise a labelled vocal, generate its accompaniment at full precision and score its musical
agreement; then export every component to every target, verify each bundle that can run here (the
others are reported ``unavailable`` with the reason) and write the device matrix, all under ``out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import soundfile as sf

from toolkit.checkpoint import load_checkpoint
from toolkit.data.music import beat_alignment, chord_agreement, tempo_agreement
from toolkit.data.synth import synth_pair_at_rate
from toolkit.generate import generate_accompaniment


def run_main_job(out: Path, *, checkpoint: Path | None, steps: int, seed: int,
                 targets: tuple[str, ...] | None = None, runs: int = 3, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_checkpoint(checkpoint)
    seconds = pipe.segment_samples / pipe.sample_rate
    vocals, true_acc, labels = synth_pair_at_rate(10_000 + seed, seconds=seconds, sample_rate=pipe.sample_rate,
                                          channels=pipe.audio_channels)
    sf.write(out / "vocals.wav", vocals.T, pipe.sample_rate)
    t0 = time.time()
    acc = generate_accompaniment(pipe, vocals, steps=steps, guidance=pipe.config.default_guidance,
                                 seed=seed)
    gen_s = time.time() - t0
    sf.write(out / "accompaniment.wav", acc.T, pipe.sample_rate)
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    chords = chord_agreement(acc, pipe.sample_rate, labels)
    summary = {
        "checkpoint": str(pipe.path), "model": pipe.config.name, "steps": steps,
        "guidance": pipe.config.default_guidance, "audio_s": round(seconds, 3),
        "generate_s": round(gen_s, 2), "key": labels["key"]["name"], "tempo_bpm": labels["tempo_bpm"],
        "true_chords": [c["name"] for c in labels["chords"]],
        "predicted_chords": chords["predicted_chords"],
        "chord_accuracy": chords["chord_accuracy"], "chord_cosine": chords["chord_cosine"],
        "tempo_match": tempo_agreement(acc, pipe.sample_rate, labels)["tempo_match"],
        "beat_alignment": beat_alignment(acc, pipe.sample_rate, labels),
        "outputs": {"vocals": str(out / "vocals.wav"), "accompaniment": str(out / "accompaniment.wav")},
    }
    from toolkit.matrix import run_matrix

    summary["matrix"] = run_matrix(pipe, out, targets=targets, steps=steps, runs=runs,
                                   log=log)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
