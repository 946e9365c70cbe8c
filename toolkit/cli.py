"""The ``toolkit`` command: parse, build the config, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _models(args: argparse.Namespace) -> int:
    import torch

    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    rows = []
    with torch.device("meta"):
        for name, cfg in SOFTALIGN_PRESETS.items():
            n = sum(p.numel() for p in SoftAlignUNet(cfg).parameters())
            rows.append({"component": "denoiser", "family": "softalign", "name": name,
                         "parameters": n, "latent_shape": list(cfg.latent_shape),
                         "channels": list(cfg.channels)})
        for name, cfg in OOBLECK_PRESETS.items():
            n = sum(p.numel() for p in OobleckVAE(cfg).parameters())
            rows.append({"component": "vae", "family": "oobleck", "name": name, "parameters": n,
                         "sample_rate": cfg.sample_rate, "audio_channels": cfg.audio_channels,
                         "latent_dim": cfg.latent_dim, "downsampling": cfg.downsampling})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        extra = (f"latent {r['latent_shape'][0]}x{r['latent_shape'][1]}" if r["component"] == "denoiser"
                 else f"{r['audio_channels']}ch {r['sample_rate']} Hz, latent {r['latent_dim']}, "
                      f"{r['downsampling']}x down")
        print(f"{r['component']:9s} {r['family']:9s} {r['name']:6s} {r['parameters'] / 1e6:8.3f} M  {extra}")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from toolkit.data.synth import write_synth_dataset

    paths = write_synth_dataset(Path(args.out), n=args.n, seconds=args.seconds,
                                sample_rate=args.sample_rate, channels=args.channels, seed=args.seed)
    print(f"wrote {len(paths)} tracks to {args.out}")
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from toolkit.training import VAETrainArgs, train_vae

    t0 = time.time()
    out = train_vae(Path(args.data), Path(args.out), VAETrainArgs(
        preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        segment_samples=args.segment_samples, lr=args.lr, kl_weight=args.kl_weight,
        waveform_weight=args.waveform_weight, waveform_lowpass_hz=args.waveform_lowpass_hz,
        waveform_highpass_hz=args.waveform_highpass_hz, vocal_waveform_weight=args.vocal_waveform_weight,
        seed=args.seed))
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


def _train(args: argparse.Namespace) -> int:
    from toolkit.training import DenoiserTrainArgs, train_denoiser

    t0 = time.time()
    out = train_denoiser(Path(args.data), Path(args.vae), Path(args.out), DenoiserTrainArgs(
        preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weighting=args.weighting, seed=args.seed, default_steps=args.default_steps,
        default_guidance=args.default_guidance), name=args.name,
        provenance={"command": "toolkit " + " ".join(sys.argv[1:])})
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from toolkit.checkpoint import load_checkpoint
    from toolkit.data.stems import read_audio
    from toolkit.generate import generate_accompaniment
    from toolkit.models.litefocus import LiteFocusConfig

    # Arguments and paths first: nothing is computed for a run that cannot be written.
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps} (omit it for the checkpoint's default)")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1: no guidance), got {args.guidance}")
    if not Path(args.vocals).is_file():
        raise ValueError(f"--vocals {args.vocals}: no such file")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the WAV file to write")
    if out.suffix.lower() != ".wav":
        raise ValueError(f"--out {out}: generate writes WAV; name the file .wav")
    pipe = load_checkpoint(args.checkpoint)
    in_info = sf.info(str(args.vocals))
    vocals = read_audio(Path(args.vocals), sample_rate=pipe.sample_rate, channels=pipe.audio_channels)
    if in_info.channels != pipe.audio_channels:
        print(f"note: the vocal has {in_info.channels} channels; the model takes {pipe.audio_channels} "
              f"({'mixed down' if in_info.channels > pipe.audio_channels else 'duplicated'})", file=sys.stderr)
    if in_info.samplerate != pipe.sample_rate:
        print(f"note: the model runs at {pipe.sample_rate} Hz: the vocal is resampled to it and the "
              f"accompaniment, written at the vocal's {in_info.samplerate} Hz, holds nothing above "
              f"{pipe.sample_rate // 2} Hz", file=sys.stderr)
    steps = args.steps or pipe.config.default_steps
    guidance = pipe.config.default_guidance if args.guidance is None else args.guidance
    print(f"checkpoint {pipe.path} ({pipe.config.name}): {steps} steps, guidance {guidance}"
          + (", folded into the denoiser (one call per step)" if pipe.config.guidance_folded else ""),
          file=sys.stderr)
    litefocus = None
    if args.attention == "litefocus":
        litefocus = LiteFocusConfig(ratio=0.1 if args.compensation is None else args.compensation,
                                    band=args.focus_band, lags=tuple(args.focus_lags), seed=args.seed)
    elif args.compensation is not None or args.focus_band is not None or args.focus_lags:
        raise ValueError("--compensation, --focus-band and --focus-lags apply to --attention litefocus")
    t0 = time.time()
    stats: dict = {}
    acc = generate_accompaniment(pipe, vocals, steps=steps, guidance=guidance, seed=args.seed, mode=args.mode,
                                 litefocus=litefocus, max_frames=args.max_frames, stats=stats,
                                 progress=True)
    rate = sf.info(str(args.vocals)).samplerate
    if rate != pipe.sample_rate:  # hand back audio at the vocal's rate, sample for sample as long
        from fractions import Fraction

        from scipy.signal import resample_poly

        ratio = Fraction(rate, pipe.sample_rate)
        acc = resample_poly(acc, ratio.numerator, ratio.denominator, axis=-1)
        n = sf.info(str(args.vocals)).frames
        acc = np.pad(acc, ((0, 0), (0, max(0, n - acc.shape[-1]))))[:, :n].astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.wav")
    try:
        sf.write(tmp, acc.T, rate)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({acc.shape[-1] / rate:.2f} s, {steps} steps, guidance "
          f"{guidance}) in {time.time() - t0:.1f} s")
    att = stats["attention_scores_mib"]
    print(f"mode {stats['mode']}: {stats['latent_frames']} latent frames (trained at {stats['training_frames']}), "
          f"denoiser calls of {stats['denoiser_call_frames']} frames with {stats['attention']} attention; "
          f"peak RSS {stats['peak_rss_mib']:.0f} MiB, largest attention scores {att['global_attention']:.1f} MiB "
          f"global, {att['cross_attention']:.1f} MiB cross")
    return 0


def _attention_maps(args: argparse.Namespace) -> int:
    from toolkit.attention_maps import attention_maps
    from toolkit.checkpoint import load_checkpoint

    pipe = load_checkpoint(args.checkpoint)
    report = attention_maps(pipe, Path(args.data), Path(args.out), timesteps=tuple(args.timesteps),
                            frames=args.frames, max_tracks=args.max_tracks, seed=args.seed)
    for name, per_t in report["maps"].items():
        for t, a in per_t.items():
            bands = ", ".join(f"±{w}: {m:.2f} ({a['uniform_band_mass'][w]:.2f})" for w, m in a["band_mass"].items())
            lags = ", ".join(f"{lag['offset']} (x{lag['lift']:.1f})" for lag in a["lags"][:3])
            print(f"{name:12s} t={t}: N={a['n']}, mass within band (uniform): {bands}; 80 % within "
                  f"±{a['band_for_80pct']}; strongest lags beyond it: {lags}")
    print(f"suggested LiteFocus structured set (global attention): {report['suggested_litefocus']}")
    print(f"wrote {args.out}/report.json, maps.npz, " + ", ".join(Path(p).name for p in report["plots"]))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from toolkit.atomic import write_text_atomically
    from toolkit.checkpoint import load_checkpoint
    from toolkit.evaluate import musical_agreement
    from toolkit.models.softalign import SoftAlignUNet

    pipe = load_checkpoint(args.checkpoint)
    if args.plan:
        if args.random_denoiser:
            raise ValueError("--plan and --random-denoiser measure different things; pass one")
        from calibration.evaluate_plan import _evaluate_plan_command

        result = _evaluate_plan_command(args, pipe)
        if args.out:
            write_text_atomically(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "per_track"}, indent=2))
        return 0
    if args.random_denoiser:
        torch.manual_seed(args.seed)
        pipe = dataclasses.replace(pipe, denoiser=SoftAlignUNet(pipe.denoiser.config).eval())
    steps = args.steps or pipe.config.default_steps
    guidance = pipe.config.default_guidance if args.guidance is None else args.guidance
    result = musical_agreement(pipe, Path(args.data), steps=steps, guidance=guidance, seed=args.seed,
                               max_tracks=args.max_tracks)
    result["denoiser"] = "random weights" if args.random_denoiser else "trained"
    if args.out:
        write_text_atomically(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_track"}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from targets import target_names
    from toolkit.bundle import export_bundle, export_summary
    from toolkit.checkpoint import load_checkpoint
    from toolkit.generate import latent_frames_for
    from toolkit.models.litefocus import LiteFocusConfig

    targets = target_names() if "all" in args.target else tuple(dict.fromkeys(args.target))
    if args.frames is not None and args.seconds is not None:
        raise ValueError("--frames and --seconds both set the bundle's length; give one")
    if args.seconds is not None and args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    litefocus = None
    if args.attention == "litefocus":
        litefocus = LiteFocusConfig(ratio=0.1 if args.compensation is None else args.compensation,
                                    band=args.focus_band, seed=args.compensation_seed)
    elif args.compensation is not None or args.focus_band is not None or args.compensation_seed != 0:
        raise ValueError("--compensation, --focus-band and --compensation-seed apply to --attention litefocus")
    plan = json.loads(Path(args.plan).read_text()) if args.plan else None
    budget = json.loads(args.quality_budget) if args.quality_budget else None
    pipe = load_checkpoint(args.checkpoint)
    frames = args.frames
    if args.seconds is not None:
        frames = latent_frames_for(pipe, round(args.seconds * pipe.sample_rate))
    for target in targets:
        t0 = time.time()
        path = export_bundle(pipe, target=target, out_root=Path(args.out), precision=args.precision,
                             steps=args.steps, guidance=args.guidance, plan=plan,
                             calib=Path(args.calib) if args.calib else None, quality_budget=budget,
                             force=args.force, progress=True, frames=frames, litefocus=litefocus)
        manifest = json.loads((path / "manifest.json").read_text())
        print(f"{path}  ({time.time() - t0:.0f} s)")
        for line in export_summary(manifest):
            print(f"  {line}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from toolkit.report import load_reports, write_matrix
    from toolkit.report_html import listening_from_run, write_report_html

    paths = [Path(p) for p in args.reports]
    load_reports(paths)  # every file is checked (and a bad one named) before anything is written
    out = Path(args.out)
    listening = agreement = None
    if args.run:
        listening, agreement = listening_from_run(Path(args.run))
    written = write_matrix(paths, out)
    written["report.html"] = write_report_html(
        paths, out / "report.html", listening=listening, agreement=agreement,
        bundle_search=[Path(b) for b in args.bundles] + ([Path(args.run) / "bundles"] if args.run else []))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from toolkit.checkpoint import load_checkpoint
    from targets import target_names
    from toolkit.matrix import run_matrix

    pipe = load_checkpoint(args.checkpoint)
    targets = target_names() if "all" in args.target else tuple(dict.fromkeys(args.target))
    result = run_matrix(pipe, Path(args.out), targets=targets, steps=args.steps, runs=args.runs,
                        log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    failed = [t for t, r in result["reports"].items() if r["status"] == "fail"]
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from toolkit.pipeline_run import run_main_job

    targets = None if not args.target or "all" in args.target else tuple(dict.fromkeys(args.target))
    summary = run_main_job(Path(args.out), checkpoint=args.checkpoint, steps=args.steps, seed=args.seed,
                           targets=targets, runs=args.runs, force=args.force,
                           cache=Path(args.cache) if args.cache else None, quantize=args.quantize,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"\n{summary['checkpoint_description']}, {summary['steps']} steps: "
          f"{summary['audio_s']:.2f} s of audio generated in {summary['generate_s']:.1f} s at full precision")
    for name, r in summary["reports"].items():
        print(f"  {name:38s} {r['status']:11s} {r['reason'] or ''}")
    print(f"report:  {summary['report_html']}\nsummary: {Path(args.out) / 'summary.json'}  "
          f"(total {summary['total_s']:.0f} s)")
    return 1 if any(r["status"] == "fail" for r in summary["reports"].values()) else 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except where the help already names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.required):
            return text
        return super()._get_help_string(action)


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if action.help is None and action.default is not None and action.default is not False:
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_defaults(sub)


def build_parser() -> argparse.ArgumentParser:
    from targets import target_names

    p = argparse.ArgumentParser(prog="toolkit", description=(
        "adm-edge: take an audio latent diffusion model from the GPU cluster to a device."))
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    targets = [*target_names(), "all"]

    s = sub.add_parser("run", help="the main job: reference generation, calibration, sensitivity, plan, fp32 and "
                       "quantized bundles for every target, verification, report.html")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: the embedded demo, the distilled 8-step student)")
    s.add_argument("--out", default="runs/demo", help="output directory (refused when it exists, unless --force)")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the checkpoint's; fewer: faster, rougher)")
    s.add_argument("--target", action="append", default=None, choices=targets,
                   help="repeatable (default: every target)")
    s.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate, plan and export quantized bundles too (--no-quantize: fp32 only, faster)")
    s.add_argument("--cache", default=None,
                   help="folder for the calibration set and sensitivity table, reused when their inputs match "
                        "(default: .cache beside --out)")
    s.add_argument("--runs", type=int, default=3, help="timed runs per latency figure")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_run)

    s = sub.add_parser("models", help="list the built-in model configs")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_models)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_verb", required=True)
    s = data.add_parser("synth", help="write synthetic vocal/accompaniment pairs with labels")
    s.add_argument("--out", required=True, help="new stems folder to write")
    s.add_argument("--n", type=int, default=16, help="number of tracks")
    s.add_argument("--seconds", type=float, default=4.096, help="track length in seconds")
    s.add_argument("--sample-rate", type=int, default=16000)
    s.add_argument("--channels", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_data_synth)

    s = sub.add_parser("train-vae", help="train a small Oobleck VAE on a stems folder (resumable)")
    s.add_argument("--data", required=True, help="stems folder")
    s.add_argument("--out", required=True, help="VAE component directory to write")
    s.add_argument("--preset", default="demo", help="Oobleck preset (toolkit models)")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--segment-samples", type=int, default=2048, help="crop length per example")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--kl-weight", type=float, default=1e-4,
                   help="higher: smoother latents, blurrier reconstructions")
    s.add_argument("--waveform-weight", type=float, default=50.0,
                   help="weight of the waveform L1 next to the STFT loss (low: pitch and chords are lost)")
    s.add_argument("--waveform-lowpass-hz", type=float, default=0.0,
                   help="apply the waveform L1 below this frequency only (0: full band)")
    s.add_argument("--waveform-highpass-hz", type=float, default=0.0,
                   help="apply the waveform L1 above this frequency only (0: no lower edge)")
    s.add_argument("--vocal-waveform-weight", type=float, default=None,
                   help="waveform L1 weight on vocal crops (default: --waveform-weight); the vocal is "
                        "only encoded, so 0 lets its latent drop the phase and keep the note onsets")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_train_vae)

    s = sub.add_parser("train", help="train a SoftAlign denoiser on VAE latents (resumable)")
    s.add_argument("--data", required=True, help="stems folder")
    s.add_argument("--vae", required=True, help="VAE component directory (from train-vae)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--name", default="demo", help="model name recorded in pipeline.json")
    s.add_argument("--preset", default="demo", help="SoftAlign preset (toolkit models)")
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=3.5e-4)
    s.add_argument("--weighting", choices=["mse", "snr"], default="mse",
                   help="mse: seed 000 eq. 5; snr: eq. 6 (unbounded weight near t=0)")
    s.add_argument("--default-steps", type=int, default=50)
    s.add_argument("--default-guidance", type=float, default=3.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_train)

    s = sub.add_parser("generate", help="full-precision reference inference: vocals in, accompaniment out")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--vocals", required=True, help="vocal WAV (resampled to the model's rate)")
    s.add_argument("--out", required=True, help="accompaniment WAV to write")
    s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mode", choices=["onepass", "windows", "segments"], default="onepass",
                   help="onepass: the whole vocal as one latent (one song, one tempo and key; memory grows "
                        "with length); windows: overlapping training-length windows averaged at every step "
                        "(MultiDiffusion; bounded memory, slower); segments: independent training-length "
                        "segments (the old baseline: seams can change tempo and key)")
    s.add_argument("--max-frames", type=int, default=8192,
                   help="onepass refuses latents longer than this many frames (8192: 262 s on the demo, "
                        "6.3 min on the paper config); raise it if memory allows")
    s.add_argument("--attention", choices=["dense", "litefocus"], default="dense",
                   help="global self-attention beyond the training length: dense, or LiteFocus (seed 002: "
                        "a band around each frame plus shared random keys; cheaper, not retrained for)")
    s.add_argument("--compensation", type=float, default=None,
                   help="LiteFocus r (default 0.1, the paper's): share of all keys every query also sees "
                        "(eq. 6; higher: closer to dense, slower)")
    s.add_argument("--focus-band", type=int, default=None,
                   help="LiteFocus band half-width in bottleneck frames (default: half the training length "
                        "there; toolkit attention-maps suggests one)")
    s.add_argument("--focus-lags", type=int, nargs="*", default=[],
                   help="LiteFocus periodic lags in bottleneck frames (e.g. a bar), each above the band")
    s.set_defaults(func=_generate)

    s = sub.add_parser("attention-maps", help="record the denoiser's global and cross attention on real pairs "
                       "at several timesteps, plot it, and report where the mass lies (LiteFocus's evidence)")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--data", required=True, help="stems folder of (vocal, accompaniment) pairs")
    s.add_argument("--out", required=True, help="directory for report.json, maps.npz and the plots")
    s.add_argument("--frames", type=int, default=None,
                   help="latent frames per example (default: the training length; longer shows how "
                        "attention behaves beyond it)")
    s.add_argument("--timesteps", type=float, nargs="+", default=[0.9, 0.6, 0.3, 0.1])
    s.add_argument("--max-tracks", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_attention_maps)

    from targets import EXPORT_PRECISIONS, target_names

    targets = [*target_names(), "all"]
    s = sub.add_parser("export", help="compile every component to a target as a self-describing bundle")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--target", action="append", required=True, choices=targets,
                   help="repeatable; 'all' for every target")
    s.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                   help="fp16: half the bytes, looser parity floor")
    s.add_argument("--plan", default=None, help="per-layer precision plan JSON (toolkit plan); the bundle is named for what the target applied")
    s.add_argument("--calib", default=None, help="calibration set directory (toolkit calibrate); needed when the plan quantizes activations")
    s.add_argument("--steps", type=int, default=None, help="sampler steps baked into the manifest")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale baked into the manifest")
    s.add_argument("--quality-budget", default=None,
                   help='JSON overriding the budget, e.g. \'{"latent_snr_db_min": 30}\'')
    s.add_argument("--force", action="store_true", help="keep a bundle whose parity check fails")
    s.add_argument("--out", default="bundles", help="directory for the bundles")
    s.add_argument("--frames", type=int, default=None,
                   help="latent frames the bundle runs at, the whole latent in one pass (default: the training "
                        "length; a multiple of the denoiser's downsampling; longer costs memory and time)")
    s.add_argument("--seconds", type=float, default=None,
                   help="like --frames, as seconds of audio (rounded up to whole frames)")
    s.add_argument("--attention", choices=["dense", "litefocus"], default="dense",
                   help="global self-attention beyond the training length: dense, or LiteFocus (its compensation "
                        "indices become a denoiser input the device draws per call; executorch and onnx only)")
    s.add_argument("--compensation", type=float, default=None,
                   help="LiteFocus r (default 0.1): share of all keys every query also sees")
    s.add_argument("--focus-band", type=int, default=None,
                   help="LiteFocus band half-width in bottleneck frames (default: half the training length there)")
    s.add_argument("--compensation-seed", type=int, default=0,
                   help="seed of the per-call compensation draw, recorded in the manifest")
    s.set_defaults(func=_export)

    s = sub.add_parser("report", help="merge device reports into report.html and a device matrix (md, png)")
    s.add_argument("reports", nargs="+", help="report JSON files from runtime_py verify (any number of devices)")
    s.add_argument("--out", required=True, help="output directory: report.html, matrix.md, matrix.html, PNG plots")
    s.add_argument("--run", default=None,
                   help="a toolkit run output folder: its listening clips and musical agreement go into the page")
    s.add_argument("--bundle-dir", dest="bundles", action="append", default=[],
                   help="repeatable: folders holding the reports' bundles (sizes and lowering summaries; "
                        "default: the path each report names)")
    s.set_defaults(func=_report)

    s = sub.add_parser("matrix", help="CI leg: export to every target, verify here, write the matrix")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--target", action="append", default=["all"], choices=targets)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--runs", type=int, default=3, help="timed runs per measurement")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_matrix)

    s = sub.add_parser("evaluate", help="musical agreement with the true chords of labelled pairs; with "
                       "--plan, the plan's simulated quality loss and size against full precision")
    s.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: demo)")
    s.add_argument("--data", required=True, help="labelled stems folder (toolkit data synth)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--max-tracks", type=int, default=None)
    s.add_argument("--random-denoiser", action="store_true",
                   help="baseline: same architecture and VAE, denoiser with random weights")
    s.add_argument("--plan", default=None,
                   help="plan JSON (toolkit plan): evaluate its fake quantization against full precision")
    s.add_argument("--calib", default=None,
                   help="with --plan: calibration set for activation ranges (toolkit calibrate)")
    s.add_argument("--out", default=None, help="write the full result (per track) as JSON")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_evaluate)

    # Verbs owned by other packages register themselves (their heavy imports stay lazy).
    from calibration.plan import add_plan_parser
    from calibration.sampling import add_calibrate_parser
    from calibration.sensitivity import add_sensitivity_parser

    add_calibrate_parser(sub)
    add_sensitivity_parser(sub)
    add_plan_parser(sub)
    from toolkit.distill import add_distill_parser

    add_distill_parser(sub)
    _with_defaults(p)
    return p


def quiet_third_party() -> None:
    """Keep the libraries' import-time chatter off the user's terminal (set by the CLI only, never at
    import: STYLE.md rule 9). torchao logs "Failed to load ..._C.so" on every import where its
    optional C++ kernels do not match this torch, coremltools warns about the untested torch
    version, and PyTorch's exporters emit FutureWarning/DeprecationWarning per call; none of it is
    actionable for a user of the toolkit. Errors still reach the terminal."""
    import logging
    import warnings

    for name in ("torchao", "coremltools", "torch.onnx", "torch._export", "torch.export", "executorch",
                 "onnxruntime", "torch.utils._pytree", "root"):
        logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import targets.coreml

    targets.coreml.CONVERTER_PROGRESS = False  # the export's own bar counts stages; ct.convert's bars interleave


# Lines that native libraries write straight to file descriptor 2, where no Python filter reaches:
# ExecuTorch's threadpool probes ARM-only /sys files on every process's first program load (five
# lines that say nothing about an x86 host).
NATIVE_CHATTER = (b"[cpuinfo_utils.cpp:",)


def _filter_native_stderr(prefixes: tuple[bytes, ...]) -> None:
    """Route fd 2 through a pipe and drop whole lines that start with one of ``prefixes``; every
    other byte (progress bars' carriage returns included) is forwarded as soon as it arrives."""
    import atexit
    import os
    import threading

    try:
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return  # no usable fd 2 (a daemon, a closed stream): nothing to filter

    def forward() -> None:
        held = b""
        while chunk := os.read(read_end, 65536):
            held += chunk
            out = []
            while True:
                line, nl, rest = held.partition(b"\n")
                if not nl:
                    break
                if not line.startswith(prefixes):
                    out.append(line + nl)
                held = rest
            if held and not any(p.startswith(held[:len(p)]) for p in prefixes):
                out.append(held)  # a partial line that cannot become chatter: a bar's update
                held = b""
            if out:
                os.write(real, b"".join(out))
        if held:
            os.write(real, held)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the reader drains and stops
        thread.join(timeout=2)

    atexit.register(restore)


def main(argv: list[str] | None = None) -> int:
    from toolkit.checkpoint_errors import CheckpointError
    from toolkit.config import ConfigError
    from toolkit.export_errors import ParityError, QualityBudgetError

    args = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        return args.func(args)
    except BrokenPipeError:  # `toolkit models --json | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, ConfigError, FileExistsError, ValueError, NotImplementedError, ParityError,
            QualityBudgetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The ``toolkit`` command: :func:`main` with native libraries' fd-level chatter filtered (a
    process-wide change of fd 2, so it is made here, not in :func:`main`, which tests call in-process)."""
    _filter_native_stderr(NATIVE_CHATTER)
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
