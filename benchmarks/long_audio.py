"""Cost of one denoiser call vs latent length: dense global attention vs LiteFocus (seed 002), eager.

One call of the SoftAlign denoiser (``--config``, default ``paper``: 15.4 M parameters, trained at
64×1024, random seeded weights — cost does not depend on trained values) with both CFG branches,
x (2, D, L), at L = ``--multiples`` × the training length, with the global attention dense or
LiteFocus (band: the default, half the training bottleneck; r = ``--compensation``). LiteFocus
only changes the global self-attention at the bottleneck; the cross-attention stays dense in both.

Per row: median and min wall time of ``--runs`` calls after a warm-up; the share of that time spent
inside the soft-alignment attention module (local + global branches, projections) and inside the
cross-attention modules (forward hooks); the FLOPs of the call (matmuls and convolutions,
``FlopCounterMode``) and the attention modules' share of them; the process's peak RSS and its rise
during the calls over what was resident before the first (each row is its own subprocess); and the
largest attention-score tensors (``toolkit.generate.attention_bytes``).

``--runtimes executorch`` exports each row's call (the compensation indices an input) with
``targets.executorch``'s graph passes and the XNNPACK partitioner, checks it against eager with
indices it was not exported with, and times the program (the row's RSS then includes the export).

    OMP_NUM_THREADS=2 python benchmarks/long_audio.py --config paper --multiples 1 2 4 8 16 --runs 5

``--quality``: the demo checkpoint (``--checkpoint``) on synthetic labelled pairs as long as
``--multiples`` × its training length (written by ``toolkit.data.synth`` with ``--data-seed``, 16 kHz,
resampled to the model's rate), generated four ways — segments, windows, one pass dense, one pass
LiteFocus — and scored over the whole track: chord accuracy and cosine, key, tempo, beat alignment
(``toolkit.evaluate.score_tracks``), the onset strength within 30 ms of the would-be segment seams
over its mean elsewhere (1: the seams are not special), and the Fréchet distance of log-mel frame
statistics to the true accompaniments (``calibration.quality.log_mel_frechet``).

    python benchmarks/long_audio.py --quality --multiples 1 4 16 --max-tracks 8 --steps 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402

ATTENTIONS = ("dense", "litefocus")
CFG_BATCH = 2


def measure(job: dict) -> dict:
    """One (config, length, attention) row, in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.checkpoint import Pipeline, PipelineConfig
    from toolkit.generate import attention_bytes
    from toolkit.models.litefocus import LiteFocusConfig, compensation_indices
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, CrossAttention, SoftAlignAttention, SoftAlignUNet

    torch.set_num_threads(job["threads"])
    cfg = SOFTALIGN_PRESETS[job["config"]]
    torch.manual_seed(job["seed"])
    model = SoftAlignUNet(cfg).eval()
    frames = job["multiple"] * cfg.latent_length
    g = torch.Generator().manual_seed(job["seed"])
    x = torch.randn(CFG_BATCH, cfg.latent_channels, frames, generator=g)
    cond = torch.randn(CFG_BATCH, cfg.latent_channels, frames, generator=g)
    t = torch.full((CFG_BATCH,), 0.5)
    lf = LiteFocusConfig(ratio=job["compensation"]) if job["attention"] == "litefocus" else None
    idx = compensation_indices(frames // cfg.downsampling, job["compensation"], seed=job["seed"], call=0)
    model.prepare_length(frames)

    spent = {"soft_alignment": 0.0, "cross": 0.0}
    started = {}

    def pre(module, args):
        started[id(module)] = time.perf_counter()

    def post(kind):
        def hook(module, args, out):
            spent[kind] += time.perf_counter() - started[id(module)]
        return hook

    for m in model.modules():
        kind = ("soft_alignment" if isinstance(m, SoftAlignAttention)
                else "cross" if isinstance(m, CrossAttention) else None)
        if kind:
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post(kind))

    def call():
        return model(x, t, cond, idx, litefocus=lf)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            out = call()
        finite = bool(torch.isfinite(out).all())
        flops = counter.get_total_flops()
        by_module = counter.get_flop_counts()
        attn_flops = sum(sum(v.values()) for k, v in by_module.items() if k.endswith(".attn"))
        cross_flops = sum(sum(v.values()) for k, v in by_module.items() if k.endswith(".cross"))
        for _ in range(job["warmup"] if job["runs"] else 0):
            call()
        ms, shares = [], {"soft_alignment": [], "cross": []}
        for _ in range(job["runs"]):
            for k in spent:
                spent[k] = 0.0
            t0 = time.perf_counter()
            call()
            wall = time.perf_counter() - t0
            ms.append(1e3 * wall)
            for k in spent:
                shares[k].append(spent[k] / wall)
        if not ms:  # --runs 0: FLOPs and memory only
            ms, shares = [float("nan")], {k: [float("nan")] for k in shares}
    extra = {}
    if job.get("runtime", "eager") == "executorch":
        ms, extra = executorch_times(model, (x, t, cond, idx), lf, job)
        shares = {k: [float("nan")] for k in shares}  # no module hooks inside a compiled program
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipe = Pipeline(config=PipelineConfig(name="bench"), denoiser=model, vae=OobleckVAE(OOBLECK_PRESETS["tiny"]))
    scores = attention_bytes(pipe, frames, batch=CFG_BATCH, litefocus=lf)
    return {
        **job, "frames": frames, "bottleneck": frames // cfg.downsampling, "output_finite": finite,
        "p50_ms": statistics.median(ms), "min_ms": min(ms),
        "soft_alignment_time_share": statistics.median(shares["soft_alignment"]),
        "cross_time_share": statistics.median(shares["cross"]),
        "gflops": flops / 1e9, "soft_alignment_flop_share": attn_flops / flops, "cross_flop_share": cross_flops / flops,
        "peak_rss_mib": rss_peak, "rss_rise_mib": rss_peak - rss_before,
        "global_scores_mib": scores["global_attention"] / 2**20, "cross_scores_mib": scores["cross_attention"] / 2**20,
        **extra,
    }


