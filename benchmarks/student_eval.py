"""A distilled student against its teacher: distance to the teacher's N-step output, beside the
teacher's own DDIM at the student's step count (seed 003 Table 1's comparison, for one student).

Each held-out pair's vocal is generated with two noise seeds by the teacher at N steps (the
reference, and its seed-to-seed spread), by the teacher's DDIM at the student's step count, and
by the student; the paired distances to the N-step reference are divided by the spread
(``runtime_py.metrics.relative_to_spread``), as in ``benchmarks/distill_table.py``, whose
measurement code this reuses. Appends a section to BENCHMARKS.md unless ``--no-append``.

    python benchmarks/student_eval.py --student DIR --teacher DIR --data HELDOUT [--max-tracks 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from benchmarks.distill_table import markdown, measure, paired, render  # noqa: E402
from runtime_py.metrics import DISTANCES, log_mel  # noqa: E402
from toolkit.checkpoint import load_checkpoint  # noqa: E402
from toolkit.data.stems import list_tracks, load_track  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="held-out stems folder (toolkit data synth)")
    p.add_argument("--max-tracks", type=int, default=None)
    p.add_argument("--reference-steps", type=int, default=64, help="N: the teacher's reference steps")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--append", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cache", type=Path, default=None,
                   help="npz of the teacher's renders (reused when it exists: run the teacher's part early)")
    p.add_argument("--teacher-only", action="store_true", help="render the teacher's part into --cache and stop")
    a = p.parse_args(argv)
    t0 = time.time()
    teacher = load_checkpoint(a.teacher)
    student = None if a.teacher_only else load_checkpoint(a.student)
    guidance = teacher.config.default_guidance
    tracks = [load_track(t, sample_rate=teacher.sample_rate, channels=teacher.audio_channels)
              for t in list_tracks(a.data)[:a.max_tracks]]
    sr = teacher.sample_rate
    true_frames = np.concatenate([log_mel(tr.accompaniment, sr) for tr in tracks])
    seeds = list(range(a.seeds))
    n, k = a.reference_steps, (8 if student is None else student.config.default_steps)
    if a.cache is not None and a.cache.is_file():
        cached = np.load(a.cache)
        assert cached["reference"].shape[1] == len(tracks) and int(cached["k"]) == k, "cache of another setup"
        reference, teacher_k = list(cached["reference"]), list(cached["teacher_k"])
        reference, teacher_k = [list(r) for r in reference], [list(r) for r in teacher_k]
    else:
        print(f"teacher {n} steps ...", file=sys.stderr)
        reference = render(teacher, tracks, steps=n, guidance=guidance, seeds=seeds)
        print(f"teacher {k} steps ...", file=sys.stderr)
        teacher_k = render(teacher, tracks, steps=k, guidance=guidance, seeds=seeds)
        if a.cache is not None:
            np.savez(a.cache, reference=np.array(reference), teacher_k=np.array(teacher_k), k=k)
    if student is None:
        print(f"wrote {a.cache} in {time.time() - t0:.0f} s", file=sys.stderr)
        return 0
    spread = paired(reference, reference[1:] + reference[:1], sr)
    rows = [{"model": "teacher (DDIM)", "weighting": "—", "steps": n, "nfe": 2 * n,
             "metrics": measure(reference, reference, spread, tracks, true_frames, sr)}]
    outputs = teacher_k
    rows.append({"model": "teacher (DDIM)", "weighting": "—", "steps": k, "nfe": 2 * k,
                 "metrics": measure(outputs, reference, spread, tracks, true_frames, sr)})
    print(f"student {k} steps ...", file=sys.stderr)
    outputs = render(student, tracks, steps=k, guidance=guidance, seeds=seeds)
    prov = student.config.provenance or {}
    rows.append({"model": f"student ({a.student})", "weighting": f"{prov.get('weighting', '?')}", "steps": k,
                 "nfe": k * (1 if student.config.guidance_folded else 2),
                 "metrics": measure(outputs, reference, spread, tracks, true_frames, sr)})
    wall = time.time() - t0
    table = markdown(rows)
    spread_txt = ", ".join(f"{d} {spread[d]:.3g}" for d in DISTANCES if d in spread)
    notes = (f"Teacher `{a.teacher}`, student `{a.student}` ({prov.get('rounds', '?')} rounds × "
             f"{prov.get('iterations', '?')} iterations, {prov.get('weighting', '?')}, guidance "
             f"{'folded' if student.config.guidance_folded else 'not folded'}, lr {prov.get('lr')}, warm-up "
             f"{prov.get('warmup')}, decay {prov.get('lr_decay')}, data `{(prov.get('args') or {}).get('data')}`); "
             f"{len(tracks)} held-out pairs of `{a.data}` × {len(seeds)} seeds, guidance {guidance}. Teacher "
             f"{n}-step seed-to-seed spread: {spread_txt}. NFE: denoiser calls per clip segment.")
    print(table)
    print(f"\n{notes}\nwall time {wall:.0f} s", file=sys.stderr)
    if a.append:
        append_section("Distilled demo student against its teacher", command=command_line(__file__, argv),
                       wall_s=wall, notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
