"""Where a SoftAlign denoiser's attention mass lies: the evidence behind LiteFocus's structured set.

Seed 002 chose its same-frequency set S_i from the model's attention maps (§3.2, Fig. 2). This does
the same for our 1-D latents: it runs the denoiser on real (vocal, accompaniment) pairs noised to
several timesteps, records the dense global self-attention (seed 000 eq. 2, with RoPE) and every
cross-attention, averages them over tracks, batch and heads, and reports, per map and timestep:

* the share of each query's mass within a band of ±w frames, against what uniform attention puts
  there (``band_mass``), and the narrowest bands holding 50 / 80 / 90 % of it;
* the offsets beyond the band that attention favours most (``lags``, with their lift: mass over the
  uniform 1/N), the 1-D counterpart of the paper's equidistant stripes;
* a suggested ``LiteFocusConfig`` band and lags.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from toolkit.checkpoint import Pipeline
from toolkit.data.stems import list_tracks, load_track
from toolkit.diffusion import alpha_sigma
from toolkit.generate import encode_audio
from toolkit.models.softalign import CrossAttention, _heads, apply_rope

DEFAULT_TIMESTEPS = (0.9, 0.6, 0.3, 0.1)
BANDS = (0, 1, 2, 4, 8, 16, 32)
MASS_LEVELS = (0.5, 0.8, 0.9)
# A lag is suggested when its mass (both signs together) is this many times the uniform share.
LAG_LIFT = 2.0


def _global_probs(attn, x: torch.Tensor) -> torch.Tensor:
    """Dense softmax(RoPE(q) RoPE(k)ᵀ / √d) of the bottleneck attention, (B, H, N, N)."""
    q, k, _ = attn.qkv(attn.norm(x)).chunk(3, dim=1)
    q, k = _heads(q, attn.n_heads), _heads(k, attn.n_heads)
    cos, sin = attn.rope(q.shape[2])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def _cross_probs(cross: CrossAttention, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    q = _heads(cross.q(cross.norm(x)), cross.n_heads)
    k, _ = cross.kv(cross.norm_cond(cond)).chunk(2, dim=1)
    k = _heads(k, cross.n_heads)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(dim=-1)


@torch.no_grad()
def record_attention(
    pipeline: Pipeline,
    data_dir: Path,
    *,
    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS,
    frames: int | None = None,
    max_tracks: int = 8,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Mean attention maps {name: (len(timesteps), N, N)} over the first ``max_tracks`` tracks.

    Each track contributes its first ``frames`` latent frames (default: the training length), its
    accompaniment noised to each t (conditioned on its vocal, the conditional CFG branch).
    """
    den = pipeline.denoiser
    frames = den.config.latent_length if frames is None else frames
    den.check_length(frames)
    samples = frames * pipeline.vae.config.downsampling
    names = {den.attn: "global"}
    for i, level in enumerate(den.down):
        if level.cross is not None:
            names[level.cross] = f"cross_down{i}"
    for j, level in enumerate(den.up):
        if level.cross is not None:
            names[level.cross] = f"cross_up{len(den.up) - 1 - j}"
    sums: dict[str, list] = {n: [0.0] * len(timesteps) for n in names.values()}
    current = {"t": 0}

    def hook(module, args):
        if module is den.attn:
            p = _global_probs(module, args[0])
        else:
            p = _cross_probs(module, args[0], args[1])
        sums[names[module]][current["t"]] = sums[names[module]][current["t"]] + p.mean(dim=(0, 1))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    g = torch.Generator().manual_seed(seed)
    used = 0
    try:
        for path in list_tracks(data_dir):
            if used >= max_tracks:
                break
            track = load_track(path, sample_rate=pipeline.sample_rate, channels=pipeline.audio_channels)
            if track.num_samples < samples:
                continue
            vocal = encode_audio(pipeline, torch.from_numpy(track.vocals[None, :, :samples]))
            x0 = encode_audio(pipeline, torch.from_numpy(track.accompaniment[None, :, :samples]))
            for ti, t in enumerate(timesteps):
                current["t"] = ti
                tt = torch.tensor([float(t)])
                alpha, sigma = alpha_sigma(tt, pipeline.config.schedule)
                z = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
                den(z, tt, vocal)
            used += 1
    finally:
        for h in handles:
            h.remove()
    if used == 0:
        raise ValueError(f"{data_dir}: no track holds {samples} samples ({frames} latent frames)")
    return {name: np.stack([s.numpy() / used for s in per_t]) for name, per_t in sums.items()}