def executorch_times(model, inputs, lf, job: dict) -> tuple[list[float], dict]:
    """Export the call (C an input) through targets.executorch's graph passes and XNNPACK, check it
    against eager with indices it was not exported with, and time ``job['runs']`` executions."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from targets.executorch import delegation_coverage
    from targets.xnnpack_graph import whole_graph_passes
    from toolkit.models.litefocus import compensation_indices

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, t, cond, comp_idx):
            return self.model(x, t, cond, comp_idx, litefocus=lf)

    t0 = time.perf_counter()
    passes, _ = whole_graph_passes()
    edge = to_edge_transform_and_lower(torch.export.export(Call().eval(), inputs), transform_passes=passes,
                                       partitioner=[XnnpackPartitioner()])
    coverage = delegation_coverage(edge.exported_program().graph_module)
    buffer = edge.to_executorch().buffer
    export_s = time.perf_counter() - t0
    portable_lib._unsafe_reset_threadpool(job["threads"])
    method = Runtime.get().load_program(buffer).load_method("forward")
    x, t, cond, idx = inputs
    other = compensation_indices(x.shape[-1] // model.config.downsampling, job["compensation"], seed=job["seed"],
                                 call=1)
    with torch.no_grad():
        ref = model(x, t, cond, other, litefocus=lf)
    out = method.execute([x, t, cond, other])[0]
    sqnr = float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-30)))
    for _ in range(job["warmup"]):
        method.execute([x, t, cond, idx])
    ms = []
    for _ in range(job["runs"]):
        t1 = time.perf_counter()
        method.execute([x, t, cond, idx])
        ms.append(1e3 * (time.perf_counter() - t1))
    return ms or [float("nan")], {"export_s": export_s, "sqnr_db_vs_eager": sqnr,
                                  "delegation": f"{coverage['ops_delegated']}/{coverage['ops_total']} ops, "
                                                f"{coverage['delegates']} delegates"}


SEAM_WINDOW_S = 0.03
QUALITY_METHODS = ("segments", "windows", "onepass dense", "onepass litefocus")
# The paper's ablations (its Tables 2 and 3) as one-pass LiteFocus variants: (name, ratio, structured).
ABLATIONS = (("litefocus r=0.2", 0.2, True), ("litefocus r=0.4", 0.4, True),
             ("focus only (r=0)", 0.0, True), ("compensation only r=0.1", 0.1, False))


def seam_onset_ratio(audio: np.ndarray, sample_rate: int, segment_s: float) -> float | None:
    """Mean onset strength within ±30 ms of every multiple of ``segment_s`` over its mean elsewhere."""
    from toolkit.data.music import onset_strength

    if audio.shape[-1] <= segment_s * sample_rate:
        return None
    env, fps = onset_strength(audio, sample_rate)
    times = np.arange(env.size) / fps
    seams = np.arange(segment_s, times[-1], segment_s)
    if seams.size == 0:
        return None
    near = (np.abs(times[:, None] - seams[None]) <= SEAM_WINDOW_S).any(axis=1)
    rest = env[~near].mean()
    return float(env[near].mean() / rest) if rest > 0 else None


def quality(args) -> tuple[list[dict], str]:
    import tempfile

    from calibration.quality import log_mel_frechet
    from toolkit.checkpoint import load_checkpoint
    from toolkit.data.stems import list_tracks, load_track
    from toolkit.data.synth import write_synth_dataset
    from toolkit.evaluate import score_tracks
    from toolkit.generate import generate_accompaniment
    from toolkit.models.litefocus import LiteFocusConfig

    pipe = load_checkpoint(args.checkpoint)
    segment_s = pipe.segment_samples / pipe.sample_rate
    guidance = pipe.config.default_guidance
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for multiple in args.multiples:
            data = Path(tmp) / f"x{multiple}"
            write_synth_dataset(data, n=args.max_tracks, seconds=multiple * segment_s, sample_rate=16000,
                                channels=1, seed=args.data_seed)
            tracks = [load_track(p, sample_rate=pipe.sample_rate, channels=pipe.audio_channels)
                      for p in list_tracks(data)]
            truth = [t.accompaniment for t in tracks]
            methods = [(m, m.split()[0], LiteFocusConfig(ratio=args.compensation, seed=args.seed)
                        if m.endswith("litefocus") else None) for m in QUALITY_METHODS]
            if args.ablations:
                methods = [m for m in methods if m[1] == "onepass"] + [
                    (f"onepass {name}", "onepass", LiteFocusConfig(ratio=r, structured=st, seed=args.seed))
                    for name, r, st in ABLATIONS]
            for method, mode, lf in methods:
                rendered = {}

                def render(track, mode=mode, lf=lf, rendered=rendered):
                    rendered[track.name] = generate_accompaniment(
                        pipe, track.vocals, steps=args.steps, guidance=guidance, seed=args.seed, mode=mode,
                        litefocus=lf, max_frames=1 << 20)
                    return rendered[track.name]

                t0 = time.time()
                scores = score_tracks(pipe, data, render, show_progress=False)
                seams = [seam_onset_ratio(rendered[t.name], pipe.sample_rate, segment_s) for t in tracks]
                seams = [x for x in seams if x is not None]
                rows.append({"multiple": multiple, "method": method, "tracks": len(tracks),
                             **{k: v for k, v in scores.items() if k != "per_track"},
                             "seam_onset_ratio": float(np.mean(seams)) if seams else None,
                             "log_mel_fd": log_mel_frechet([rendered[t.name] for t in tracks], truth,
                                                           pipe.sample_rate),
                             "wall_s": time.time() - t0})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| length (× training) | method | chord accuracy ↑ | chord cosine ↑ | key or relative ↑ | tempo ↑ | "
             "beat alignment ↑ | seam onsets (1: none) | log-mel FD ↓ |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['multiple']}× | {r['method']} | {f(r['chord_accuracy'])} | {f(r['chord_cosine'])} | "
                     f"{f(r['key_correct_or_relative'])} | {f(r['tempo_match'])} | {f(r['beat_alignment'])} | "
                     f"{f(r['seam_onset_ratio'])} | {r['log_mel_fd']:.2f} |")
    return rows, "\n".join(lines)


def run_worker(job: dict, timeout_s: float) -> dict:
    """``measure`` in a fresh subprocess, so that each row's peak RSS is its own."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {**job, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_table(rows: list[dict]) -> str:
    lines = ["| runtime | length (× training) | frames | attention | p50 ms | min ms | vs dense | soft-alignment "
             "attn time / FLOPs | cross-attn time / FLOPs | GFLOPs | peak RSS MiB (rise) | largest scores MiB "
             "global / cross | ExecuTorch: delegation, SQNR dB vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(r.get("runtime", "eager"), r["multiple"]): r for r in rows
             if r["attention"] == "dense" and "error" not in r}
    for r in rows:
        runtime = r.get("runtime", "eager")
        if "error" in r:
            lines.append(f"| {runtime} | {r['multiple']}× | | {r['attention']} | {r['error']} | | | | | | | | |")
            continue
        ref = dense.get((runtime, r["multiple"]))
        speed = f"{ref['p50_ms'] / r['p50_ms']:.2f}×" if ref and r["p50_ms"] == r["p50_ms"] else ""
        et = f"{r['delegation']}, {r['sqnr_db_vs_eager']:.0f}" if "delegation" in r else ""
        lines.append(
            f"| {runtime} | {r['multiple']}× | {r['frames']} | {r['attention']} | {r['p50_ms']:.1f} | "
            f"{r['min_ms']:.1f} | {speed} | {100 * r['soft_alignment_time_share']:.0f} % / "
            f"{100 * r['soft_alignment_flop_share']:.0f} % | {100 * r['cross_time_share']:.0f} % / "
            f"{100 * r['cross_flop_share']:.0f} % | {r['gflops']:.1f} | {r['peak_rss_mib']:.0f} "
            f"({r['rss_rise_mib']:.0f}) | {r['global_scores_mib']:.1f} / {r['cross_scores_mib']:.1f} | {et} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default="paper", help="SoftAlign preset")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    p.add_argument("--runtimes", nargs="+", choices=("eager", "executorch"), default=["eager"],
                   help="executorch: export each row (slow at long lengths) and time the program")
    p.add_argument("--compensation", type=float, default=0.1, help="LiteFocus r")
    p.add_argument("--runs", type=int, default=5, help="timed calls per row (0: FLOPs and memory only)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per row")
    p.add_argument("--no-record", action="store_true", help="print the table, do not append to BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--quality", action="store_true", help="quality vs length on the demo instead of cost")
    p.add_argument("--checkpoint", default=None, help="--quality: checkpoint (default: the embedded demo)")
    p.add_argument("--max-tracks", type=int, default=8, help="--quality: pairs per length")
    p.add_argument("--steps", type=int, default=32, help="--quality: DDIM steps")
    p.add_argument("--data-seed", type=int, default=1000, help="--quality: seed of the synthetic pairs")
    p.add_argument("--ablations", action="store_true",
                   help="--quality: one pass dense and LiteFocus r=--compensation, r=0.2, 0.4, focus only, "
                        "compensation only (seed 002 Tables 2 and 3) instead of the four methods")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    t0 = time.time()
    if args.quality:
        rows, table = quality(args)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        if not args.no_record:
            notes = (f"Checkpoint `{args.checkpoint or 'demo (embedded)'}`; per length {args.max_tracks} synthetic "
                     f"labelled pairs (`toolkit data synth`, seed {args.data_seed}), {args.steps} DDIM steps, the "
                     f"checkpoint's guidance, seed {args.seed}; LiteFocus r = {args.compensation}, band = half the "
                     f"training bottleneck. Seam onsets: onset strength within 30 ms of each multiple of the "
                     f"training length over elsewhere. Log-mel FD: Fréchet distance of log-mel frame statistics "
                     f"to the true accompaniments.")
            append_section("Long audio: LiteFocus ablations on the demo (seed 002 Tables 2, 3)" if args.ablations
                           else "Long audio: quality vs length on the demo (segments, windows, one pass)",
                           command=command_line(__file__, argv), wall_s=time.time() - t0, notes=notes, table=table)
        return 0
    rows = []
    for runtime in args.runtimes:
        for multiple in args.multiples:
            for attention in args.attention:
                job = {"config": args.config, "multiple": multiple, "attention": attention, "runtime": runtime,
                       "compensation": args.compensation, "runs": args.runs, "warmup": args.warmup,
                       "threads": args.threads, "seed": args.seed}
                rows.append(run_worker(job, args.timeout_s))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = build_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if not args.no_record:
        notes = (("Untimed (--runs 0): FLOPs and memory only. " if args.runs == 0 else "") +
                 f"One `{args.config}` denoiser call (random weights, CFG batch {CFG_BATCH}) per row, at multiples "
                 f"of its training length, {args.threads} threads, eager PyTorch; LiteFocus r = "
                 f"{args.compensation}, band = half the training bottleneck, on the global attention only "
                 f"(the cross-attention stays dense). Shares: time inside the modules (hooks) / their share "
                 f"of the call's matmul+conv FLOPs. Peak RSS per row's own process; rise = peak during the "
                 f"calls over the resident set before them.")
        append_section("Long audio: denoiser cost vs length, dense vs LiteFocus",
                       command=command_line(__file__, argv), wall_s=time.time() - t0, notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
