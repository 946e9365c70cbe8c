"""The native ExecuTorch runner (adm-run) against the Python-binding runner, same bundle, same run.

For each bundle (fp32 and int8 ExecuTorch exports of one checkpoint), in one sitting and at the
same thread count, each runner verifies the bundle in its own process:

* native: ``adm-run verify BUNDLE`` (the C++ runtime; no Python in the process);
* python: ``python -m runtime_py verify BUNDLE --runner python`` (ExecuTorch's Python bindings,
  which load torch, plus the numpy sampler and metrics).

Both time each component on its deployed shapes and whole generations (encode, DDIM with CFG,
decode) the same way (warm-up, then ``--runs`` timed calls; p50 recorded), and report their own
process's peak RSS. The int8 bundle uses the plan preset ``--int8-preset`` (default w8a16: int8
weights, int8 activations per latent frame on XNNPACK; no calibration set needed), or ``--plan`` with
``--calib`` for a searched plan. The runners must agree: the table carries each one's worst latent
SNR against the bundle's PyTorch reference.

    python benchmarks/native_runner.py --threads 2 --runs 10            # the embedded demo model
    python benchmarks/native_runner.py --preset tiny --runs 2 --no-record   # a smoke run

The binary comes from runtime_py.native.find_binary ($ADM_RUN, build/, PATH): build it first with
``cmake -S . -B build && cmake --build build -j2``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402

COMPONENTS = ("vae_encoder", "denoiser", "vae_decoder")
RUNNERS = ("native", "python")
TIMEOUT_S = 3600  # one verify subprocess


def export_bundles(*, preset: str | None, checkpoint: Path | None, out_root: Path, steps: int | None,
                   int8_preset: str, plan_path: Path | None, calib: Path | None) -> dict[str, Path]:
    """fp32 and int8 ExecuTorch bundles of one pipeline (a seeded ``preset`` or a checkpoint)."""
    import torch

    from calibration.fakequant import quantizable_leaves
    from calibration.plan import make_plan
    from calibration.sensitivity import layer_sizes
    from toolkit.bundle import export_bundle
    from toolkit.checkpoint import Pipeline, PipelineConfig, load_checkpoint
    from toolkit.components import component_specs

    if preset is not None:
        from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
        from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

        torch.manual_seed(0)
        pipe = Pipeline(config=PipelineConfig(name=preset, default_steps=steps or 3, default_guidance=2.0),
                        denoiser=SoftAlignUNet(SOFTALIGN_PRESETS[preset]).eval(),
                        vae=OobleckVAE(OOBLECK_PRESETS[preset]).eval())
    else:
        pipe = load_checkpoint(checkpoint)
    if plan_path is not None:
        plan = json.loads(Path(plan_path).read_text())
    else:
        sizes, fp32 = layer_sizes(pipe.denoiser)
        decoder = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
        plan = make_plan(int8_preset, sizes, fp32, vae_decoder_layers=decoder, model=pipe.config.name)
    bundles = {"fp32": export_bundle(pipe, target="executorch", out_root=out_root / "fp32", steps=steps)}
    # Timing, not the budget, is measured here: a plan that misses it still runs (force).
    bundles["int8"] = export_bundle(pipe, target="executorch", out_root=out_root / "int8", steps=steps,
                                    plan=plan, calib=calib, force=True)
    return bundles


def run_verify(runner: str, bundle: Path, out: Path, *, threads: int, runs: int, warmup: int) -> dict:
    """One runner's verify of ``bundle`` in its own process; its report."""
    from runtime_py.native import find_binary

    common = ["--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads), "--out", str(out)]
    if runner == "native":
        binary = find_binary()
        if binary is None:
            raise SystemExit("adm-run is not built: cmake -S . -B build && cmake --build build -j2")
        cmd = [str(binary), "verify", str(bundle), *common]
    else:
        cmd = [sys.executable, "-m", "runtime_py", "verify", str(bundle), "--runner", "python", *common]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S)
    wall_s = time.perf_counter() - t0
    if not out.is_file():
        raise RuntimeError(f"{runner} verify of {bundle} wrote no report (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    report = json.loads(out.read_text())
    report["_wall_s"] = wall_s
    return report


def row(label: str, runner: str, report: dict) -> dict:
    lat = report.get("latency") or {}
    e2e = report.get("end_to_end") or {}
    status = report.get("status")
    if (report.get("budget") or {}).get("not_evaluated"):
        status = f"{status} (latent SNR floor only)"  # adm-run alone judges no spread-relative distance
    return {"bundle": label, "runner": runner, "status": status,
            **{c: (lat.get(c) or {}).get("p50_ms") for c in COMPONENTS},
            "e2e": e2e.get("p50_ms"), "rtf": e2e.get("real_time_factor"),
            "rss": (report.get("memory") or {}).get("peak_rss_mb"),
            "snr": ((report.get("quality") or {}).get("aggregate") or {}).get("latent_snr_db"),
            "threads": (report.get("device") or {}).get("threads")}


def _f(v, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def build_table(rows: list[dict]) -> str:
    head = ("| bundle | runner | threads | vae_encoder p50 ms | denoiser p50 ms | vae_decoder p50 ms | "
            "end to end p50 ms | RTF | peak RSS MiB | worst latent SNR dB | status |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['runner']} | {r['threads']} | {_f(r['vae_encoder'])} | "
                     f"{_f(r['denoiser'])} | {_f(r['vae_decoder'])} | {_f(r['e2e'])} | {_f(r['rtf'])} | "
                     f"{_f(r['rss'], '.0f')} | {_f(r['snr'], '.1f')} | {r['status']} |")
    by = {(r["bundle"], r["runner"]): r for r in rows}
    for label in dict.fromkeys(r["bundle"] for r in rows):
        n, p = by.get((label, "native")), by.get((label, "python"))
        if not (n and p):
            continue
        ratio = [(p[k] / n[k]) if n[k] and p[k] else None for k in (*COMPONENTS, "e2e")]
        rss = (n["rss"] / p["rss"]) if n["rss"] and p["rss"] else None
        lines.append(f"| {label} | python / native time | | {_f(ratio[0])}× | {_f(ratio[1])}× | {_f(ratio[2])}× | "
                     f"{_f(ratio[3])}× | | native RSS {_f(rss)}× python's | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: embedded demo)")
    src.add_argument("--preset", default=None, help="a seeded random model of this size instead (e.g. tiny)")
    src.add_argument("--bundles", type=Path, nargs="+", default=None,
                     help="existing ExecuTorch bundles instead of exporting (labelled by directory name)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--int8-preset", default="w8a16", help="plan preset of the int8 bundle (calibration.plan)")
    p.add_argument("--plan", type=Path, default=None, help="plan JSON for the int8 bundle instead of the preset")
    p.add_argument("--calib", type=Path, default=None, help="calibration set, for a plan with int8 activations")
    p.add_argument("--threads", type=int, default=2, help="threads of both runners")
    p.add_argument("--runs", type=int, default=10, help="timed runs after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--out-root", type=Path, default=None, help="where bundles and reports go (default: a temp dir)")
    p.add_argument("--no-record", action="store_true", help="print the table; do not append to BENCHMARKS.md")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="native-bench-") as tmp:
        root = args.out_root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.bundles:
            bundles = {b.name: b for b in args.bundles}
        else:
            bundles = export_bundles(preset=args.preset, checkpoint=args.checkpoint, out_root=root / "bundles",
                                     steps=args.steps, int8_preset=args.int8_preset, plan_path=args.plan,
                                     calib=args.calib)
        rows = []
        for label, bundle in bundles.items():
            for runner in RUNNERS:
                print(f"{label}: {runner} verify ...", file=sys.stderr)
                report = run_verify(runner, bundle, root / f"{label}.{runner}.report.json",
                                    threads=args.threads, runs=args.runs, warmup=args.warmup)
                rows.append(row(label if args.bundles else f"{bundle.name} ({label})", runner, report))
    table = build_table(rows)
    print(table)
    if not args.no_record:
        from runtime_py.native import binary_version, find_binary

        model = (f"seeded random `{args.preset}` model" if args.preset else
                 "existing bundles" if args.bundles else f"checkpoint `{args.checkpoint or 'embedded demo'}`")
        notes = (f"{model}; both runners in their own process, one after the other, {args.threads} threads, "
                 f"{args.warmup} warm-up + {args.runs} timed runs; p50 per component on its deployed shapes and "
                 f"of whole generations. Native: `{binary_version(find_binary())}`. Peak RSS is each verifying "
                 "process's own (the Python one holds torch, loaded by ExecuTorch's bindings, and the numpy "
                 "metrics). Figures are ratios measured in one run on a shared machine.")
        append_section("Native ExecuTorch runner vs the Python-binding runner", command=command_line(__file__, argv),
                       wall_s=time.perf_counter() - t0, notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
