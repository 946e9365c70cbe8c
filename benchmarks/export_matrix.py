"""Full-precision device matrix of the embedded demo on this host, appended to BENCHMARKS.md.

Exports every component to every target, verifies each bundle in its own ``runtime_py verify``
subprocess (warm-up, then ``--runs`` timed runs; medians), and records the matrix with the command
and the machine. Targets that cannot run here are listed as ``unavailable`` with the reason.

    python benchmarks/export_matrix.py --steps 8 --runs 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from toolkit.checkpoint import load_checkpoint  # noqa: E402
from toolkit.matrix import run_matrix  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=20, help="timed runs per latency figure")
    p.add_argument("--append", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    t0 = time.time()
    pipe = load_checkpoint(a.checkpoint)
    with tempfile.TemporaryDirectory() as work:
        result = run_matrix(pipe, Path(work), steps=a.steps, runs=a.runs,
                            log=lambda m: print(m, file=sys.stderr))
        table = Path(result["matrix"]["matrix.md"]).read_text().split("\n", 2)[2].strip()
    wall = time.time() - t0
    notes = (f"Checkpoint `{pipe.config.name}` at full precision (fp32), {a.steps} DDIM steps with CFG "
             f"(one batch-2 denoiser call per step), {pipe.segment_samples / pipe.sample_rate:.3f} s of "
             f"audio per generation; 1 warm-up then {a.runs} timed runs, p50 shown. RTF = audio seconds "
             "per wall second. Latencies are this host's; compare targets as ratios within this run.")
    print(table)
    if a.append:
        append_section("Full-precision device matrix (toolkit run's export + verify)",
                       command=command_line(__file__),
                       wall_s=wall, notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
