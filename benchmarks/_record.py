"""What every benchmark records with its figures: the machine, and a dated BENCHMARKS.md section."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} · {platform.platform()} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} CPUs · {gpu} · torch {torch.__version__} · "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How to rerun a benchmark from the repository root: ``python benchmarks/<script> <args>``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


def append_section(title: str, *, command: str, wall_s: float, notes: str, table: str,
                   path: Path = BENCHMARKS_MD) -> None:
    """Append ``## title (date)`` with the command, wall time, machine, notes and table (never overwrite)."""
    header = "" if path.exists() else "# Benchmarks\n"
    with path.open("a") as fh:
        fh.write(f"{header}\n## {title} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)\n\n"
                 f"Command: `{command}`  \nWall time: {wall_s:.0f} s  \nMachine: {machine()}\n\n"
                 f"{notes}\n\n{table}\n")
    print(f"appended to {path}", file=sys.stderr)