def offset_mass(p: np.ndarray) -> np.ndarray:
    """m[d + N − 1] = mean over queries i (with i + d in range) of p[i, i + d], d = −(N−1)..N−1."""
    n = p.shape[0]
    return np.array([np.diagonal(p, offset=d).mean() for d in range(-(n - 1), n)])


def analyse(p: np.ndarray, *, max_lags: int = 4) -> dict:
    """Band masses, the bands holding 50/80/90 %, and the most favoured lags of one (N, N) map."""
    n = p.shape[0]
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    dist = np.abs(j - i)
    out = {"n": n, "band_mass": {}, "uniform_band_mass": {}}
    for w in BANDS:
        if w < n:
            inside = dist <= w
            out["band_mass"][w] = float((p * inside).sum(axis=1).mean())
            out["uniform_band_mass"][w] = float(inside.sum(axis=1).mean() / n)
    for level in MASS_LEVELS:
        masses = [(p * (dist <= w)).sum(axis=1).mean() for w in range(n)]
        out[f"band_for_{int(level * 100)}pct"] = int(np.argmax(np.array(masses) >= level))
    m = offset_mass(p)
    lift = {d: float((m[n - 1 + d] + m[n - 1 - d]) * n / 2) for d in range(1, n)}
    band = out["band_for_80pct"]
    beyond = sorted(((d, v) for d, v in lift.items() if d > band), key=lambda kv: -kv[1])
    out["lags"] = [{"offset": d, "lift": round(v, 3)} for d, v in beyond[:max_lags]]
    out["suggested"] = {"band": band, "lags": [d for d, v in beyond[:max_lags] if v >= LAG_LIFT]}
    return out


def plot_maps(maps: dict[str, np.ndarray], timesteps: tuple[float, ...], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(maps)
    fig, axes = plt.subplots(len(names), len(timesteps), figsize=(2.6 * len(timesteps), 2.6 * len(names)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, t in enumerate(timesteps):
            ax = axes[r][c]
            ax.imshow(np.log10(maps[name][c] + 1e-6), cmap="magma", aspect="auto")
            ax.set_title(f"{name}, t={t}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.supxlabel("key frame")
    fig.supylabel("query frame (log10 attention)")
    fig.tight_layout()
    paths = [out_dir / "attention_maps.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        n = maps[name].shape[-1]
        for c, t in enumerate(timesteps):
            ax.plot(np.arange(-(n - 1), n), offset_mass(maps[name][c]) * n, label=f"t={t}", lw=1)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("offset j − i (frames)")
    axes[0][0].set_ylabel("mass × N (1 = uniform)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "offset_profiles.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def attention_maps(pipeline: Pipeline, data_dir: Path, out_dir: Path, *,
                   timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS, frames: int | None = None,
                   max_tracks: int = 8, seed: int = 0) -> dict:
    """Record, analyse and plot; writes report.json, maps.npz and two PNGs into ``out_dir``."""
    maps = record_attention(pipeline, data_dir, timesteps=timesteps, frames=frames, max_tracks=max_tracks,
                            seed=seed)
    report = {
        "checkpoint": str(pipeline.path) if pipeline.path else None,
        "data": str(data_dir), "timesteps": list(timesteps),
        "frames": frames or pipeline.denoiser.config.latent_length, "max_tracks": max_tracks, "seed": seed,
        "maps": {name: {str(t): analyse(m[i]) for i, t in enumerate(timesteps)} for name, m in maps.items()},
    }
    glob = [report["maps"]["global"][str(t)]["suggested"] for t in timesteps]
    band = max(s["band"] for s in glob)
    report["suggested_litefocus"] = {"band": band, "lags": sorted({d for s in glob for d in s["lags"] if d > band})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "maps.npz", **maps)
    report["plots"] = [str(p) for p in plot_maps(maps, timesteps, out_dir)]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
