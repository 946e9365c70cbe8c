"""Per-layer sensitivity: quantize one layer at a time, sample end to end, measure the damage.

For each quantizable leaf of the denoiser (Conv1d / Linear, by FQN) and each precision, a copy of
the denoiser with only that layer fake-quantized (:mod:`calibration.fakequant`, activation ranges
from the calibration set) runs the full DDIM sampling of a fixed evaluation set: the first
``n_eval`` conditioning latents of the calibration set with their stored initial noise, at the
calibration set's steps and guidance. The loss against the full-precision outputs of the same
inputs is measured with the harness's paired metrics (``runtime_py.metrics``): latent SNR (dB,
higher is better) and log-mel L1 of the decoded audio (lower is better).

The table is a JSON file rewritten (atomically) after every layer, so an interrupted run resumes
where it stopped; a PNG bar chart is written beside it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from calibration.fakequant import activation_ranges, quantizable_leaves, quantized_copy
from calibration.precision import PRECISIONS
from calibration.sampling import load_calibration_set
from runtime_py.metrics import capped_snr_db, log_mel_l1, snr_db
from toolkit.atomic import write_text_atomically
from toolkit.checkpoint import Pipeline
from toolkit.fingerprint import module_digest, tree_digest
from toolkit.generate import decode_latent, sample_latent

FORMAT_VERSION = 1
DEFAULT_PRECISIONS = ("w8a8", "w4a8")
DEFAULT_EVAL_EXAMPLES = 4


def _write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=1) + "\n")


def layer_sizes(denoiser: torch.nn.Module) -> tuple[dict[str, dict[str, int]], int]:
    """Per quantizable leaf: weight and bias element counts; and the whole denoiser's fp32 bytes."""
    layers = {}
    for name, m in quantizable_leaves(denoiser).items():
        bias = getattr(m, "bias", None)
        layers[name] = {"weight_params": int(m.weight.numel()),
                        "bias_params": int(bias.numel()) if bias is not None else 0}
    total = sum(p.numel() for p in denoiser.parameters()) * 4
    return layers, int(total)


@torch.no_grad()
def _render(pipeline: Pipeline, denoiser, cond, noise, *, steps, guidance):
    pipe = Pipeline(config=pipeline.config, denoiser=denoiser, vae=pipeline.vae, path=pipeline.path)
    latent = sample_latent(pipe, cond, noise, steps=steps, guidance=guidance)
    return latent.numpy(), decode_latent(pipeline, latent).numpy()




def _loss(ref_latent, ref_audio, latent, audio, sample_rate) -> dict[str, float]:
    return {
        "latent_snr_db": float(np.mean([capped_snr_db(snr_db(r, t)) for r, t in zip(ref_latent, latent)])),
        "log_mel_l1": float(np.mean([log_mel_l1(r, t, sample_rate) for r, t in zip(ref_audio, audio)])),
    }


def sensitivity(
    pipeline: Pipeline,
    calib_dir: Path,
    *,
    out_path: Path,
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
    n_eval: int = DEFAULT_EVAL_EXAMPLES,
    observer: str = "minmax",
    layers: list[str] | None = None,
    resume: bool = True,
    show_progress: bool = True,
    plot: bool = True,
) -> dict:
    """The sensitivity table (see module doc); written to ``out_path`` after every layer."""
    from tqdm import tqdm

    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {sorted(PRECISIONS)}")
    calib = load_calibration_set(Path(calib_dir))
    steps, guidance = int(calib.manifest["steps"]), float(calib.manifest["guidance"])
    n_eval = min(n_eval, calib.conditioning.shape[0])
    cond, noise = calib.conditioning[:n_eval], calib.noise[:n_eval]
    sizes, fp32_bytes = layer_sizes(pipeline.denoiser)
    names = list(sizes) if layers is None else list(layers)
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise KeyError(f"not quantizable leaves of the denoiser: {unknown}")
    # Inputs by resolved path and content: a path typed another way resumes, other files do not.
    settings = {"calib": str(Path(calib_dir).resolve()), "calib_sha256": tree_digest(calib_dir),
                "strategy": calib.manifest["strategy"], "steps": steps,
                "guidance": guidance, "n_eval": n_eval, "precisions": list(precisions),
                "observer": observer, "model": pipeline.config.name,
                "denoiser_sha256": module_digest(pipeline.denoiser)}
    out_path = Path(out_path)
    table = None
    if resume and out_path.is_file():
        table = json.loads(out_path.read_text())
        if table.get("settings") != settings:
            raise ValueError(f"{out_path}: was computed with settings {table.get('settings')}, not "
                             f"{settings}; pass another --out or --no-resume to start over")
    if table is None:
        table = {"format_version": FORMAT_VERSION, "type": "sensitivity", "settings": settings,
                 "metric": {"latent_snr_db": "higher is better", "log_mel_l1": "lower is better"},
                 "fp32_bytes": fp32_bytes, "layers": {}, "complete": False}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ref_latent, ref_audio = _render(pipeline, pipeline.denoiser, cond, noise, steps=steps, guidance=guidance)
    ranges = activation_ranges(pipeline.denoiser, calib, observer=observer)
    todo = [n for n in names if n not in table["layers"]]
    t0 = time.time()
    for name in tqdm(todo, desc="sensitivity", disable=not show_progress, file=sys.stderr):
        row = {**sizes[name]}
        for p in precisions:
            q = quantized_copy(pipeline.denoiser, {name: PRECISIONS[p]}, ranges)
            latent, audio = _render(pipeline, q, cond, noise, steps=steps, guidance=guidance)
            row[p] = _loss(ref_latent, ref_audio, latent, audio, pipeline.sample_rate)
        table["layers"][name] = row
        _write_json_atomically(out_path, table)
    table["complete"] = all(n in table["layers"] for n in sizes)
    table["seconds_this_run"] = round(time.time() - t0, 2)
    _write_json_atomically(out_path, table)
    if plot:
        plot_sensitivity(table, out_path.with_suffix(".png"))
    return table


