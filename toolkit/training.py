"""Training on this CPU: the demo VAE and the demo SoftAlign denoiser (standing in for upstream GPUs).

Both loops are seeded, show a progress bar with the loss, and resume: the model, optimizer, LR
schedule, RNG and step are saved to ``<state_dir>/train_state.pt`` every ``save_every`` steps
(atomically), and a rerun with the same arguments continues from there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.atomic import atomic_directory
from toolkit.checkpoint import (
    Pipeline, PipelineConfig, load_component, save_checkpoint, save_component,
)
from toolkit.data.stems import list_tracks, load_track
from toolkit.diffusion import v_loss
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckConfig, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

STATE_FILE = "train_state.pt"
TRAIN_INFO = "train_info.json"  # how a VAE component was trained; copied into pipeline.json


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def save_state(state_dir: Path, payload: dict, *, name: str = STATE_FILE) -> None:
    """Write a resumable training state atomically (temporary file, then rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, state_dir / name)


def optimizer_step(model: torch.nn.Module, opt, sched, loss: torch.Tensor) -> None:
    """Backward, clip the gradient norm at 1, step the optimizer and the LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def _load_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)


def _check_resume(state: dict, args: dict, state_dir: Path) -> None:
    if state["args"] != args:
        changed = sorted(k for k in set(args) | set(state["args"]) if args.get(k) != state["args"].get(k))
        raise ValueError(
            f"{state_dir / STATE_FILE}: saved with different arguments ({', '.join(changed)}); "
            "rerun with the same arguments to resume, or remove the state directory to start over"
        )


def load_audio_set(data_dir: Path, *, sample_rate: int, channels: int) -> list:
    tracks = list_tracks(data_dir)
    if not tracks:
        raise ValueError(f"{data_dir}: no tracks found (expected <track>/vocals.wav + accompaniment.wav)")
    return [load_track(t, sample_rate=sample_rate, channels=channels) for t in tracks]


# --- multi-resolution STFT loss (spectral convergence + log magnitude) ----------------------------


def mrstft_loss(pred: torch.Tensor, target: torch.Tensor,
                ffts: tuple[int, ...] = (256, 512, 1024, 2048)) -> torch.Tensor:
    """Multi-resolution STFT loss (Yamamoto et al., Parallel WaveGAN): Σ SC + log-magnitude L1."""
    pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    total = pred.new_zeros(())
    for n_fft in ffts:
        window = torch.hann_window(n_fft)
        sp = torch.stft(pred, n_fft, n_fft // 4, window=window, return_complex=True).abs() + 1e-5
        st = torch.stft(target, n_fft, n_fft // 4, window=window, return_complex=True).abs() + 1e-5
        sc = torch.linalg.norm(st - sp) / torch.linalg.norm(st)
        total = total + sc + F.l1_loss(sp.log(), st.log())
    return total / len(ffts)


def bandpass(audio: torch.Tensor, sample_rate: int, low_hz: float, high_hz: float) -> torch.Tensor:
    """Keep the FFT bins in [``low_hz``, ``high_hz``] along the last axis (brick-wall filter)."""
    spectrum = torch.fft.rfft(audio, dim=-1)
    f = torch.fft.rfftfreq(audio.shape[-1], 1.0 / sample_rate)
    return torch.fft.irfft(spectrum * ((f >= low_hz) & (f <= high_hz)), n=audio.shape[-1], dim=-1)


def waveform_l1(pred: torch.Tensor, target: torch.Tensor, sample_rate: int, cutoff_hz: float,
                highpass_hz: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between waveforms, in [``highpass_hz``, ``cutoff_hz``] (0 for ``cutoff_hz``: no upper edge).

    ``weights`` (B,): a weight per example (the mean over examples is weighted by it).
    """
    if cutoff_hz > 0 or highpass_hz > 0:
        high = cutoff_hz if cutoff_hz > 0 else sample_rate / 2
        pred = bandpass(pred, sample_rate, highpass_hz, high)
        target = bandpass(target, sample_rate, highpass_hz, high)
    per_example = (pred - target).abs().reshape(pred.shape[0], -1).mean(dim=1)
    return per_example.mean() if weights is None else (weights * per_example).mean()


