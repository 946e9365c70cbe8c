"""The native runner (``adm-run``, built from ``native/``) driven from runtime_py.

An ExecuTorch bundle needs no torch on the device: ``adm-run`` links the ExecuTorch C++ runtime,
checks the bundle, runs the whole generation (encoder, the DDIM loop with guidance, decoder) on
the bundle's reference inputs, times it, and writes its outputs as ``.npy``. This module finds the
binary, runs it as a subprocess, and judges its outputs with runtime_py's own numpy metrics
(:func:`runtime_py.verify.quality_against_reference`, the same code as the Python runner's), so
the report has the same figures whichever runner produced them, plus ``"runner": "native"``.

Where the binary is looked for, first found wins: ``$ADM_RUN``; ``build/adm-run`` and
``build/*/adm-run`` in this repository (``cmake -S . -B build``, or a preset's build folder);
``adm-run`` on ``PATH``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

RUNNERS = ("native", "python")
BINARY = "adm-run"
ENV_BINARY = "ADM_RUN"
REPO = Path(__file__).resolve().parents[1]
# Targets whose bundles adm-run runs.
NATIVE_TARGETS = ("executorch",)
# adm-run's exit status (native/main.cpp): 0 pass, 1 budget failed, 2 bad bundle or arguments,
# 3 ExecuTorch failed.
EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_RUNTIME = 0, 1, 2, 3


class NativeRunnerError(RuntimeError):
    """adm-run is missing, or failed; the message says which binary and why."""


def find_binary() -> Path | None:
    """The adm-run to use (see the module doc), or None when none is built or installed."""
    env = os.environ.get(ENV_BINARY)
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise NativeRunnerError(f"${ENV_BINARY}={env}: not an executable file")
        return path
    candidates = [REPO / "build" / BINARY, *sorted((REPO / "build").glob(f"*/{BINARY}"))]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(BINARY)
    return Path(found) if found else None


def choose_runner(target: str, requested: str | None) -> str:
    """'native' or 'python' for a bundle of ``target``: the requested one, else native where it
    applies (an ExecuTorch bundle) and is built, else python. A request that cannot be honoured
    is a NativeRunnerError."""
    if requested is not None and requested not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {requested!r}")
    if requested == "python":
        return "python"
    if target not in NATIVE_TARGETS:
        if requested == "native":
            raise NativeRunnerError(f"the native runner runs {', '.join(NATIVE_TARGETS)} bundles, not {target}; "
                                    "use --runner python")
        return "python"
    if find_binary() is None:
        if requested == "native":
            raise NativeRunnerError(f"{BINARY} is not built: `cmake -S . -B build && cmake --build build -j2` in the "
                                    f"repository, or set ${ENV_BINARY}, or put {BINARY} on PATH")
        return "python"
    return "native"


def binary_version(binary: Path) -> str:
    """'adm-run 0.1.0 (executorch 1.5.1+cpu)'."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def _tail(text: str, lines: int = 6) -> str:
    # ExecuTorch logs informational lines ("I 00:00:00.0 executorch:...") to stderr; keep ours.
    kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("I ", "W "))]
    return "\n".join(kept[-lines:])


