"""A whole song end to end: encode the vocals, N denoiser calls, decode; every runtime, 1 and 2 threads.

What a user waits for. The ``paper`` SoftAlign denoiser (random seeded weights: latency does not
depend on trained values) with guidance folded (one batch-1 call per step), ``--steps`` DDIM
steps, over the Oobleck VAE of ``--vae`` (``sao``: Stable Audio Open's, 156 M parameters, 44.1 kHz
stereo, 2048× downsampling). The song is the denoiser's latent length: 1024 frames × 2048 =
2 097 152 samples = 47.55 s at SAO's rate. Stages, timed separately:

* encode: the vocals (random audio, 0.1·N(0, 1)) → the conditioning latent (VAE encoder mean);
* denoise: ``--steps`` denoiser calls from Gaussian noise (runtime_py.sampler's numpy DDIM loop,
  the device's own);
* decode: the final latent → audio (VAE decoder).

The VAE runs in overlapping chunks (``--chunk-frames`` latent frames per call plus
``--overlap-frames`` on each side, zero-padded at the song's ends, the centre kept): a phone runs a
static-shape program over a long song this way, and the SAO decoder over 47.5 s at once needs
gigabytes of activations. ``--chunk-frames 0`` runs it unchunked. The seam error of chunking is
measured against the unchunked eager fp32 encode and decode (SNR, dB) with ``--seam``.

Rows: eager PyTorch fp32, ExecuTorch fp32 and int8, ONNX Runtime fp32 and int8 (int8 = every
Conv / ConvTranspose / Linear W8A8, per-channel weights; ExecuTorch's activations per
``--int8-scheme`` in the denoiser (default: the target's, per frame) and
``--vae-int8-scheme`` in the VAE (default static, what the per-layer measurement chooses for 28
of the demo's trained decoder's 30 layers); scales calibrated on ``--calib-n`` random inputs of the
deployed shapes). Each
export and each timed song runs in its own subprocess with a timeout. Per row and thread count:
seconds per stage (best of ``--runs`` songs after one warm-up call per component), total, × real
time (song seconds / total), the process's peak RSS, and the three files' sizes. Floors: MACs per
stage (toolkit.macs) / XNNPACK's peak GEMM rate at that precision and thread count
(benchmarks/xnnpack_peak.py). When ExecuTorch int8 misses 4× real time at the largest thread
count, the ETDump profile of each of its components says where the time goes.

    python benchmarks/song_latency.py --config paper --vae sao --threads 1 2
    python benchmarks/song_latency.py --config tiny --vae tiny --chunk-frames 4 --overlap-frames 2 --no-record
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line
from benchmarks.xnnpack_peak import measure_peaks, peak_gmacs, run_worker, worker_main

STAGES = ("encode", "denoise", "decode")
COMPONENTS = ("vae_encoder", "denoiser", "vae_decoder")
VARIANTS = (("eager", "fp32"), ("executorch", "fp32"), ("executorch", "int8"), ("onnx", "fp32"),
            ("onnx", "int8"))
# The goal for ExecuTorch int8 at 2 threads: at least this many seconds of audio per second.
GOAL_X_REALTIME = 4.0
TOP_OPS = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The song's geometry and its components (built inside the workers from presets and a seed)
# ---------------------------------------------------------------------------------------------


def geometry(config: str, vae: str, chunk_frames: int, overlap_frames: int) -> dict:
    from toolkit.models.oobleck import OOBLECK_PRESETS
    from toolkit.models.softalign import SOFTALIGN_PRESETS

    den, v = SOFTALIGN_PRESETS[config], OOBLECK_PRESETS[vae]
    if den.latent_channels != v.latent_dim:
        raise ValueError(f"denoiser {config!r} takes {den.latent_channels}-channel latents, VAE {vae!r} "
                         f"makes {v.latent_dim}")
    frames = den.latent_length
    chunk = chunk_frames or frames
    if frames % chunk:
        raise ValueError(f"--chunk-frames {chunk} must divide the song's {frames} latent frames")
    window = chunk + 2 * overlap_frames if chunk_frames else frames
    return {"frames": frames, "latent_channels": den.latent_channels, "chunk": chunk,
            "overlap": overlap_frames if chunk_frames else 0, "window": window,
            "chunks": frames // chunk, "hop": v.downsampling, "audio_channels": v.audio_channels,
            "sample_rate": v.sample_rate, "samples": frames * v.downsampling,
            "seconds": frames * v.downsampling / v.sample_rate}


def build_specs(job: dict) -> dict:
    """The three ComponentSpecs at the deployed shapes: VAE calls take one chunk window."""
    import torch
    from torch import nn

    from toolkit.components import ComponentSpec, VAEDecoderExport, VAEEncoderExport
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE, fold_for_export
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    geo = job["geometry"]
    torch.manual_seed(job["seed"])  # a worker process of its own: the global RNG is ours
    g = torch.Generator().manual_seed(job["seed"])
    wanted = set(job.get("components", COMPONENTS))
    specs = {}
    if "denoiser" in wanted:
        d, length = geo["latent_channels"], geo["frames"]
        specs["denoiser"] = ComponentSpec(
            "denoiser", SoftAlignUNet(SOFTALIGN_PRESETS[job["config"]]).eval(),
            (torch.randn(1, d, length, generator=g), torch.rand(1, generator=g),
             torch.randn(1, d, length, generator=g)), ("x", "t", "cond"), ("v",))
    if wanted & {"vae_encoder", "vae_decoder"}:
        vae = OobleckVAE(OOBLECK_PRESETS[job["vae"]])
        if "vae_encoder" not in wanted:
            vae.encoder = nn.Module()  # do not fold (copy) what is not exported
        if "vae_decoder" not in wanted:
            vae.decoder = nn.Module()
        folded = fold_for_export(vae).eval()
        del vae
        if "vae_encoder" in wanted:
            audio = 0.1 * torch.randn(1, geo["audio_channels"], geo["window"] * geo["hop"], generator=g)
            specs["vae_encoder"] = ComponentSpec("vae_encoder", VAEEncoderExport(folded, 1.0).eval(),
                                                 (audio,), ("audio",), ("latent",))
        if "vae_decoder" in wanted:
            specs["vae_decoder"] = ComponentSpec(
                "vae_decoder", VAEDecoderExport(folded, 1.0).eval(),
                (torch.randn(1, geo["latent_channels"], geo["window"], generator=g),),
                ("latent",), ("audio",))
    return specs


def calib_feeds(spec, n: int, seed: int) -> list[tuple]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.rand(t.shape, generator=g) if name == "t" else
                  (0.1 if name == "audio" else 1.0) * torch.randn(t.shape, generator=g)
                  for name, t in zip(spec.input_names, spec.example_inputs)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Chunked VAE and the song loop (numpy in, numpy out; the same code for every runtime)
# ---------------------------------------------------------------------------------------------


def encode_chunks(run, audio, geo: dict):
    """audio (1, C, samples) → latent (1, D, frames), ``geo['chunks']`` calls of one window each."""
    import numpy as np

    hop, chunk, overlap = geo["hop"], geo["chunk"], geo["overlap"]
    padded = np.pad(audio, ((0, 0), (0, 0), (overlap * hop, overlap * hop)))
    pieces = []
    for i in range(geo["chunks"]):
        start = i * chunk * hop
        latent = run(padded[:, :, start: start + geo["window"] * hop])
        pieces.append(latent[:, :, overlap: overlap + chunk])
    return np.concatenate(pieces, axis=-1)


def decode_chunks(run, latent, geo: dict):
    """latent (1, D, frames) → audio (1, C, samples), one window per call, centres kept."""
    import numpy as np

    hop, chunk, overlap = geo["hop"], geo["chunk"], geo["overlap"]
    padded = np.pad(latent, ((0, 0), (0, 0), (overlap, overlap)))
    pieces = []
    for i in range(geo["chunks"]):
        audio = run(padded[:, :, i * chunk: i * chunk + geo["window"]])
        pieces.append(audio[:, :, overlap * hop: (overlap + chunk) * hop])
    return np.concatenate(pieces, axis=-1)


def song(runners: dict, *, vocals, noise, table: dict) -> tuple:
    """(audio, seconds per stage): encode → DDIM with folded guidance → decode."""
    from runtime_py.sampler import guided, sample_ddim

    geo = runners["geometry"]
    seconds = {}
    t0 = time.perf_counter()
    cond = encode_chunks(runners["vae_encoder"], vocals, geo)
    seconds["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latent = sample_ddim(guided(runners["denoiser"], cond, 1.0, folded=True), noise, table)
    seconds["denoise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    audio = decode_chunks(runners["vae_decoder"], latent, geo)
    seconds["decode"] = time.perf_counter() - t0
    return audio, seconds


def _table(steps: int) -> dict:
    from toolkit.diffusion import CosineSchedule, make_table
    from toolkit.models.softalign import SoftAlignConfig

    return make_table(CosineSchedule(offset=SoftAlignConfig().schedule_offset), steps).to_dict()


def _song_inputs(geo: dict, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    vocals = (0.1 * rng.standard_normal((1, geo["audio_channels"], geo["samples"]))).astype(np.float32)
    noise = rng.standard_normal((1, geo["latent_channels"], geo["frames"])).astype(np.float32)
    return vocals, noise


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def work_export(job: dict) -> dict:
    import targets.executorch
    from calibration.fakequant import quantizable_leaves
    from calibration.precision import LayerPrecision
    from targets import get_target

    spec = build_specs({**job, "components": [job["component"]]})[job["component"]]
    plan = calib = None
    if job["precision"] == "int8":
        targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK = job["int8_scheme"]
        plan = {n: LayerPrecision("int8", "int8") for n in quantizable_leaves(spec.module)}
        calib = calib_feeds(spec, job["calib_n"], job["seed"] + 1)
    t0 = time.perf_counter()
    art = get_target(job["target"]).export(spec, precision="fp32", plan=plan, calib=calib,
                                           out_dir=Path(job["out_dir"]))
    path = Path(job["out_dir"]) / art.path
    out = {"path": str(path), "export_s": time.perf_counter() - t0, "precision": art.precision,
           "file_bytes": sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))}
    lowering = art.details.get("lowering") or {}
    if "schemes" in lowering:  # which int8 layers run per frame (the rest static)
        out["per_frame_layers"] = sorted(n for n, k in lowering["schemes"].items() if k.endswith("_frame"))
        out["int8_layers"] = sum(k.startswith("int") for k in lowering["schemes"].values())
    if "delegation" in art.details:
        d = art.details["delegation"]
        out["delegation"] = {k: d[k] for k in ("delegates", "ops_delegated", "ops_total",
                                               "non_delegated_ops")}
    return out


def work_macs(job: dict) -> dict:
    """MACs of one call of each component (toolkit.macs) and the number of calls per song."""
    from toolkit.macs import count_macs, macs_by_kind, total_macs

    specs = build_specs(job)
    geo = job["geometry"]
    calls = {"vae_encoder": geo["chunks"], "denoiser": job["steps"], "vae_decoder": geo["chunks"]}
    out = {}
    for name, spec in specs.items():
        layers = count_macs(spec.module, *spec.example_inputs)
        out[name] = {"macs_per_call": total_macs(layers), "calls": calls[name],
                     "by_kind": macs_by_kind(layers), "params": sum(p.numel() for p in spec.module.parameters())}
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def work_song(job: dict) -> dict:
    """Time ``runs`` songs through one runtime at ``threads`` (after one warm-up call each)."""
    import numpy as np

    geo, runtime = job["geometry"], job["runtime"]
    runners: dict = {"geometry": geo}
    if runtime == "eager":
        import torch

        torch.set_num_threads(job["threads"])
        specs = build_specs(job)

        def torch_call(module):
            def run(*arrays):
                with torch.inference_mode():
                    return module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()
            return run

        for name, spec in specs.items():
            runners[name] = torch_call(spec.module)
        threads = torch.get_num_threads()
    else:
        from runtime_py.runners import load_runner

        loaded = {name: load_runner(runtime, Path(job["paths"][name]), threads=job["threads"])
                  for name in COMPONENTS}

        def runtime_call(runner):
            def run(*arrays):
                feed = dict(zip(runner.input_names, (np.ascontiguousarray(a) for a in arrays), strict=True))
                return next(iter(runner.run(feed).values()))
            return run

        for name, runner in loaded.items():
            runners[name] = runtime_call(runner)
        threads = loaded["denoiser"].threads
    vocals, noise = _song_inputs(geo, job["seed"])
    table = _table(job["steps"])
    # Warm-up: one call of each component (first-call allocation, weight packing).
    window = geo["window"]
    runners["vae_encoder"](vocals[:, :, : window * geo["hop"]])
    runners["denoiser"](noise, np.full((1,), 0.5, np.float32), noise)
    runners["vae_decoder"](noise[:, :, :window])
    runs = []
    audio = None
    for _ in range(job["runs"]):
        audio, seconds = song(runners, vocals=vocals, noise=noise, table=table)
        runs.append(seconds)
    best = {stage: min(r[stage] for r in runs) for stage in STAGES}
    return {"threads_actual": threads, "runs": runs, "seconds": best,
            "total_s": sum(best.values()), "peak_rss_mb": _peak_rss_mb(),
            "audio_finite": bool(np.isfinite(audio).all()), "audio_rms": float(np.sqrt(np.mean(audio ** 2)))}


def work_seam(job: dict) -> dict:
    """Chunked vs unchunked eager fp32: latent SNR of the encode, audio SNR of the decode."""
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    geo = job["geometry"]
    whole = {**geo, "chunk": geo["frames"], "overlap": 0, "window": geo["frames"], "chunks": 1}
    specs = build_specs({**job, "components": ["vae_encoder", "vae_decoder"]})

    def run(module):
        return lambda a: module(torch.from_numpy(np.ascontiguousarray(a))).numpy()

    vocals, noise = _song_inputs(geo, job["seed"])
    with torch.inference_mode():
        enc, dec = run(specs["vae_encoder"].module), run(specs["vae_decoder"].module)
        latent_chunked, latent_whole = encode_chunks(enc, vocals, geo), encode_chunks(enc, vocals, whole)
        audio_chunked, audio_whole = decode_chunks(dec, noise, geo), decode_chunks(dec, noise, whole)

    def snr(ref, got):
        ref = ref.astype(np.float64)
        err = np.sum((ref - got) ** 2)
        return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref ** 2) / err))

    return {"encode_latent_snr_db": snr(latent_whole, latent_chunked),
            "decode_audio_snr_db": snr(audio_whole, audio_chunked),
            "decode_max_abs": float(np.abs(audio_whole - audio_chunked).max())}


def work_profile(job: dict) -> dict:
    """ETDump of one program: per-operator p50 time per call."""
    import numpy as np

    from benchmarks.quantized_latency import etdump_profile

    spec = build_specs({**job, "components": [job["component"]]})[job["component"]]
    inputs = [t.numpy() if hasattr(t, "numpy") else np.asarray(t) for t in spec.example_inputs]
    return etdump_profile(job["path"], inputs, threads=job["threads"], warmup=1, runs=job["runs"],
                          top=TOP_OPS)


WORKERS = {"export": work_export, "macs": work_macs, "song": work_song, "seam": work_seam,
           "profile": work_profile}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _fmt_s(s: float | None) -> str:
    return "—" if s is None else f"{s:.2f}" if s >= 0.1 else f"{s * 1e3:.1f} ms"


# The XNNPACK peaks (benchmarks/xnnpack_peak.py) whose kernels an ExecuTorch int8 scheme runs; a
# floor divides by the best of them (per_layer mixes static and per-frame layers).
PEAKS_OF_SCHEME = {"static": ("int8-static",), "per_frame": ("int8-frame",),
                   "per_layer": ("int8-static", "int8-frame")}


def row_peaks(runtime: str, precision: str, schemes: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Per component, the peaks a row's floor may divide by."""
    if precision == "fp32":
        return {c: ("fp32",) for c in COMPONENTS}
    if runtime == "onnx":  # static QDQ
        return {c: ("int8-static",) for c in COMPONENTS}
    return {c: PEAKS_OF_SCHEME[schemes[c]] for c in COMPONENTS}


