"""``python -m runtime_py verify BUNDLE``: run a bundle on this device, time it, judge its quality.

Loads the manifest, checks every file's sha256, runs the whole pipeline (encode vocal → numpy
DDIM loop with CFG → decode) through the target's runtime, times each component and the whole
generation (warm-up, then min / p50 / p90), and compares the outputs with the bundle's
full-precision reference using the paired metrics, each also relative to the reference's own
seed-to-seed spread. The quality budget in the manifest decides pass or fail.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from runtime_py import metrics
from runtime_py.bundle import BundleError, attention_mode, load_manifest, load_reference
from runtime_py.compensation import CompensationDraw
from runtime_py.sampler import guided, sample_ddim

REPORT_FORMAT_VERSION = 1


def _stats_ms(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    return {"runs": len(ms), "min_ms": float(ms.min()), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def _timed(fn, *, warmup: int, runs: int) -> tuple[dict, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"warmup": warmup, **_stats_ms(times)}, out


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS).

    On Linux the high-water mark of this process's own address space (VmHWM): ru_maxrss survives
    exec, so a verify started from a large process (toolkit matrix, a benchmark) would report its
    parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def device_info(target: str, threads: int | None) -> dict:
    from runtime_py.runners import runtime_version

    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": threads, "python": platform.python_version(), "numpy": np.__version__,
            "runtime": {target: runtime_version(target)}}


def runner_options(component: dict) -> dict:
    """Runner settings a component's manifest entry asks for: an ONNX graph in which the export
    found ORT's integer kernels runs at the optimisation level that fuses them."""
    kernels = ((component.get("details") or {}).get("quantization") or {}).get("ort_kernels") or {}
    if kernels.get("integer_nodes"):
        return {"optimization": kernels["level"]}
    return {}