def run_verify(bundle: Path, out_dir: Path, *, runs: int, warmup: int, threads: int | None,
               binary: Path | None = None, etdump: Path | None = None,
               timeout_s: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``adm-run verify`` on ``bundle``: (its report, its outputs {vocal_latent, latents, audio}).

    A bad bundle or a failed run is a NativeRunnerError carrying adm-run's own message.
    """
    binary = binary or find_binary()
    if binary is None:
        raise NativeRunnerError(f"{BINARY} is not built (see runtime_py.native)")
    out_dir = Path(out_dir)
    report_path, outputs = out_dir / "native-report.json", out_dir / "outputs"
    cmd = [str(binary), "verify", str(bundle), "--out", str(report_path), "--outputs", str(outputs),
           "--runs", str(runs), "--warmup", str(warmup)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if etdump is not None:
        cmd += ["--etdump", str(etdump)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode not in (EXIT_PASS, EXIT_FAIL):
        what = {EXIT_BAD_INPUT: "refused the bundle", EXIT_RUNTIME: "failed in ExecuTorch"}.get(
            proc.returncode, f"crashed (exit status {proc.returncode})")
        raise NativeRunnerError(f"{binary} {what}: {_tail(proc.stderr) or _tail(proc.stdout)}")
    report = json.loads(report_path.read_text())
    arrays = {name: np.load(outputs / f"{name}.npy") for name in ("vocal_latent", "latents", "audio")}
    return report, arrays


class ReplayPipeline:
    """``encode`` / ``sample`` / ``decode`` answered from the native runner's outputs for the
    bundle's reference inputs, so that :func:`runtime_py.verify.quality_against_reference` judges
    them with exactly the code it judges the Python runner with. Each call is matched to its
    reference input by value; an input that is not one of them is a ValueError."""

    def __init__(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
        self.inputs, self.outputs = inputs, outputs

    @staticmethod
    def _find(stack: np.ndarray, item: np.ndarray, what: str) -> tuple[int, ...]:
        for index in np.ndindex(stack.shape[:stack.ndim - item.ndim]):
            if np.array_equal(stack[index], item):
                return index
        raise ValueError(f"{what}: not one of the bundle's reference inputs; the native runner's outputs "
                         "cover those only")

    def encode(self, vocals: np.ndarray) -> np.ndarray:
        (i,) = self._find(self.inputs["vocals"], vocals[0], "encode")
        return self.outputs["vocal_latent"][i:i + 1]

    def sample(self, cond: np.ndarray, noise: np.ndarray) -> np.ndarray:
        i, j = self._find(self.inputs["noise"], noise[0], "sample")
        return self.outputs["latents"][i, j:j + 1]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        i, j = self._find(self.outputs["latents"], latent[0], "decode")
        return self.outputs["audio"][i, j:j + 1]


def native_version_check(version_at_export: str | None, native_runtime: str) -> dict:
    """runners.version_check's verdict for the ExecuTorch the binary was built against."""
    from runtime_py.runners import version_check

    return version_check("executorch", version_at_export, here=native_runtime)


def verify_native(bundle: Path, manifest: dict, report: dict, *, runs: int, warmup: int,
                  threads: int | None) -> dict:
    """Fill ``report`` (runtime_py.verify's skeleton, manifest fields set) from adm-run's run of
    ``bundle``: its latency, end-to-end and memory figures, quality judged here in numpy."""
    from runtime_py.bundle import load_reference
    from runtime_py.verify import quality_against_reference, record_verdict, record_version_check

    report["runner"] = "native"
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="adm-run-") as tmp:
        try:
            native, outputs = run_verify(bundle, Path(tmp), runs=max(runs, 0), warmup=warmup,
                                         threads=threads, binary=binary)
        except NativeRunnerError as exc:
            report.update(status="fail", reason=str(exc))
            return report
    device = dict(native.get("device") or {})
    device.update(python=platform.python_version(), numpy=np.__version__)
    runtime = (device.get("runtime") or {}).get("executorch", "")
    report["device"] = device
    report["native"] = {"binary": str(binary), "version": binary_version(binary),
                        "status": native.get("status"),
                        "aggregate": (native.get("quality") or {}).get("aggregate")}
    if not record_version_check(report, native_version_check(
            (manifest.get("runtime") or {}).get("version_at_export"), runtime)):
        return report

    inputs, ref = load_reference(bundle, manifest)
    per_example, aggregate = quality_against_reference(ReplayPipeline(inputs, outputs), inputs, ref,
                                                       manifest["audio"]["sample_rate"])
    report["quality"] = {"per_example": per_example, "aggregate": aggregate}
    for key in ("latency", "end_to_end", "load"):
        report[key] = native.get(key) or {}
    report["memory"] = {"peak_rss_mb": (native.get("memory") or {}).get("peak_rss_mb"),
                        "note": "peak RSS of the adm-run process (ExecuTorch C++ runtime, programs, arrays); "
                                "the Python process that judged its outputs is not counted"}
    return record_verdict(report, aggregate, manifest["quality_budget"])