@dataclass(frozen=True)
class VAETrainArgs:
    preset: str = "demo"
    steps: int = 3000
    batch_size: int = 8
    segment_samples: int = 2048
    lr: float = 1e-3
    kl_weight: float = 1e-4
    # Weight of the waveform L1 term next to the multi-resolution STFT loss. The STFT terms are
    # phase-blind and their log-magnitude part spends the model on the noise floor; on the demo
    # VAE at weight 1 the pad (130-520 Hz) came back at 3 % of its energy and the chords were lost
    # (chord accuracy 0.02 on reconstructions after 1500 steps); at 50 the same run keeps 0.87.
    waveform_weight: float = 50.0
    # Band (Hz) the waveform term looks at; 0: all of it. Above it only the STFT terms apply, so
    # noise (snare, hats, breath) may come back as any noise of the right spectrum instead of the
    # exact realisation. The demo VAEs use 600 Hz (above the vocal's fundamentals): a denoiser
    # trained on v2's latents reached chord accuracy 0.24 against 0.16 with the full band.
    waveform_lowpass_hz: float = 0.0
    # Lower edge (Hz) of that band; 0: none. Below it (kick, bass) only the phase-blind STFT terms
    # apply, so the latent codes those parts by their magnitude rather than their waveform. Tried
    # at 127 Hz on the demo: it did not make the denoiser follow the beat (BENCHMARKS.md).
    waveform_highpass_hz: float = 0.0
    # The waveform weight on vocal crops; None: ``waveform_weight``. The pipeline only encodes the
    # vocal (as conditioning) and never decodes it. Under the waveform term its latent codes the
    # waveform and the note onsets become hard to read off it: a linear probe finds the beat grid
    # in the vocal latents at correlation 0.15 (weight 50), 0.23 (15) and 0.41 (0). Demo v3 uses 0:
    # its denoiser follows the tempo (0.43 vs 0.08 random), v2's (50) and the weight-15 one did
    # not. The price was chord following (0.10 against v2's 0.24), for a reason not established.
    vocal_waveform_weight: float | None = None
    seed: int = 0


