"""``toolkit matrix`` (the CI leg on this host) and the export/verify half of ``toolkit run``.

Exports a checkpoint to every target, verifies each bundle in its own ``python -m runtime_py
verify`` subprocess (isolating runtimes, with a timeout), keeps a report for those that cannot run
here (status ``unavailable`` with the reason) and writes the device matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from toolkit.bundle import export_bundle
from toolkit.checkpoint import Pipeline
from toolkit.report import write_matrix

VERIFY_TIMEOUT_S = 600


def verify_in_subprocess(bundle: Path, report: Path, *, runs: int, warmup: int,
                         threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "runtime_py", "verify", str(bundle), "--runs", str(runs),
           "--warmup", str(warmup), "--out", str(report)]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"runtime_py verify {bundle} exceeded {VERIFY_TIMEOUT_S} s") from None
    if not report.is_file():
        raise RuntimeError(f"runtime_py verify {bundle} wrote no report:\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    # When and how it ran, so that two runs of one bundle can be told apart in the matrix.
    data["run"] = {"finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                   "command": " ".join(cmd[1:])}
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, report)
    return data


def render_in_subprocess(bundle: Path, out: Path, *, example: int = 0, seed_index: int = 0) -> Path:
    """One generation of ``bundle`` by its own runtime, in a process that holds only what a device
    holds (``python -m toolkit.render_bundle``); the audio as a ``.npy``."""
    cmd = [sys.executable, "-m", "toolkit.render_bundle", str(bundle), str(out), "--example", str(example),
           "--seed-index", str(seed_index)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"rendering {bundle} exceeded {VERIFY_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"rendering {bundle} failed:\n{proc.stderr[-2000:]}")
    return Path(out)


def run_matrix(pipeline: Pipeline, out: Path, *, targets: tuple[str, ...] | None = None,
               steps: int | None = None, runs: int = 3, warmup: int = 1,
               log=print) -> dict:
    from targets import target_names

    targets = target_names() if targets is None else targets
    out = Path(out)
    bundles_dir, reports_dir = out / "bundles", out / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    result = {"bundles": {}, "reports": {}}
    report_paths = []
    for target in targets:
        t0 = time.time()
        log(f"export {target} ...")
        bundle = export_bundle(pipeline, target=target, out_root=bundles_dir, steps=steps)
        result["bundles"][target] = str(bundle)
        log(f"  exported {bundle.name} in {time.time() - t0:.0f} s; verify ...")
        t0 = time.time()
        report_path = reports_dir / f"{bundle.name}.report.json"
        report = verify_in_subprocess(bundle, report_path, runs=runs, warmup=warmup)
        log(f"  {bundle.name}: {report['status']}" + (f" ({report['reason']})" if report["reason"] else "")
            + f" in {time.time() - t0:.0f} s")
        result["reports"][target] = {"path": str(report_path), "status": report["status"],
                                     "reason": report["reason"]}
        report_paths.append(report_path)
    written = write_matrix(report_paths, out / "matrix")
    result["matrix"] = {k: str(v) for k, v in written.items()}
    return result