def floors(macs: dict, peaks: dict, peak_names: dict[str, tuple[str, ...]], threads: int) -> dict | None:
    if not macs or "error" in macs:
        return None
    stage_of = {"vae_encoder": "encode", "denoiser": "denoise", "vae_decoder": "decode"}
    out = {}
    for c, m in macs.items():
        rates = [r for name in peak_names[c] if (r := peak_gmacs(peaks, name, threads))]
        if not rates:
            return None
        out[stage_of[c]] = m["macs_per_call"] * m["calls"] / (max(rates) * 1e9)
    return out


def build_table(rows: dict, exports: dict, macs: dict, peaks: dict, geo: dict, threads: list[int],
                schemes: dict[str, str], variants: list[str]) -> str:
    head = ["runtime", "precision", "threads", "encode s", "denoise s", "decode s", "total s",
            "× real time", "floor s (enc / den / dec)", "peak RSS MB", "files MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for runtime, precision in VARIANTS:
        key = f"{runtime}/{precision}"
        if key not in variants:
            continue
        sizes = [exports.get(f"{key}/{c}", {}).get("file_bytes") for c in COMPONENTS]
        files = "—" if runtime == "eager" or None in sizes else f"{sum(sizes) / 1e6:.1f}"
        for n in threads:
            res = rows.get(key, {}).get(str(n), {})
            floor = floors(macs, peaks, row_peaks(runtime, precision, schemes), n)
            floor_cell = "—" if floor is None else " / ".join(_fmt_s(floor[s]) for s in STAGES)
            if "seconds" not in res:
                cells = [runtime, precision, str(n)] + ["failed" if res else "—"] * 5 + [floor_cell, "—", files]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            sec = res["seconds"]
            cells = [runtime, precision, str(res.get("threads_actual", n)),
                     *[_fmt_s(sec[s]) for s in STAGES], _fmt_s(res["total_s"]),
                     f"{geo['seconds'] / res['total_s']:.2f}×", floor_cell, f"{res['peak_rss_mb']:.0f}", files]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(Path(argv[1]), WORKERS)
    import targets.executorch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("paper", "demo", "tiny"), default="paper",
                   help="SoftAlign denoiser preset; its latent length is the song's length")
    p.add_argument("--vae", choices=("sao", "demo", "tiny"), default="sao", help="Oobleck VAE preset")
    p.add_argument("--steps", type=int, default=8, help="denoiser calls (DDIM steps, guidance folded)")
    p.add_argument("--chunk-frames", type=int, default=128,
                   help="latent frames the VAE decodes / encodes per call (0: the whole song in one "
                        "call; a phone needs chunks)")
    p.add_argument("--overlap-frames", type=int, default=16,
                   help="latent frames of context on each side of a chunk (more: smaller seams, "
                        "more compute)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=[f"{r}/{q}" for r, q in VARIANTS],
                   choices=[f"{r}/{q}" for r, q in VARIANTS])
    p.add_argument("--int8-scheme", choices=targets.executorch.INT8_SCHEMES,
                   default=targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK,
                   help="ExecuTorch int8 activations of the denoiser: one scale per latent frame at "
                        "run time, measured per layer (static where a layer keeps the threshold, per "
                        "frame where not), or one calibrated scale per tensor (targets.executorch)")
    p.add_argument("--vae-int8-scheme", choices=targets.executorch.INT8_SCHEMES, default="static",
                   help="the same for the VAE encoder and decoder. Default static: what per_layer "
                        "chooses for 28 of the 30 layers of the demo's trained VAE decoder (its first "
                        "and last convolutions keep 37.5 and 36.8 dB alone, under the 40 dB "
                        "threshold); measuring it on the random-weight SAO VAE would cost one eager "
                        "chunk call per layer and input and say nothing about a trained one")
    p.add_argument("--runs", type=int, default=1, help="timed songs per row (best is shown)")
    p.add_argument("--calib-n", type=int, default=4, help="random calibration inputs for int8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seam", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the chunking seam error against an unchunked eager decode")
    p.add_argument("--peak-size", type=int, nargs=3, default=[1024, 2048, 2048],
                   metavar=("ROWS", "IN", "OUT"), help="the Linear of the XNNPACK peak measurement")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="ETDump the ExecuTorch int8 components: auto = when the goal is missed")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    p.add_argument("--out", type=Path, default=REPO / "out" / "song_latency")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    threads = sorted(set(a.threads))
    geo = geometry(a.config, a.vae, a.chunk_frames, a.overlap_frames)
    base = {"config": a.config, "vae": a.vae, "seed": a.seed, "geometry": geo, "steps": a.steps}
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    schemes = {"denoiser": a.int8_scheme, "vae_encoder": a.vae_int8_scheme, "vae_decoder": a.vae_int8_scheme}
    log(f"song: {geo['seconds']:.2f} s ({geo['frames']} latent frames × {geo['hop']}), VAE in "
        f"{geo['chunks']} chunk(s) of {geo['chunk']} + 2×{geo['overlap']} frames")

    with tempfile.TemporaryDirectory(prefix="song-latency-") as tmp:
        work = Path(tmp)
        script = Path(__file__).resolve()
        macs = run_worker(script, {**base, "kind": "macs"}, work=work, timeout_s=a.timeout)
        macs.pop("worker_wall_s", None)
        peaks = measure_peaks(rows=a.peak_size[0], in_features=a.peak_size[1],
                              out_features=a.peak_size[2], threads=threads,
                              precisions=["fp32", "int8-static", "int8-frame"], warmup=2, runs=5,
                              timeout_s=a.timeout, work=work / "peak")
        exports: dict[str, dict] = {}
        for key in a.variants:
            runtime, precision = key.split("/")
            if runtime == "eager":
                continue
            for component in COMPONENTS:
                log(f"export {key} {component} ...")
                res = run_worker(script, {**base, "kind": "export", "target": runtime, "precision": precision,
                                          "component": component, "int8_scheme": schemes[component],
                                          "calib_n": a.calib_n,
                                          "out_dir": str(work / "artifacts" / key.replace("/", "-"))},
                                 work=work, timeout_s=a.timeout)
                log("  " + (res["error"] if "error" in res else
                            f"{res['export_s']:.0f} s, {res['file_bytes'] / 1e6:.1f} MB"
                            + (f", {res['delegation']['delegates']} delegate(s), outside: "
                               f"{res['delegation']['non_delegated_ops'] or 'none'}"
                               if "delegation" in res else "")))
                exports[f"{key}/{component}"] = res
        rows: dict[str, dict] = {}
        for n in threads:
            for key in a.variants:
                runtime, _ = key.split("/")
                paths = {c: exports.get(f"{key}/{c}", {}).get("path") for c in COMPONENTS}
                if runtime != "eager" and None in paths.values():
                    rows.setdefault(key, {})[str(n)] = {"error": "export failed"}
                    continue
                log(f"song {key} at {n} thread(s) ...")
                res = run_worker(script, {**base, "kind": "song", "runtime": runtime, "paths": paths,
                                          "threads": n, "runs": a.runs}, work=work,
                                 timeout_s=a.timeout, threads=n)
                log("  " + (res["error"] if "error" in res else
                            f"total {res['total_s']:.2f} s ({geo['seconds'] / res['total_s']:.2f}× real time)"))
                rows.setdefault(key, {})[str(n)] = res
        seam = None
        if a.seam and geo["overlap"] + geo["chunks"] > 1:
            log("seam error: chunked vs unchunked eager fp32 VAE ...")
            seam = run_worker(script, {**base, "kind": "seam", "threads": max(threads)}, work=work,
                              timeout_s=a.timeout, threads=max(threads))
        top = max(threads)
        et8 = rows.get("executorch/int8", {}).get(str(top), {})
        missed = "total_s" not in et8 or geo["seconds"] / et8["total_s"] < GOAL_X_REALTIME
        profiles = {}
        if a.profile == "always" or (a.profile == "auto" and missed and "executorch/int8" in a.variants):
            for component in COMPONENTS:
                path = exports.get(f"executorch/int8/{component}", {}).get("path")
                if path:
                    log(f"ETDump executorch int8 {component} at {top} thread(s) ...")
                    profiles[component] = run_worker(
                        script, {**base, "kind": "profile", "component": component, "path": path,
                                 "threads": top, "runs": 3}, work=work, timeout_s=a.timeout, threads=top)

    payload = {"command": command_line(__file__, argv), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(a).items()},
               "geometry": geo, "wall_s": time.time() - t_start, "macs": macs, "peaks": peaks,
               "exports": exports, "rows": rows, "seam": seam, "profiles": profiles}
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))  # before the table: keep the figures
    table = build_table(rows, exports, macs, peaks, geo, threads, schemes, a.variants)
    notes = [f"Song: {geo['seconds']:.2f} s of {geo['audio_channels']}-channel audio at {geo['sample_rate']} Hz "
             f"({geo['frames']} latent frames); denoiser `{a.config}` (random seeded weights, guidance "
             f"folded: {a.steps} batch-1 calls); VAE `{a.vae}` in {geo['chunks']} chunk(s) of "
             f"{geo['chunk']} latent frames with {geo['overlap']} frames of overlap on each side "
             f"({geo['window']} frames per call). Best of {a.runs} song(s) per row after one warm-up "
             "call per component; each row in its own subprocess. int8: every Conv/ConvTranspose/"
             f"Linear W8A8, ExecuTorch activations {a.int8_scheme!r} in the denoiser and "
             f"{a.vae_int8_scheme!r} in the VAE (targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK), ONNX "
             f"static QDQ; scales from {a.calib_n} random inputs. Floor = MACs per stage (toolkit.macs) / "
             "XNNPACK's best GEMM rate at the row's precision (fp32; int8: the best of the peaks of "
             "the kernels the component's scheme runs, int8-static and/or int8-frame) and thread count "
             "(benchmarks/xnnpack_peak.py, one exported Linear "
             f"{a.peak_size[0]}×{a.peak_size[1]}→{a.peak_size[2]}); ONNX rows share the XNNPACK floor."]
    if "error" not in macs:
        notes.append("MACs per call: " + ", ".join(
            f"{c} {m['macs_per_call'] / 1e9:.2f} G × {m['calls']} calls ({m['params'] / 1e6:.1f} M params)"
            for c, m in macs.items()))
    rates = []
    for precision in ("fp32", "int8-static", "int8-frame"):
        for n in threads:
            rate = peak_gmacs(peaks, precision, n)
            rates.append(f"{precision} {n}t {rate:.1f}" if rate else f"{precision} {n}t failed")
    notes.append("XNNPACK peak GMAC/s: " + ", ".join(rates))
    for key, res in exports.items():
        if "error" in res:
            notes.append(f"export {key} failed: {res['error']}")
        elif "delegation" in res:
            d = res["delegation"]
            notes.append(f"{key}: {d['ops_delegated']}/{d['ops_total']} ops in {d['delegates']} "
                         f"XNNPACK delegate(s), outside: {d['non_delegated_ops'] or 'none'}"
                         + (f"; {len(res['per_frame_layers'])} of {res['int8_layers']} int8 layers per frame"
                            + (f" ({', '.join(res['per_frame_layers'][:8])}"
                               + (", …" if len(res['per_frame_layers']) > 8 else "") + ")"
                               if res['per_frame_layers'] else "") if "per_frame_layers" in res else ""))
    if seam:
        notes.append("Seam error of chunking (eager fp32, vs one unchunked call): " + (
            seam["error"] if "error" in seam else
            f"encode latent SNR {seam['encode_latent_snr_db']:.1f} dB, decode audio SNR "
            f"{seam['decode_audio_snr_db']:.1f} dB (max |Δ| {seam['decode_max_abs']:.2e})"))
    if "total_s" in et8:
        x_rt = geo["seconds"] / et8["total_s"]
        notes.append(f"**ExecuTorch int8 at {top} thread(s): {x_rt:.2f}× real time "
                     f"({'meets' if x_rt >= GOAL_X_REALTIME else 'misses'} the {GOAL_X_REALTIME:.0f}× goal).**")
    for component, prof in profiles.items():
        if "error" in prof:
            notes.append(f"ETDump {component}: failed ({prof['error']})")
        else:
            top_ops = "; ".join(f"{r['op']} ({r['where']}, ×{r['count']}) {r['ms']:.1f} ms"
                                for r in prof["top"][:6])
            notes.append(f"ETDump ExecuTorch int8 {component} at {top} thread(s): "
                         f"{prof['method_execute_ms'] or 0:.1f} ms per call; top: {top_ops}")
    notes_text = "\n\n".join(notes)
    payload["table"] = table
    (a.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(table)
    print()
    print(notes_text)
    if a.record:
        append_section(f"A {geo['seconds']:.1f} s song end to end (encode, {a.steps} denoiser calls, decode)",
                       command=command_line(__file__, argv), wall_s=time.time() - t_start,
                       notes=notes_text, table=table)
    log(f"wrote {a.out / 'results.json'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
