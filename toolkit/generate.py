"""Full-precision reference inference: encode the vocal, sample with DDIM + CFG, decode.

This is the reference every compressed or compiled model is compared against.

Long vocals (issue 18) are generated in one of three modes:

* ``onepass``: the whole vocal's latent is denoised at once (the denoiser runs at any multiple of
  its downsampling), up to ``max_frames`` latent frames. Beyond the training length the global
  attention may run as LiteFocus (seed 002), its compensation indices drawn per denoiser call
  from (seed, call) — the same draw a device makes in numpy.
* ``windows``: MultiDiffusion-style. Windows of the training length overlap by half; at every
  step each window is denoised and the overlapping predictions are averaged. Averaging v̂ is the
  same as averaging the next latents, since the DDIM update is affine in v̂ at a fixed z.
* ``segments``: the old baseline: independent segments of the training length, each from its own
  noise, joined end to end.

At the training length (or shorter) the three modes give the same bits. Long latents are decoded
(and long vocals encoded) by the VAE in chunks with enough context on each side that the chunk's
core does not see the cut; ``seam_error`` measures what is left.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from toolkit.checkpoint import Pipeline
from toolkit.diffusion import guided_denoiser, make_table, sample_ddim
from toolkit.models.litefocus import LiteFocusConfig, compensation_count, compensation_indices

GENERATION_MODES = ("onepass", "windows", "segments")
# Default ceiling of a one-pass latent: 8192 frames is 262 s on the demo (62.5 frames/s) and 6.3 min
# on the paper config (21.5 frames/s); dense attention there needs ≈ 0.5 GB of scores on `paper`.
DEFAULT_MAX_FRAMES = 8192
# VAE chunks: core frames per call and context frames on each side (the demo decoder's receptive
# field is ±18 latent frames, its encoder's ±16; Stable Audio Open's is smaller in frames).
VAE_CHUNK_FRAMES = 1024
VAE_CONTEXT_FRAMES = 32
# Windows denoised per batch in ``windows`` mode (each runs twice under CFG).
WINDOW_BATCH = 16


def encode_audio(pipeline: Pipeline, audio: torch.Tensor) -> torch.Tensor:
    """Audio (B, C, segment_samples) → the denoiser's latent: VAE posterior mean × latent_scale."""
    return pipeline.vae.encode_latent(audio) * pipeline.config.latent_scale


def decode_latent(pipeline: Pipeline, latent: torch.Tensor) -> torch.Tensor:
    return pipeline.vae.decode(latent / pipeline.config.latent_scale)


def _chunk_spans(frames: int, chunk: int, context: int):
    """(core start, core end, call start, call end) in frames for every chunk of ``frames``."""
    for s in range(0, frames, chunk):
        e = min(s + chunk, frames)
        yield s, e, max(0, s - context), min(frames, e + context)


@torch.no_grad()
def encode_audio_chunked(pipeline: Pipeline, audio: torch.Tensor, *, chunk_frames: int = VAE_CHUNK_FRAMES,
                         context_frames: int = VAE_CONTEXT_FRAMES) -> torch.Tensor:
    """``encode_audio`` for long audio: chunks of ``chunk_frames`` latent frames, each encoded with
    ``context_frames`` of audio on either side and cut back to its core."""
    hop = pipeline.vae.config.downsampling
    frames = audio.shape[-1] // hop
    if frames <= chunk_frames:
        return encode_audio(pipeline, audio)
    parts = []
    for s, e, a, b in _chunk_spans(frames, chunk_frames, context_frames):
        lat = encode_audio(pipeline, audio[..., a * hop:b * hop])
        parts.append(lat[..., s - a:e - a])
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def decode_latent_chunked(pipeline: Pipeline, latent: torch.Tensor, *, chunk_frames: int = VAE_CHUNK_FRAMES,
                          context_frames: int = VAE_CONTEXT_FRAMES) -> torch.Tensor:
    """``decode_latent`` for long latents: chunks of ``chunk_frames`` frames, each decoded with
    ``context_frames`` on either side and cut back to its core's samples."""
    frames = latent.shape[-1]
    if frames <= chunk_frames:
        return decode_latent(pipeline, latent)
    hop = pipeline.vae.config.downsampling
    parts = []
    for s, e, a, b in _chunk_spans(frames, chunk_frames, context_frames):
        audio = decode_latent(pipeline, latent[..., a:b])
        parts.append(audio[..., (s - a) * hop:(e - a) * hop])
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def seam_error(pipeline: Pipeline, latent: torch.Tensor, *, chunk_frames: int,
               context_frames: int) -> dict[str, float]:
    """Chunked against whole decoding of ``latent``: the largest sample error at the seams and
    elsewhere, relative to the whole decoding's peak, and the error's RMS relative to its RMS."""
    whole = decode_latent(pipeline, latent)
    chunked = decode_latent_chunked(pipeline, latent, chunk_frames=chunk_frames, context_frames=context_frames)
    err = (chunked - whole).abs()
    hop = pipeline.vae.config.downsampling
    near = torch.zeros(whole.shape[-1], dtype=torch.bool)
    for s in range(chunk_frames, latent.shape[-1], chunk_frames):
        near[max(0, (s - 1) * hop):(s + 1) * hop] = True
    peak = whole.abs().max().item()
    return {
        "max_abs_at_seams_rel": err[..., near].max().item() / peak if near.any() else 0.0,
        "max_abs_elsewhere_rel": err[..., ~near].max().item() / peak,
        "rms_rel": (err.pow(2).mean().sqrt() / whole.pow(2).mean().sqrt()).item(),
    }


