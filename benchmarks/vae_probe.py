"""What a VAE keeps for the denoiser: its reconstructions' musical agreement, and whether the beat
grid can be read off its latents.

For each VAE, on labelled held-out synthetic pairs:

- the true accompaniment encoded and decoded, segment by segment as generation does, scored by
  :func:`toolkit.data.music.agreement` (chords, key, tempo, beat alignment) and its audio SNR;
- a linear probe of the beat grid: ridge regression from each latent frame (with ±``--context``
  frames, their magnitudes and frame-to-frame changes) to "a labelled beat is within one frame",
  fitted on ``--train`` pairs and scored as the mean per-track correlation on the held-out ones,
  for the vocal's latents (what the denoiser is conditioned on) and the accompaniment's;
- a linear probe of the melody's pitch class from the vocal's latents (same features, one-vs-rest
  ridge, 12 classes, frames inside a labelled note): accuracy on the held-out frames.

A denoiser can only place beats where its conditioning lets it find them; the probe measures how
directly the vocal latent shows them (a lower bound on what a nonlinear network can read).

    python benchmarks/vae_probe.py --vae v2=DIR --vae v3=DIR --train TRAIN --heldout HELDOUT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line  # noqa: E402
from toolkit.checkpoint import load_component  # noqa: E402
from toolkit.data.music import agreement  # noqa: E402
from toolkit.data.stems import list_tracks, load_track  # noqa: E402
from toolkit.evaluate import reconstruct  # noqa: E402
from toolkit.models.oobleck import OobleckConfig, OobleckVAE  # noqa: E402

RIDGE = 1e-2  # ridge strength relative to the number of frames (features are standardised)


@torch.no_grad()
def latents(vae: OobleckVAE, audio: np.ndarray, segment: int) -> np.ndarray:
    """(D, frames) posterior means of the whole segments of ``audio`` (C, N), joined in time."""
    x = torch.as_tensor(audio, dtype=torch.float32)[None]
    return torch.cat([vae.encode_latent(x[..., s:s + segment])
                      for s in range(0, x.shape[-1] - segment + 1, segment)], -1)[0].numpy()


def beat_grid(labels: dict, frames: int, frame_rate: float) -> np.ndarray:
    y = np.zeros(frames)
    for beat_s in labels["beat_times_s"]:
        i = int(round(beat_s * frame_rate))
        y[max(0, i - 1):min(frames, i + 2)] = 1.0
    return y


def features(z: np.ndarray, context: int) -> np.ndarray:
    """(frames, F): each frame with ±context neighbours, their magnitudes, and |Δ| between frames."""
    z = (z - z.mean(-1, keepdims=True)) / (z.std() + 1e-9)
    padded = np.pad(z, ((0, 0), (context, context + 1)))
    window = np.concatenate([padded[:, k:k + z.shape[-1]] for k in range(2 * context + 1)], 0)
    change = np.abs(np.diff(padded, axis=-1))[:, :z.shape[-1] + 2 * context]
    change = np.concatenate([change[:, k:k + z.shape[-1]] for k in range(2 * context + 1)], 0)
    return np.concatenate([window, np.abs(window), change], 0).T


def probe(train: list[tuple[np.ndarray, np.ndarray]], heldout: list[tuple[np.ndarray, np.ndarray]],
          context: int) -> float:
    x = np.concatenate([features(z, context) for z, _ in train])
    y = np.concatenate([g for _, g in train])
    mu, sd, w = fit_ridge(x, y)
    return float(np.mean([np.corrcoef(((features(z, context) - mu) / sd) @ w, g)[0, 1] for z, g in heldout]))


def pitch_class_targets(labels: dict, frames: int, frame_rate: float) -> np.ndarray:
    """Per latent frame: the melody note's pitch class, or -1 near note edges and in rests."""
    y = np.full(frames, -1)
    for note in labels["melody"]:
        y[int(note["start_s"] * frame_rate) + 2:min(frames, int(note["end_s"] * frame_rate) - 2)] = note["midi"] % 12
    return y


def fit_ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise ``x`` and solve the ridge regression to ``y`` (centred); (mean, std, weights)."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    x = (x - mu) / sd
    w = np.linalg.solve(x.T @ x + RIDGE * len(x) * np.eye(x.shape[1]), x.T @ (y - y.mean(0)))
    return mu, sd, w