class DevicePipeline:
    """The three runners plus the sampler, as a device runs them.

    A LiteFocus bundle's denoiser takes the compensation indices as well: call k of a generation
    (k = the DDIM step) gets ``runtime_py.compensation`` draw k from the manifest's seed, as the
    reference was sampled with.
    """

    def __init__(self, bundle: Path, manifest: dict, *, threads: int | None):
        from runtime_py.runners import load_runner

        self.manifest = manifest
        target = manifest["target"]
        self.runners = {name: load_runner(target, Path(bundle) / comp["path"], threads=threads,
                                          **runner_options(comp))
                        for name, comp in manifest["components"].items()}
        s = manifest["sampler"]
        self.table = {"t": s["t"], "alpha": s["alpha"], "sigma": s["sigma"]}
        self.guidance, self.folded = float(s["guidance"]), bool(s["guidance_folded"])
        self.denoiser_calls = 0
        self.compensation = None
        if attention_mode(manifest) == "litefocus":
            self.compensation = CompensationDraw(manifest["attention"]["compensation"],
                                                 source=str(Path(bundle) / "manifest.json"))

    def _run(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        outputs = self.runners[name].run({k: v if v.dtype == np.int64 else np.ascontiguousarray(v, dtype=np.float32)
                                          for k, v in inputs.items()})
        return next(iter(outputs.values()))

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", audio=audio)

    def denoise(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray, *, call: int = 0) -> np.ndarray:
        """One denoiser call; ``call``: its index in the generation (which compensation draw it takes)."""
        self.denoiser_calls += 1
        if self.compensation is None:
            return self._run("denoiser", x=x, t=t, cond=cond)
        return self._run("denoiser", x=x, t=t, cond=cond, **{self.compensation.input: self.compensation.indices(call)})

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", latent=latent)

    def sample(self, cond: np.ndarray, noise: np.ndarray) -> np.ndarray:
        calls = iter(range(len(self.table["t"]) - 1))  # one denoiser call per step, CFG's branches in one

        def run_denoiser(x, t, c):
            return self.denoise(x, t, c, call=next(calls))

        den = guided(run_denoiser, cond, self.guidance, folded=self.folded)
        return sample_ddim(den, noise.astype(np.float32), self.table)

    def generate(self, vocals: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        latent = self.sample(self.encode(vocals), noise)
        return latent, self.decode(latent)


def record_version_check(report: dict, check: dict) -> bool:
    """Put a runtime version check into ``report``: a warning line when the versions differ, a
    failure where they are known incompatible. False when verification must stop there."""
    report["runtime_version"] = check
    if check["status"] == "warning":
        report.setdefault("warnings", []).append(
            f"runtime version: exported for {check['exported_for']}, running on {check['device']}")
    elif check["status"] == "error":
        report.update(status="fail", reason=f"runtime version: {check['note']} (exported for "
                                            f"{check['exported_for']}, this device has {check['device']})")
        return False
    return True


def record_verdict(report: dict, aggregate: dict, budget: dict) -> dict:
    """Judge ``aggregate`` against ``budget`` into ``report``: its budget lines, status and reason."""
    lines = judge(aggregate, budget)
    report["budget"]["lines"] = lines
    passed = all(line["pass"] for line in lines)
    report["status"] = "pass" if passed else "fail"
    report["reason"] = None if passed else "quality budget exceeded: " + ", ".join(
        line["metric"] for line in lines if not line["pass"])
    return report


def judge(aggregate: dict, budget: dict) -> list[dict]:
    """Budget lines: each with its value, limit and pass/fail."""
    lines = []
    if "latent_snr_db_min" in budget:
        v = aggregate["latent_snr_db"]
        lines.append({"metric": "latent_snr_db (worst example)", "value": v,
                      "limit": f">= {budget['latent_snr_db_min']}",
                      "pass": bool(v >= budget["latent_snr_db_min"])})
    if "max_relative_to_spread" in budget:
        for k in metrics.DISTANCES:
            v = aggregate["relative_to_spread"][k]
            lines.append({"metric": f"{k} / seed spread (worst example)", "value": v,
                          "limit": f"<= {budget['max_relative_to_spread']}",
                          "pass": bool(v <= budget["max_relative_to_spread"])})
    return lines


def quality_against_reference(pipe, inputs: dict, ref: dict, sample_rate: int) -> tuple[list[dict], dict]:
    """Paired metrics of ``pipe`` (anything with numpy ``encode``/``sample``/``decode``) against the
    bundle's full-precision reference, each also relative to the reference's seed-to-seed spread.
    Returns (per example, aggregate: worst latent SNR and worst relative distances)."""
    sr = sample_rate
    per_example = []
    for i in range(inputs["vocals"].shape[0]):
        vocals = inputs["vocals"][i:i + 1]
        cond = pipe.encode(vocals)
        spread = metrics.paired_audio_metrics(ref["audio"][i, 0], ref["audio"][i, 1], sr)
        for j in range(inputs["noise"].shape[1]):
            latent = pipe.sample(cond, inputs["noise"][i, j:j + 1])
            audio = pipe.decode(latent)
            dist = metrics.paired_audio_metrics(ref["audio"][i, j], audio[0], sr)
            per_example.append({
                "example": i, "seed_index": j,
                "vocal_latent_snr_db": metrics.snr_db(ref["vocal_latent"][i], cond[0]),
                "latent_snr_db": metrics.snr_db(ref["latents"][i, j], latent[0]),
                **dist, "seed_spread": spread,
                "relative_to_spread": metrics.relative_to_spread(dist, spread),
            })
    aggregate = {
        "latent_snr_db": float(min(e["latent_snr_db"] for e in per_example)),
        "latent_snr_db_mean": float(np.mean([metrics.capped_snr_db(e["latent_snr_db"]) for e in per_example])),
        "relative_to_spread": {k: float(max(e["relative_to_spread"][k] for e in per_example))
                               for k in metrics.DISTANCES},
        **{k: float(np.mean([e[k] for e in per_example])) for k in metrics.DISTANCES},
        "si_snr_db": float(np.mean([metrics.capped_snr_db(e["si_snr_db"]) for e in per_example])),
    }
    return per_example, aggregate


def verify(bundle: Path, *, runs: int = 5, warmup: int = 1, threads: int | None = None,
           runner: str | None = None) -> dict:
    """Verify ``bundle`` on this host and return the report (ARCHITECTURE.md's Report contract).

    ``runner``: 'native' (adm-run, ExecuTorch bundles), 'python' (the target's Python runtime) or
    None: native where it applies and is built (runtime_py.native), else python. The report's
    ``runner`` says which produced the figures.
    """
    from runtime_py.runners import runtime_unavailable, version_check

    bundle = Path(bundle)
    report = {"format_version": REPORT_FORMAT_VERSION, "bundle": str(bundle), "target": None,
              "device": None, "latency": {}, "end_to_end": {}, "memory": {}, "quality": {},
              "budget": {}, "status": "fail", "reason": None}
    try:
        manifest = load_manifest(bundle)
    except BundleError as exc:
        report["reason"] = str(exc)
        return report
    target = manifest["target"]
    report.update(target=target, model=manifest["model"], precision=manifest["precision"],
                  device=device_info(target, threads), budget={"limits": manifest["quality_budget"]})
    from runtime_py import native

    try:
        report["runner"] = native.choose_runner(target, runner)
    except native.NativeRunnerError as exc:
        report.update(runner=runner, status="unavailable", reason=str(exc))
        return report
    if report["runner"] == "native":
        return native.verify_native(bundle, manifest, report, runs=runs, warmup=warmup, threads=threads)
    why = runtime_unavailable(target)
    if why is not None:
        report.update(status="unavailable", reason=why)
        return report
    if not record_version_check(report, version_check(
            target, (manifest.get("runtime") or {}).get("version_at_export"))):
        return report

    pipe = DevicePipeline(bundle, manifest, threads=threads)
    try:
        inputs, ref = load_reference(bundle, manifest)
    except (OSError, KeyError, ValueError) as exc:
        report["reason"] = f"{bundle / manifest['reference']['inputs']}: cannot read the reference ({exc})"
        return report
    sr = manifest["audio"]["sample_rate"]
    per_example, aggregate = quality_against_reference(pipe, inputs, ref, sr)
    report["quality"] = {"per_example": per_example, "aggregate": aggregate}

    # Latency: each component on its deployed shapes, then whole generations.
    vocals, noise = inputs["vocals"][:1], inputs["noise"][0, :1]
    cond = pipe.encode(vocals)
    b = manifest["sampler"]["denoiser_batch"]
    x_b = np.concatenate([noise] * b)
    t_b = np.full((b,), manifest["sampler"]["t"][0], dtype=np.float32)
    c_b = np.concatenate([cond] * b)
    lat = {}
    lat["vae_encoder"], _ = _timed(lambda: pipe.encode(vocals), warmup=warmup, runs=runs)
    lat["denoiser"], _ = _timed(lambda: pipe.denoise(x_b, t_b, c_b), warmup=warmup, runs=runs)
    lat["vae_decoder"], _ = _timed(lambda: pipe.decode(cond), warmup=warmup, runs=runs)
    report["latency"] = lat
    pipe.denoiser_calls = 0
    pipe.generate(vocals, noise)
    calls = pipe.denoiser_calls
    e2e, _ = _timed(lambda: pipe.generate(vocals, noise), warmup=warmup, runs=runs)
    audio_s = manifest["audio"]["segment_samples"] / sr
    report["end_to_end"] = {**e2e, "steps": manifest["sampler"]["steps"], "audio_seconds": audio_s,
                            "denoiser_calls_per_generation": calls,
                            "denoiser_calls_per_step": calls / manifest["sampler"]["steps"],
                            "real_time_factor": audio_s / (e2e["p50_ms"] / 1e3)}
    report["memory"] = {"peak_rss_mb": peak_rss_mb(),
                        "note": "peak RSS of the verifying process (runtime + arrays)"}
    return record_verdict(report, aggregate, manifest["quality_budget"])


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    os.replace(tmp, out)