def initial_noise(pipeline: Pipeline, batch: int, generator: torch.Generator,
                  frames: int | None = None) -> torch.Tensor:
    """Noise for ``frames`` latent frames (default: the training length)."""
    d, length = pipeline.latent_shape
    return torch.randn((batch, d, length if frames is None else frames), generator=generator)


@torch.no_grad()
def sample_latent(
    pipeline: Pipeline,
    vocal_latent: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    litefocus: LiteFocusConfig | None = None,
    on_step=None,
) -> torch.Tensor:
    """DDIM over ``steps`` from ``noise``, conditioned on ``vocal_latent`` with CFG scale ``guidance``.

    Any latent length the denoiser accepts. ``litefocus``: beyond the training length, the global
    attention of denoiser call k (= step k; CFG's two branches are one call) attends to its band
    and lags plus C = compensation_indices(bottleneck frames, r, seed, call=k).
    """
    table = make_table(pipeline.config.schedule, steps)
    model = pipeline.denoiser
    if litefocus is not None and noise.shape[-1] > model.config.latent_length:
        bottleneck = noise.shape[-1] // model.config.downsampling
        calls = iter(range(table.steps))

        def model_fn(z, t, cond):
            idx = compensation_indices(bottleneck, litefocus.ratio, seed=litefocus.seed, call=next(calls))
            return pipeline.denoiser(z, t, cond, idx, litefocus=litefocus)
    else:
        model_fn = model
    denoise = guided_denoiser(model_fn, vocal_latent, guidance, folded=pipeline.config.guidance_folded)
    return sample_ddim(denoise, noise, table, callback=_step_callback(on_step))


def _step_callback(on_step):
    """``sample_ddim``'s callback that calls ``on_step()`` once per step (a progress bar's update)."""
    return None if on_step is None else (lambda i, z, x0: on_step())


def window_starts(frames: int, window: int, hop: int) -> list[int]:
    """Starts of windows of ``window`` frames every ``hop`` that cover [0, frames) (the last one flush)."""
    if frames < window:
        raise ValueError(f"{frames} frames are fewer than one window of {window}")
    starts = list(range(0, frames - window + 1, hop))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


@torch.no_grad()
def sample_latent_windows(
    pipeline: Pipeline,
    vocal_latent: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    hop: int | None = None,
    on_step=None,
) -> torch.Tensor:
    """MultiDiffusion: DDIM on a long latent whose v̂ at each step is the average of the predictions
    of overlapping windows of the training length (``hop`` frames apart, default half a window)."""
    window = pipeline.denoiser.config.latent_length
    frames = noise.shape[-1]
    hop = window // 2 if hop is None else hop
    if not 0 < hop <= window:
        raise ValueError(f"window hop must be in [1, {window}], got {hop}")
    starts = window_starts(frames, window, hop)
    count = torch.zeros(frames)
    for s in starts:
        count[s:s + window] += 1
    table = make_table(pipeline.config.schedule, steps)

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(z)
        for first in range(0, len(starts), WINDOW_BATCH):
            group = starts[first:first + WINDOW_BATCH]
            zw = torch.cat([z[..., s:s + window] for s in group])
            cw = torch.cat([vocal_latent[..., s:s + window] for s in group])
            tw = t.repeat(len(group))
            vw = guided_denoiser(pipeline.denoiser, cw, guidance, folded=pipeline.config.guidance_folded)(zw, tw)
            for i, s in enumerate(group):
                total[..., s:s + window] += vw[i * z.shape[0]:(i + 1) * z.shape[0]]
        return total / count

    return sample_ddim(denoise, noise, table, callback=_step_callback(on_step))