def plot_sensitivity(table: dict, png: Path) -> Path:
    """Bar chart: latent SNR (dB) per layer and precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["layers"])
    precisions = table["settings"]["precisions"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.5))
    width = 0.8 / max(len(precisions), 1)
    x = np.arange(len(names))
    for k, p in enumerate(precisions):
        vals = [min(table["layers"][n][p]["latent_snr_db"], 120.0) for n in names]
        ax.bar(x + k * width, vals, width, label=p)
    ax.set_xticks(x + width * (len(precisions) - 1) / 2)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("latent SNR vs full precision (dB, higher is better)")
    ax.set_title(f"per-layer sensitivity ({table['settings']['model']}, {table['settings']['steps']} steps)")
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def _sensitivity_command(args: argparse.Namespace) -> int:
    from toolkit.checkpoint import load_checkpoint

    manifest = json.loads((Path(args.calib) / "manifest.json").read_text())
    checkpoint = args.checkpoint if args.checkpoint is not None else manifest.get("checkpoint")
    pipe = load_checkpoint(Path(checkpoint) if checkpoint else None)
    precisions = tuple(dict.fromkeys(args.precision or DEFAULT_PRECISIONS))
    table = sensitivity(pipe, Path(args.calib), out_path=Path(args.out), precisions=precisions,
                        n_eval=args.eval_examples, observer=args.observer, resume=args.resume)
    first = precisions[0]
    worst = sorted(table["layers"].items(), key=lambda kv: kv[1][first]["latent_snr_db"])[:5]
    print(json.dumps({"out": args.out, "layers": len(table["layers"]), "complete": table["complete"],
                      f"most_sensitive_{first}": {n: r[first] for n, r in worst}},
                     indent=2))
    return 0


def add_sensitivity_parser(subparsers) -> argparse.ArgumentParser:
    """``toolkit sensitivity``: register on the CLI's sub-parsers (sets ``func``)."""
    s = subparsers.add_parser("sensitivity", help="per-layer quantization sensitivity (resumable)")
    s.add_argument("--calib", required=True, help="calibration set directory (toolkit calibrate)")
    s.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: the one the calibration set names, else demo)")
    s.add_argument("--precision", action="append", choices=sorted(PRECISIONS), default=None,
                   help=f"repeatable (default: {' '.join(DEFAULT_PRECISIONS)}); each one more sampling run per layer")
    s.add_argument("--eval-examples", type=int, default=DEFAULT_EVAL_EXAMPLES,
                   help="examples sampled per measurement (more: steadier figures, slower)")
    s.add_argument("--observer", choices=["minmax", "percentile"], default="minmax",
                   help="activation range: extremes, or 99.99th percentiles (clips outliers)")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue a table already in --out")
    s.add_argument("--out", required=True, help="sensitivity JSON (a PNG is written beside it)")
    s.set_defaults(func=_sensitivity_command)
    return s
