"""Peak GEMM throughput of XNNPACK on this CPU, fp32 and int8, measured through ExecuTorch itself.

One large Linear (``--rows`` × ``--in-features`` → ``--out-features``) is exported with
``targets.executorch`` exactly as a component is (fp32; int8 static: per-channel int8 weights and
one calibrated activation scale; int8 per-frame: the same weights, activations quantized per row
at run time, XNNPACK's dynamically quantized kernel) and timed through runtime_py's ExecuTorch
runner at each thread count. Peak = MACs / p50 time (MACs = rows × in × out). A component's
compute floor at a precision is its MACs (toolkit.macs) divided by this peak: nothing runs
faster, so a runtime under its floor means the floor is wrong.

Every export and measurement runs in its own subprocess with a timeout (NOTES.md: one combined
export + run + threadpool-reset process hung once).

    python benchmarks/xnnpack_peak.py --threads 1 2 --runs 10
    python benchmarks/xnnpack_peak.py --rows 64 --in-features 128 --out-features 128 --runs 2 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line

# precision label → targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK (None: fp32, no plan)
PRECISIONS = {"fp32": None, "int8-static": "static", "int8-frame": "per_frame"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Subprocess jobs (also used by song_latency.py)
# ---------------------------------------------------------------------------------------------


def time_runs(runner, feed: dict, *, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``runner.run(feed)`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.run(feed)
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(feed)
        ms.append(1e3 * (time.perf_counter() - t0))
    return ms


def run_worker(script: Path, job: dict, *, work: Path, timeout_s: float,
               threads: int | None = None) -> dict:
    """Run ``python script --worker JOB`` in a fresh process group; a hang is killed whole."""
    fd, job_path = tempfile.mkstemp(prefix=f"{job['kind']}-", suffix=".json", dir=work)
    os.close(fd)
    job = {**job, "result": job_path + ".result"}
    Path(job_path).write_text(json.dumps(job))
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), "--worker", job_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timeout after {timeout_s:.0f} s", "timeout": True}
    result_path = Path(job["result"])
    if not result_path.exists():
        return {"error": f"worker exited {proc.returncode} without a result: {stderr[-1500:]}"}
    result = json.loads(result_path.read_text())
    result["worker_wall_s"] = time.perf_counter() - t0
    return result


def worker_main(job_path: Path, workers: dict) -> int:
    job = json.loads(job_path.read_text())
    try:
        result, code = workers[job["kind"]](job), 0
    except Exception as exc:  # reported to the parent, which records the row as failed
        result = {"error": f"{type(exc).__name__}: {str(exc)[:500]}",
                  "traceback": traceback.format_exc()[-3000:]}
        code = 1
    Path(job["result"]).write_text(json.dumps(result))
    return code


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def _gemm_spec(rows: int, in_features: int, out_features: int):
    import torch
    from torch import nn

    from toolkit.components import ComponentSpec

    class Gemm(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    return ComponentSpec("gemm", Gemm().eval(), (x,), ("x",), ("y",))


def work_export(job: dict) -> dict:
    import torch

    import targets.executorch as et
    from calibration.precision import LayerPrecision

    spec = _gemm_spec(job["rows"], job["in_features"], job["out_features"])
    scheme = PRECISIONS[job["precision"]]
    plan = calib = None
    if scheme is not None:
        et.INT8_ACTIVATIONS_ON_XNNPACK = scheme
        plan = {"linear": LayerPrecision("int8", "int8")}
        g = torch.Generator().manual_seed(2)
        calib = [(torch.randn(spec.example_inputs[0].shape, generator=g),) for _ in range(2)]
    art = et.export(spec, precision="fp32", plan=plan, calib=calib, out_dir=Path(job["out_dir"]))
    path = Path(job["out_dir"]) / art.path
    d = art.details["delegation"]
    return {"path": str(path), "file_bytes": path.stat().st_size, "precision": art.precision,
            "delegates": d["delegates"], "non_delegated_ops": d["non_delegated_ops"],
            "delegated_ops": d["delegated_ops"]}


def work_time(job: dict) -> dict:
    import numpy as np

    from runtime_py.runners import load_runner

    runner = load_runner("executorch", Path(job["path"]), threads=job["threads"])
    x = np.random.default_rng(3).standard_normal((job["rows"], job["in_features"])).astype(np.float32)
    feed = {runner.input_names[0]: x}
    ms = time_runs(runner, feed, warmup=job["warmup"], runs=job["runs"])
    return {"threads_actual": runner.threads, "ms": ms, "p50_ms": statistics.median(ms),
            "min_ms": min(ms)}


WORKERS = {"export": work_export, "time": work_time}


# ---------------------------------------------------------------------------------------------
# The measurement, importable
# ---------------------------------------------------------------------------------------------


def measure_peaks(*, rows: int, in_features: int, out_features: int, threads: list[int],
                  precisions: list[str], warmup: int, runs: int, timeout_s: float,
                  work: Path) -> dict:
    """{precision: {"export": {...}, "threads": {n: {"p50_ms", "gmacs_per_s", ...}}}}."""
    work.mkdir(parents=True, exist_ok=True)
    macs = rows * in_features * out_features
    shape = {"rows": rows, "in_features": in_features, "out_features": out_features}
    out = {}
    for precision in precisions:
        log(f"export {precision} Linear {rows}×{in_features}→{out_features} ...")
        export = run_worker(Path(__file__).resolve(), {"kind": "export", "precision": precision,
                                                       "out_dir": str(work / precision), **shape},
                            work=work, timeout_s=timeout_s)
        entry = {"export": export, "macs": macs, "threads": {}}
        for n in threads:
            if "error" in export:
                entry["threads"][str(n)] = {"error": "export failed"}
                continue
            res = run_worker(Path(__file__).resolve(),
                             {"kind": "time", "path": export["path"], "threads": n, "warmup": warmup,
                              "runs": runs, **shape}, work=work, timeout_s=timeout_s, threads=n)
            if "p50_ms" in res:
                res["gmacs_per_s"] = macs / (res["p50_ms"] / 1e3) / 1e9
                res["gmacs_per_s_best"] = macs / (res["min_ms"] / 1e3) / 1e9
                log(f"  {precision} at {n} thread(s): {res['p50_ms']:.2f} ms, "
                    f"{res['gmacs_per_s']:.1f} GMAC/s")
            else:
                log(f"  {precision} at {n} thread(s): FAILED {res['error']}")
            entry["threads"][str(n)] = res
        out[precision] = entry
    return out


def peak_gmacs(peaks: dict, precision: str, threads: int) -> float | None:
    """The best (min-time) rate: a floor built on it is a true lower bound."""
    return peaks.get(precision, {}).get("threads", {}).get(str(threads), {}).get("gmacs_per_s_best")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(Path(argv[1]), WORKERS)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="GEMM M: rows of the Linear's input")
    p.add_argument("--in-features", type=int, default=2048, help="GEMM K")
    p.add_argument("--out-features", type=int, default=2048, help="GEMM N")
    p.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--out", type=Path, default=REPO / "out" / "xnnpack_peak")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xnnpack-peak-") as tmp:
        peaks = measure_peaks(rows=a.rows, in_features=a.in_features, out_features=a.out_features,
                              threads=sorted(set(a.threads)), precisions=a.precisions,
                              warmup=a.warmup, runs=a.runs, timeout_s=a.timeout, work=Path(tmp))
    head = ["precision", *[f"{n}t p50 ms" for n in a.threads], *[f"{n}t GMAC/s (p50 / best)" for n in a.threads],
            "delegates", "file MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, entry in peaks.items():
        cells = [precision]
        res = [entry["threads"].get(str(n), {}) for n in a.threads]
        cells += [f"{r['p50_ms']:.2f}" if "p50_ms" in r else "failed" for r in res]
        cells += [f"{r['gmacs_per_s']:.1f} / {r['gmacs_per_s_best']:.1f}" if "p50_ms" in r else "—"
                  for r in res]
        export = entry["export"]
        cells += [str(export.get("delegates", "—")),
                  f"{export['file_bytes'] / 1e6:.2f}" if "file_bytes" in export else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    notes = (f"One Linear, {a.rows} rows × {a.in_features} → {a.out_features} "
             f"({a.rows * a.in_features * a.out_features / 1e9:.2f} GMAC per call), exported with "
             "targets.executorch and run through runtime_py's ExecuTorch runner (threadpool reset "
             f"to n before loading); {a.warmup} warm-up and {a.runs} timed calls per row, each "
             "measurement in its own subprocess. int8-static: int8 weights per channel, one "
             "calibrated activation scale; int8-frame: activations quantized per row at run time. "
             "GMAC/s = MACs / time; the best (min-time) rate is the peak a floor divides by.")
    payload = {"command": command_line(__file__, argv), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(a).items()},
               "wall_s": time.time() - t_start, "peaks": peaks, "table": table}
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(table)
    print()
    print(notes)
    if a.record:
        append_section("XNNPACK peak GEMM throughput (fp32, int8 static, int8 per-frame)",
                       command=command_line(__file__, argv), wall_s=time.time() - t_start,
                       notes=notes, table=table)
    log(f"wrote {a.out / 'results.json'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