def train_vae(data_dir: Path, out_dir: Path, args: VAETrainArgs, *, state_dir: Path | None = None,
              save_every: int = 200, show_progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Train an Oobleck VAE (reconstruction: multi-resolution STFT + weighted waveform L1, plus KL).

    Crops of both stems (vocals and accompaniment) are the training audio. Writes ``out_dir`` as a
    component directory (config.json + model.safetensors). ``stop_at`` ends this run after that
    global step (state saved, nothing written; rerun to continue) and returns None.
    """
    if args.preset not in OOBLECK_PRESETS:
        raise ValueError(f"unknown VAE preset {args.preset!r}; choose from {sorted(OOBLECK_PRESETS)}")
    config: OobleckConfig = OOBLECK_PRESETS[args.preset]
    if args.segment_samples % config.downsampling:
        raise ValueError(f"segment_samples must be a multiple of {config.downsampling}")
    state_dir = Path(state_dir or f"{out_dir}-state")
    t_start = time.time()
    tracks = load_audio_set(Path(data_dir), sample_rate=config.sample_rate, channels=config.audio_channels)
    vocal_weight = args.waveform_weight if args.vocal_waveform_weight is None else args.vocal_waveform_weight
    # (audio, its waveform-L1 weight) for every stem of every track.
    clips = [c for t in tracks for c in ((t.vocals, vocal_weight), (t.accompaniment, args.waveform_weight))]
    if min(audio.shape[-1] for audio, _ in clips) < args.segment_samples:
        raise ValueError(f"{data_dir}: tracks are shorter than segment_samples={args.segment_samples}")

    torch.manual_seed(args.seed)
    model = OobleckVAE(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, rec_losses = 0, []
    arg_dict = vars(args) | {"data": str(Path(data_dir).resolve())}
    state = _load_state(state_dir)
    if state is not None:
        _check_resume(state, arg_dict, state_dir)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"]); rng.bit_generator.state = state["numpy_rng"]
        gen.set_state(state["torch_rng"]); step = state["step"]
        rec_losses = state.get("rec_losses", [])

    def checkpoint() -> None:
        save_state(state_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "numpy_rng": rng.bit_generator.state,
                                "torch_rng": gen.get_state(), "step": step, "args": arg_dict,
                                "rec_losses": rec_losses})

    model.train()
    bar = progress(args.steps, step, "train-vae", show_progress)
    while step < args.steps:
        batch, weights = [], []
        for _ in range(args.batch_size):
            clip, weight = clips[rng.integers(len(clips))]
            start = rng.integers(0, clip.shape[-1] - args.segment_samples + 1)
            batch.append(clip[:, start:start + args.segment_samples])
            weights.append(weight)
        audio = torch.from_numpy(np.stack(batch)).float()
        out = model(audio, generator=gen)
        rec = (mrstft_loss(out.reconstruction, audio)
               + waveform_l1(out.reconstruction, audio, config.sample_rate, args.waveform_lowpass_hz,
                             args.waveform_highpass_hz, weights=torch.tensor(weights)))
        loss = rec + args.kl_weight * out.kl
        optimizer_step(model, opt, sched, loss)
        step += 1
        rec_losses.append(rec.item())
        bar.update(1); bar.set_postfix(rec=f"{np.mean(rec_losses[-50:]):.3f}", kl=f"{out.kl.item():.1f}")
        if step % save_every == 0 or step == args.steps or step == stop_at:
            checkpoint()
        if step == stop_at:
            bar.close()
            return None
    bar.close()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_component(tmp, config, model.eval())
        (tmp / TRAIN_INFO).write_text(json.dumps({
            "trained_with": "toolkit train-vae", "command": "toolkit " + " ".join(sys.argv[1:]),
            "args": arg_dict, "wall_time_s_last_run": round(time.time() - t_start, 1),
            "reconstruction_loss_first_100": float(np.mean(rec_losses[:100])),
            "reconstruction_loss_last_100": float(np.mean(rec_losses[-100:])),
        }, indent=2) + "\n")
    return out_dir


# --- the denoiser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserTrainArgs:
    preset: str = "demo"
    steps: int = 4000
    batch_size: int = 16  # seed 000 §V
    lr: float = 3.5e-4  # seed 000 §V: AdamW, cosine annealing
    weighting: str = "mse"
    cond_dropout: float = 0.1
    seed: int = 0
    default_steps: int = 50
    default_guidance: float = 3.0


@torch.no_grad()
def encode_pairs(vae: OobleckVAE, tracks: list, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocal, accompaniment) VAE means of every whole segment of every track."""
    vocals, accs = [], []
    for t in tracks:
        for s in range(0, t.vocals.shape[-1] - segment + 1, segment):
            v = torch.from_numpy(t.vocals[None, :, s:s + segment]).float()
            a = torch.from_numpy(t.accompaniment[None, :, s:s + segment]).float()
            vocals.append(vae.encode_latent(v)); accs.append(vae.encode_latent(a))
    if not vocals:
        raise ValueError(f"no track is at least one segment ({segment} samples) long")
    return torch.cat(vocals), torch.cat(accs)


def train_denoiser(data_dir: Path, vae_dir: Path, out_dir: Path, args: DenoiserTrainArgs, *,
                   name: str = "demo", state_dir: Path | None = None, save_every: int = 200,
                   show_progress: bool = True, provenance: dict | None = None,
                   stop_at: int | None = None) -> Path | None:
    """Train a SoftAlign U-Net on VAE latents of vocal/accompaniment pairs; write a full checkpoint.

    ``stop_at`` ends this run after that global step (state saved; rerun to continue), returning None.
    """
    if args.preset not in SOFTALIGN_PRESETS:
        raise ValueError(f"unknown denoiser preset {args.preset!r}; choose from {sorted(SOFTALIGN_PRESETS)}")
    config = SOFTALIGN_PRESETS[args.preset]
    vae = load_component(Path(vae_dir), OobleckConfig, OobleckVAE)
    if vae.config.latent_dim != config.latent_channels:
        raise ValueError(f"{vae_dir}: VAE latent_dim {vae.config.latent_dim} != denoiser "
                         f"latent_channels {config.latent_channels} (preset {args.preset})")
    state_dir = Path(state_dir or f"{out_dir}-state")
    segment = config.latent_length * vae.config.downsampling
    t0 = time.time()
    tracks = load_audio_set(Path(data_dir), sample_rate=vae.config.sample_rate,
                            channels=vae.config.audio_channels)
    vocal_lat, acc_lat = encode_pairs(vae, tracks, segment)
    # Normalise latents to unit variance (the scale travels in pipeline.json).
    latent_scale = float(1.0 / torch.cat([vocal_lat, acc_lat]).std())
    vocal_lat, acc_lat = vocal_lat * latent_scale, acc_lat * latent_scale

    torch.manual_seed(args.seed)
    model = SoftAlignUNet(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, losses = 0, []
    arg_dict = vars(args) | {"data": str(Path(data_dir).resolve()), "vae": str(Path(vae_dir).resolve())}
    state = _load_state(state_dir)
    if state is not None:
        _check_resume(state, arg_dict, state_dir)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"]); gen.set_state(state["torch_rng"])
        step, losses = state["step"], state["losses"]

    def checkpoint() -> None:
        save_state(state_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "torch_rng": gen.get_state(),
                                "step": step, "losses": losses, "args": arg_dict})

    model.train()
    n = vocal_lat.shape[0]
    bar = progress(args.steps, step, "train", show_progress)
    while step < args.steps:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        loss = v_loss(model, acc_lat[idx], vocal_lat[idx], schedule=model.schedule, generator=gen,
                      weighting=args.weighting, cond_dropout=args.cond_dropout)
        optimizer_step(model, opt, sched, loss)
        step += 1
        losses.append(loss.item())
        bar.update(1); bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % save_every == 0 or step == args.steps or step == stop_at:
            checkpoint()
        if step == stop_at:
            bar.close()
            return None
    bar.close()
    pipeline_config = PipelineConfig(
        name=name, schedule_offset=config.schedule_offset, default_steps=args.default_steps,
        default_guidance=args.default_guidance, latent_scale=latent_scale,
        provenance={
            "trained_with": "toolkit train", "args": arg_dict, "examples": n,
            "final_loss_mean_last_100": float(np.mean(losses[-100:])),
            "first_loss_mean_first_100": float(np.mean(losses[:100])),
            "wall_time_s_last_run": round(time.time() - t0, 1),
            "vae": (json.loads((Path(vae_dir) / TRAIN_INFO).read_text())
                    if (Path(vae_dir) / TRAIN_INFO).is_file() else None),
            **(provenance or {}),
        },
    )
    pipe = Pipeline(config=pipeline_config, denoiser=model.eval(), vae=vae)
    return save_checkpoint(Path(out_dir), pipe, overwrite=True)