def pitch_probe(train: list[tuple[np.ndarray, np.ndarray]], heldout: list[tuple[np.ndarray, np.ndarray]],
                context: int) -> float:
    def stack(pairs):
        x = np.concatenate([features(z, context) for z, _ in pairs])
        y = np.concatenate([c for _, c in pairs])
        return x[y >= 0], y[y >= 0]
    x, y = stack(train)
    mu, sd, w = fit_ridge(x, np.eye(12)[y])
    xh, yh = stack(heldout)
    return float(((((xh - mu) / sd) @ w).argmax(1) == yh).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", action="append", required=True, metavar="NAME=DIR",
                   help="a VAE component directory, named for the table (repeat for several)")
    p.add_argument("--train", type=Path, required=True, help="labelled pairs the probe is fitted on")
    p.add_argument("--train-n", type=int, default=300)
    p.add_argument("--heldout", type=Path, required=True, help="labelled held-out pairs")
    p.add_argument("--heldout-n", type=int, default=None)
    p.add_argument("--segment-latents", type=int, default=128, help="latent frames per segment (the demo's)")
    p.add_argument("--context", type=int, default=8, help="latent frames either side in the probe")
    p.add_argument("--append", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    t0 = time.time()
    rows = []
    for spec in a.vae:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--vae {spec!r}: give NAME=DIR, e.g. --vae demo=toolkit/assets/demo/vae")
        vae = load_component(Path(path), OobleckConfig, OobleckVAE).eval()
        cfg = vae.config
        segment, frame_rate = a.segment_latents * cfg.downsampling, cfg.sample_rate / cfg.downsampling

        def load(data: Path, n: int | None) -> list:
            return [load_track(t, sample_rate=cfg.sample_rate, channels=cfg.audio_channels)
                    for t in list_tracks(data)[:n]]

        train, heldout = load(a.train, a.train_n), load(a.heldout, a.heldout_n)
        scores, snr = [], []
        for track in heldout:
            recon = reconstruct(vae, track.accompaniment, segment)
            scores.append(agreement(recon, cfg.sample_rate, track.labels))
            err = float(((track.accompaniment - recon) ** 2).sum())
            snr.append(10 * np.log10(float((track.accompaniment ** 2).sum()) / max(err, 1e-20)))
        row = {"name": name, "path": path, "snr": float(np.mean(snr))}
        for key in ("chord_accuracy", "tempo_match", "beat_alignment"):
            row[key] = float(np.mean([s[key] for s in scores if s[key] is not None]))
        # Each stem's latents once per track: (train, held-out) lists of (D, frames).
        z = {stem: tuple([latents(vae, getattr(t, stem), segment) for t in tracks] for tracks in (train, heldout))
             for stem in ("vocals", "accompaniment")}

        def with_targets(stem: str, target) -> list:
            """(train, held-out) lists of (latent, target(labels, frames, frame_rate)) pairs."""
            return [[(zi, target(t.labels, zi.shape[-1], frame_rate)) for zi, t in zip(zs, tracks)]
                    for zs, tracks in zip(z[stem], (train, heldout))]

        for stem in ("vocals", "accompaniment"):
            row[stem] = probe(*with_targets(stem, beat_grid), a.context)
        row["pitch"] = pitch_probe(*with_targets("vocals", pitch_class_targets), a.context)
        rows.append(row)
        print(row, file=sys.stderr)
    lines = ["| VAE | reconstruction: chord accuracy ↑ | tempo match ↑ | beat alignment ↑ | audio SNR dB ↑ "
             "| beat-grid probe on vocal latents ↑ | on accompaniment latents ↑ "
             "| melody pitch class from vocal latents ↑ (chance 0.083) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} (`{r['path']}`) | {r['chord_accuracy']:.3f} | {r['tempo_match']:.3f} | "
                     f"{r['beat_alignment']:.1f} | {r['snr']:.1f} | {r['vocals']:.3f} | {r['accompaniment']:.3f} | "
                     f"{r['pitch']:.3f} |")
    table = "\n".join(lines)
    notes = (f"Held-out: {len(list_tracks(a.heldout)[:a.heldout_n])} pairs of "
             f"`{a.heldout}`; probe fitted on {len(list_tracks(a.train)[:a.train_n])} pairs of `{a.train}`, "
             f"±{a.context} latent frames, ridge {RIDGE}. Segments of {a.segment_latents} latent frames, as the "
             "demo denoiser sees them. Beat-grid probe: mean per-track correlation of the linear prediction "
             "with 'a beat within one latent frame'.")
    print(table)
    if a.append:
        append_section("VAE probe: what the latents keep of the harmony and the beat",
                       command=command_line(__file__), wall_s=time.time() - t0, notes=notes, table=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