def _peak_rss_mib() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def attention_bytes(pipeline: Pipeline, frames: int, *, batch: int,
                    litefocus: LiteFocusConfig | None = None) -> dict[str, int]:
    """Bytes of the largest float32 attention-score tensors of one denoiser call at ``frames``:
    the global self-attention (dense N², or LiteFocus's N × |F_i| bound) and the largest cross-attention."""
    cfg = pipeline.denoiser.config
    n = frames // cfg.downsampling
    heads = cfg.channels[-1] // cfg.head_dim
    if litefocus is not None and frames > cfg.latent_length:
        band = cfg.bottleneck_length // 2 if litefocus.band is None else litefocus.band
        per_query = 2 * max(2 * band, 1) + 2 * len(litefocus.lags) + compensation_count(n, litefocus.ratio)
        glob = batch * heads * n * per_query * 4
    else:
        glob = batch * heads * n * n * 4
    cross = max((batch * (cfg.channels[lv] // cfg.head_dim) * (frames >> lv) ** 2 * 4
                 for lv in cfg.cross_attn_levels), default=0)
    return {"global_attention": glob, "cross_attention": cross}


def latent_frames_for(pipeline: Pipeline, samples: int) -> int:
    """Latent frames a one-pass latent needs for ``samples`` of audio: at least the training length,
    rounded up to the denoiser's downsampling."""
    hop = pipeline.vae.config.downsampling
    down = pipeline.denoiser.config.downsampling
    frames = max(-(-samples // hop), pipeline.denoiser.config.latent_length)
    return -(-frames // down) * down


@torch.no_grad()
def generate_accompaniment(
    pipeline: Pipeline,
    vocals: np.ndarray,
    *,
    steps: int,
    guidance: float,
    seed: int,
    latents: list | None = None,
    mode: str = "onepass",
    litefocus: LiteFocusConfig | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    window_hop: int | None = None,
    stats: dict | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Vocals (C, N) at the pipeline's rate → accompaniment (C, N).

    ``mode``: ``onepass`` (the whole latent at once, at most ``max_frames`` frames; ``litefocus``
    applies beyond the training length), ``windows`` (MultiDiffusion over training-length windows,
    ``window_hop`` frames apart) or ``segments`` (the old baseline, which the evaluations published
    before one-pass generation pass explicitly to keep their figures: the vocal is cut into
    ``segment_samples`` pieces, the last zero-padded, each generated with the next draw of one
    seeded noise stream). At or below the training length the three give the same bits. ``latents``: a list that receives the
    final latent(s) (D, L) — one per segment, or one for the whole track. ``stats``: a dict that
    receives the mode, latent frames, denoiser length, wall time, peak RSS and attention sizes.
    ``progress``: a bar on stderr counting denoising steps (all segments' steps in ``segments`` mode).
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
    channels, n = vocals.shape
    if channels != pipeline.audio_channels:
        raise ValueError(f"vocals have {channels} channels, the model takes {pipeline.audio_channels}")
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    n_runs = max(1, -(-n // pipeline.segment_samples)) if mode == "segments" else 1
    bar = tqdm(total=steps * n_runs, desc=f"denoising ({mode})", unit="step", disable=not progress,
               file=sys.stderr, leave=False)
    if mode == "segments":
        seg = pipeline.segment_samples
        n_seg = n_runs
        padded = np.zeros((channels, n_seg * seg), dtype=np.float32)
        padded[:, :n] = vocals
        out = []
        for i in range(n_seg):
            chunk = torch.from_numpy(padded[None, :, i * seg:(i + 1) * seg])
            cond = encode_audio(pipeline, chunk)
            noise = initial_noise(pipeline, 1, generator)
            latent = sample_latent(pipeline, cond, noise, steps=steps, guidance=guidance, on_step=bar.update)
            if latents is not None:
                latents.append(latent[0].numpy())
            out.append(decode_latent(pipeline, latent)[0].numpy())
        acc = np.concatenate(out, axis=-1)[:, :n]
        frames, call_frames = pipeline.denoiser.config.latent_length * n_seg, pipeline.denoiser.config.latent_length
    else:
        frames = latent_frames_for(pipeline, n)
        if mode == "onepass" and frames > max_frames:
            raise ValueError(
                f"the vocal needs {frames} latent frames in one pass, over max_frames={max_frames}; "
                f"raise the limit (memory: see attention_bytes) or use mode 'windows'")
        padded = np.zeros((channels, frames * pipeline.vae.config.downsampling), dtype=np.float32)
        padded[:, :n] = vocals
        cond = encode_audio_chunked(pipeline, torch.from_numpy(padded[None]))
        noise = initial_noise(pipeline, 1, generator, frames)
        if mode == "onepass":
            latent = sample_latent(pipeline, cond, noise, steps=steps, guidance=guidance, litefocus=litefocus,
                                   on_step=bar.update)
            call_frames = frames
        else:
            latent = sample_latent_windows(pipeline, cond, noise, steps=steps, guidance=guidance, hop=window_hop,
                                           on_step=bar.update)
            call_frames = pipeline.denoiser.config.latent_length
        if latents is not None:
            latents.append(latent[0].numpy())
        acc = decode_latent_chunked(pipeline, latent)[0].numpy()[:, :n]
    bar.close()
    if stats is not None:
        cfg_batch = 1 if pipeline.config.guidance_folded or guidance == 1.0 else 2
        sparse = litefocus if mode == "onepass" else None
        stats.update({
            "mode": mode, "latent_frames": frames, "training_frames": pipeline.denoiser.config.latent_length,
            "denoiser_call_frames": call_frames,
            "attention": "litefocus" if sparse is not None and call_frames > pipeline.denoiser.config.latent_length
            else "dense",
            "wall_s": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(),
            "attention_scores_mib": {k: v / 2**20 for k, v in attention_bytes(
                pipeline, call_frames, batch=cfg_batch, litefocus=sparse).items()},
        })
    return acc
