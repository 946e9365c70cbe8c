"""Which int8 activation scheme should ExecuTorch use by default: static, per latent frame, or per layer?

targets.executorch lowers a W8A8 plan entry in one of three ways (``INT8_ACTIVATIONS_ON_XNNPACK``):
``static`` (one calibrated scale per tensor, XNNPACK's static int8 kernels, every int8 layer's
output quantized too), ``per_frame`` (int8 activations with one scale per latent frame computed at
run time: Conv1d as a time-major Linear, XNNPACK's dynamically quantized kernels) or ``per_layer``
(per frame only for the layers whose one-layer output SQNR under static is below the target's
threshold, static for the rest; calibration.act_schemes). This measures all three on a checkpoint
(default: the embedded demo), with the whole graph in XNNPACK:

* quality: the denoiser exported under each scheme with the same plan (``--plan`` JSON, default
  every Conv / ConvTranspose / Linear W8A8) and calibrated on the same PTQ4ADM calibration set
  (``--calib``; by default one is built from ``--calib-tracks`` synthetic vocals with
  ``toolkit calibrate``'s activation-aware strategy) samples ``--examples`` held-out vocals
  (synthetic, another seed) with the device's numpy DDIM loop and the ExecuTorch runner; the final
  latents are compared with PyTorch fp32 from the same noise: latent SNR (dB), and the distance
  over the spread (MSE to fp32 / MSE between two fp32 runs that differ only in the noise; well
  under 1 means a listener hears the same model);
* speed (``--speed``): p50 ms of one denoiser call of each program at each ``--threads``, each
  in its own subprocess (meaningless on a loaded machine; the lead runs it on a quiet one).

    python benchmarks/int8_scheme.py --examples 8 --steps 16 --speed --threads 1 2
    python benchmarks/int8_scheme.py --examples 4 --steps 8 --no-speed --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from benchmarks.xnnpack_peak import run_worker, time_runs, worker_main  # noqa: E402

SCHEMES = ("static", "per_frame", "per_layer")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def work_time(job: dict) -> dict:
    """p50 of one denoiser call of a .pte at ``threads`` (inputs of the program's shapes)."""
    import numpy as np

    from runtime_py.runners import load_runner

    runner = load_runner("executorch", Path(job["path"]), threads=job["threads"])
    rng = np.random.default_rng(0)
    feed = {name: (rng.random(shape) if name == "t" else rng.standard_normal(shape)).astype(dtype)
            for name, (shape, dtype) in runner.input_specs.items()}
    ms = time_runs(runner, feed, warmup=job["warmup"], runs=job["runs"])
    return {"threads_actual": runner.threads, "ms": ms, "p50_ms": statistics.median(ms), "min_ms": min(ms)}


WORKERS = {"time": work_time}


def _plan(pipeline, plan_path: Path | None) -> dict:
    from calibration.fakequant import quantizable_leaves
    from calibration.precision import LayerPrecision

    if plan_path is None:
        return {n: LayerPrecision("int8", "int8") for n in quantizable_leaves(pipeline.denoiser)}
    from calibration.plan import component_assignment

    return component_assignment(json.loads(Path(plan_path).read_text()), "denoiser", pipeline.denoiser,
                                source=str(plan_path))


def _calibration_set(pipeline, args, work: Path) -> Path:
    if args.calib is not None:
        return args.calib
    from calibration.sampling import calibrate
    from toolkit.data.synth import (  # tracks are resampled on load
        MIN_SAMPLE_RATE,
        write_synth_dataset,
    )

    data = work / "calib_tracks"
    log(f"calibration set: {args.calib_tracks} synthetic tracks (seed {args.seed}) ...")
    write_synth_dataset(data, n=args.calib_tracks, seconds=pipeline.segment_samples / pipeline.sample_rate,
                        sample_rate=max(pipeline.sample_rate, MIN_SAMPLE_RATE),
                        channels=pipeline.audio_channels,
                        seed=args.seed, progress=False)
    return calibrate(pipeline, data, strategy="activation-aware", size=args.calib_size,
                     steps=args.steps, seed=args.seed, out_dir=work / "calib", show_progress=False)


def _held_out(pipeline, args, work: Path):
    import torch

    from calibration.sampling import conditioning_latents, load_vocal_clips
    from toolkit.data.synth import (  # tracks are resampled on load
        MIN_SAMPLE_RATE,
        write_synth_dataset,
    )

    data = work / "eval_tracks"
    write_synth_dataset(data, n=args.examples, seconds=pipeline.segment_samples / pipeline.sample_rate,
                        sample_rate=max(pipeline.sample_rate, MIN_SAMPLE_RATE),
                        channels=pipeline.audio_channels,
                        seed=args.seed + 1000, progress=False)
    clips = [audio for _, audio in load_vocal_clips(pipeline, data)][: args.examples]
    cond = conditioning_latents(pipeline, clips)
    g = torch.Generator().manual_seed(args.seed + 1)
    noise_a = torch.randn((cond.shape[0], *pipeline.latent_shape), generator=g)
    noise_b = torch.randn((cond.shape[0], *pipeline.latent_shape), generator=g)
    return cond, noise_a, noise_b


def measure_quality(args, work: Path) -> dict:
    import numpy as np
    import torch

    import targets.executorch as et
    from calibration.feeds import calibration_feeds
    from runtime_py.runners import load_runner
    from runtime_py.sampler import guided, sample_ddim
    from toolkit.checkpoint import load_checkpoint
    from toolkit.components import component_specs
    from toolkit.diffusion import make_table
    from toolkit.generate import sample_latent

    pipeline = load_checkpoint(args.checkpoint)
    guidance = pipeline.config.default_guidance if args.guidance is None else args.guidance
    folded = pipeline.config.guidance_folded
    plan = _plan(pipeline, args.plan)
    calib_dir = _calibration_set(pipeline, args, work)
    feeds = calibration_feeds(pipeline, calib_dir, "denoiser")
    cond, noise_a, noise_b = _held_out(pipeline, args, work)
    log(f"fp32 reference: {cond.shape[0]} examples × 2 noises, {args.steps} steps ...")
    with torch.no_grad():
        ref_a = sample_latent(pipeline, cond, noise_a, steps=args.steps, guidance=guidance).numpy()
        ref_b = sample_latent(pipeline, cond, noise_b, steps=args.steps, guidance=guidance).numpy()
    spread = np.mean((ref_a - ref_b) ** 2, axis=(1, 2))
    table = make_table(pipeline.config.schedule, args.steps).to_dict()
    spec = component_specs(pipeline)["denoiser"]
    out = {"examples": int(cond.shape[0]), "steps": args.steps, "guidance": guidance,
           "calibration_set": str(calib_dir), "calibration_inputs": len(feeds),
           "plan_layers": len(plan), "spread_mse": spread.tolist(), "schemes": {}}
    for scheme in SCHEMES:
        et.INT8_ACTIVATIONS_ON_XNNPACK = scheme
        log(f"export denoiser, int8 {scheme} ...")
        t0 = time.perf_counter()
        art = et.export(spec, precision="fp32", plan=plan, calib=feeds, out_dir=work / scheme)
        export_s = time.perf_counter() - t0
        runner = load_runner("executorch", work / scheme / art.path)

        def run(x, t, c, runner=runner):
            feed = dict(zip(runner.input_names, (x.astype(np.float32), t.astype(np.float32),
                                                 c.astype(np.float32)), strict=True))
            return next(iter(runner.run(feed).values()))

        snr, ratio = [], []
        for i in range(cond.shape[0]):
            c = cond[i:i + 1].numpy()
            got = sample_ddim(guided(run, c, guidance, folded=folded), noise_a[i:i + 1].numpy(), table)
            err = float(np.mean((got[0] - ref_a[i]) ** 2))
            snr.append(float(10 * np.log10(np.mean(ref_a[i] ** 2) / err)))
            ratio.append(err / float(spread[i]))
        d = art.details["delegation"]
        out["schemes"][scheme] = {
            "path": str(work / scheme / art.path), "export_s": export_s,
            "file_bytes": (work / scheme / art.path).stat().st_size,
            "delegates": d["delegates"], "non_delegated_ops": d["non_delegated_ops"],
            "per_frame_layers": sorted(n for n, k in art.details["lowering"]["schemes"].items()
                                       if k in et.FRAME_KINDS),
            "latent_snr_db": snr, "latent_snr_db_mean": float(np.mean(snr)),
            "latent_snr_db_worst": float(np.min(snr)), "distance_over_spread": ratio,
            "distance_over_spread_mean": float(np.mean(ratio)),
            "distance_over_spread_worst": float(np.max(ratio))}
        log(f"  {scheme}: latent SNR mean {np.mean(snr):.1f} dB, worst {np.min(snr):.1f} dB; "
            f"distance / spread mean {np.mean(ratio):.3f}, worst {np.max(ratio):.3f}; "
            f"{d['delegates']} delegate(s), outside: {d['non_delegated_ops'] or 'none'}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(Path(argv[1]), WORKERS)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    p.add_argument("--plan", type=Path, default=None,
                   help="plan JSON (toolkit plan); default: every quantizable layer W8A8")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration set (toolkit calibrate); default: build one from synthetic vocals")
    p.add_argument("--calib-tracks", type=int, default=16, help="synthetic tracks of the built set")
    p.add_argument("--calib-size", type=int, default=64, help="intermediates of the built set")
    p.add_argument("--examples", type=int, default=8, help="held-out examples sampled per scheme")
    p.add_argument("--steps", type=int, default=16, help="DDIM steps of the compared sampling")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=False,
                   help="also time one denoiser call per scheme (needs a quiet machine)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=REPO / "out" / "int8_scheme")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8-scheme-") as tmp:
        work = Path(tmp)
        quality = measure_quality(a, work)
        speed: dict = {}
        if a.speed:
            for scheme, res in quality["schemes"].items():
                for n in sorted(set(a.threads)):
                    log(f"time {scheme} at {n} thread(s) ...")
                    speed.setdefault(scheme, {})[str(n)] = run_worker(
                        Path(__file__).resolve(), {"kind": "time", "path": res["path"], "threads": n,
                                                   "warmup": 3, "runs": a.runs},
                        work=work, timeout_s=a.timeout, threads=n)
    head = ["scheme", "per-frame layers", "latent SNR dB (mean / worst)", "distance / spread (mean / worst)", "delegates",
            "file MB", *[f"{n}t p50 ms" for n in a.threads]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scheme, res in quality["schemes"].items():
        times = [speed.get(scheme, {}).get(str(n), {}) for n in a.threads]
        lines.append("| " + " | ".join([
            scheme, str(len(res["per_frame_layers"])),
            f"{res['latent_snr_db_mean']:.1f} / {res['latent_snr_db_worst']:.1f}",
            f"{res['distance_over_spread_mean']:.3f} / {res['distance_over_spread_worst']:.3f}",
            str(res["delegates"]), f"{res['file_bytes'] / 1e6:.2f}",
            *[f"{t['p50_ms']:.2f}" if "p50_ms" in t else ("failed" if t else "—") for t in times]]) + " |")
    table = "\n".join(lines)
    notes = (f"Checkpoint {a.checkpoint or 'demo'}; denoiser plan: "
             f"{a.plan or 'every quantizable layer W8A8'} ({quality['plan_layers']} layers); calibrated on "
             f"{quality['calibration_inputs']} PTQ4ADM inputs ({quality['calibration_set'] if a.calib else 'built from synthetic vocals, activation-aware'}); "
             f"{quality['examples']} held-out synthetic examples, {quality['steps']} DDIM steps, guidance "
             f"{quality['guidance']}; final latents vs PyTorch fp32 from the same noise. Spread: MSE "
             "between two fp32 runs differing only in the noise. Whole graph in XNNPACK "
             "(targets/xnnpack_graph.py). per_layer ran per frame: "
             + (", ".join(quality["schemes"].get("per_layer", {}).get("per_frame_layers", [])) or "no layer") + ".")
    payload = {"command": command_line(__file__, argv), "quality": quality, "speed": speed,
               "table": table, "wall_s": time.time() - t_start}
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(table)
    print()
    print(notes)
    if a.record:
        append_section("int8 activation scheme on ExecuTorch: static per tensor, per latent frame, per layer",
                       command=command_line(__file__, argv), wall_s=time.time() - t_start,
                       notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
