"""Distribution and perceptual quality measures that need no downloaded weights (ARCHITECTURE.md).

- :func:`frechet_distance`: the Fréchet distance between two Gaussians fitted to two sets of
  frame embeddings, ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) — the FAD formula (Kilgour et
  al. 2019) with whatever embedding is given.
- :class:`LogMelEmbedding`: the weight-free embedding, the frames of ``runtime_py.metrics.log_mel``
  (the one log-mel implementation). :func:`log_mel_frechet` is the Fréchet distance over it.
- :class:`EmbeddingModel`: the protocol a user's own embedding satisfies; :func:`load_embedding_model`
  reads one from a local TorchScript or safetensors file. Nothing is ever downloaded.
- :func:`visqol`: ViSQOL MOS-LQO via the ``visqol`` package (``visqol-python``) when it imports,
  otherwise a result that says it is unavailable and why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg

from runtime_py.metrics import log_mel
from toolkit.data.music import to_mono
from toolkit.data.stems import resample

# Added to both covariance diagonals when (Σ_a Σ_b)^½ is not finite (singular covariances, e.g.
# fewer frames than dimensions); the offset used by the reference FAD/FID implementations.
SQRTM_EPS = 1e-6
# sqrtm of a product of two PSD matrices is real in exact arithmetic; imaginary parts above this
# (relative to the largest entry) mean the covariances are broken, not rounding.
MAX_IMAG_RELATIVE = 1e-3
VISQOL_AUDIO_RATE = 48000  # ViSQOL's audio mode works at 48 kHz


@runtime_checkable
class EmbeddingModel(Protocol):
    """Anything that turns one clip into a sequence of frame embeddings."""

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Audio (N,) or (C, N) at ``sample_rate`` → float64 (frames, dim)."""
        ...


class LogMelEmbedding:
    """The weight-free embedding: each log-mel frame (``runtime_py.metrics.log_mel``) is a vector."""

    def __init__(self, *, n_mels: int = 64):
        self.n_mels = n_mels

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return log_mel(to_mono(audio), sample_rate, n_mels=self.n_mels)


def gaussian_stats(embeddings: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of frame embeddings, given as one (frames, dim) array or a list of them (pooled)."""
    if isinstance(embeddings, np.ndarray):
        frames = embeddings
    else:
        frames = np.concatenate([np.asarray(e, dtype=np.float64) for e in embeddings], axis=0)
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 2:
        raise ValueError(f"embeddings must be (frames, dim), got shape {frames.shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"need at least 2 frames to fit a covariance, got {frames.shape[0]}")
    if not np.all(np.isfinite(frames)):
        raise ValueError("embeddings contain NaN or Inf")
    return frames.mean(axis=0), np.atleast_2d(np.cov(frames, rowvar=False))


def frechet_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                       sigma_b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a Σ_b)^½)."""
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"embedding dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma_a.shape[0]) * SQRTM_EPS
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        scale = max(float(np.abs(covmean).max()), 1e-30)
        if float(np.abs(covmean.imag).max()) / scale > MAX_IMAG_RELATIVE:
            raise ValueError("sqrtm(Σ_a Σ_b) has a large imaginary part: the covariances are not "
                             "positive semi-definite (too few frames, or NaN in the embeddings)")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # rounding can leave tiny negatives for identical sets


def frechet_distance(embeddings_a: np.ndarray | Sequence[np.ndarray],
                     embeddings_b: np.ndarray | Sequence[np.ndarray]) -> float:
    """Fréchet distance between Gaussians fitted to two sets of (frames, dim) embeddings."""
    return frechet_from_stats(*gaussian_stats(embeddings_a), *gaussian_stats(embeddings_b))


def embed_all(model: EmbeddingModel, clips: Iterable[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    out = []
    for clip in clips:
        e = np.asarray(model.embed(clip, sample_rate), dtype=np.float64)
        if e.ndim != 2:
            raise ValueError(f"{type(model).__name__}.embed must return (frames, dim), got {e.shape}")
        out.append(e)
    return out


def audio_frechet(clips_a: Iterable[np.ndarray], clips_b: Iterable[np.ndarray], sample_rate: int, *,
                  model: EmbeddingModel | None = None) -> float:
    """Fréchet distance between two sets of clips under ``model`` (default: log-mel frames)."""
    model = model if model is not None else LogMelEmbedding()
    return frechet_distance(embed_all(model, clips_a, sample_rate), embed_all(model, clips_b, sample_rate))


def log_mel_frechet(clips_a: Iterable[np.ndarray], clips_b: Iterable[np.ndarray], sample_rate: int) -> float:
    """Fréchet distance over log-mel frame statistics: no weights involved."""
    return audio_frechet(clips_a, clips_b, sample_rate, model=LogMelEmbedding())


# --- user-provided embedding models (local files only) ----------------------------------------


class TorchScriptEmbedding:
    """A TorchScript module ``forward(audio (1, N) float32) -> (frames, dim) or (1, frames, dim)``.

    If the module has an integer attribute ``sample_rate``, audio is resampled to it first.
    """

    def __init__(self, module, *, source: str):
        self.module = module
        self.source = source
        rate = getattr(module, "sample_rate", None)
        self.sample_rate = int(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        x = to_mono(audio)
        if self.sample_rate is not None:
            x = resample(x[None], sample_rate, self.sample_rate)[0].astype(np.float64)
        with torch.no_grad():
            out = self.module(torch.from_numpy(x.astype(np.float32))[None])
        out = out.detach().to(torch.float64).numpy()
        if out.ndim == 3 and out.shape[0] == 1:
            out = out[0]
        if out.ndim != 2:
            raise ValueError(f"{self.source}: the module returned shape {out.shape}; an embedding "
                             "model must return (frames, dim) or (1, frames, dim)")
        return out


class MLPEmbedding:
    """A frame-wise MLP over log-mel frames, read from safetensors.

    File layout: tensors ``layers.{i}.weight`` (out, in) and ``layers.{i}.bias`` (out,), i = 0..n−1,
    ReLU between layers (none after the last). The first layer's ``in`` is the number of mel bands.
    Optional metadata ``sample_rate`` resamples audio to that rate before the log-mel.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], *, sample_rate: int | None,
                 source: str):
        self.layers = layers
        self.sample_rate = sample_rate
        self.source = source
        self.features = LogMelEmbedding(n_mels=layers[0][0].shape[1])

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        x = to_mono(audio)
        rate = sample_rate
        if self.sample_rate is not None:
            x, rate = resample(x[None], sample_rate, self.sample_rate)[0].astype(np.float64), self.sample_rate
        h = self.features.embed(x, rate)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h


def _load_mlp(path: Path) -> MLPEmbedding:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        names = set(fh.keys())
        meta = fh.metadata() or {}
        layers = []
        i = 0
        while f"layers.{i}.weight" in names:
            w = np.asarray(fh.get_tensor(f"layers.{i}.weight"), dtype=np.float64)
            b_name = f"layers.{i}.bias"
            b = (np.asarray(fh.get_tensor(b_name), dtype=np.float64) if b_name in names
                 else np.zeros(w.shape[0]))
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"{path}: layers.{i} has weight {w.shape} and bias {b.shape}; "
                                 "expected (out, in) and (out,)")
            if layers and layers[-1][0].shape[0] != w.shape[1]:
                raise ValueError(f"{path}: layers.{i}.weight takes {w.shape[1]} inputs but "
                                 f"layers.{i - 1} gives {layers[-1][0].shape[0]}")
            layers.append((w, b))
            i += 1
    if not layers:
        raise ValueError(f"{path}: no 'layers.0.weight' tensor; a safetensors embedding is a "
                         "frame-wise MLP over log-mel frames (see calibration.quality.MLPEmbedding)")
    rate = meta.get("sample_rate")
    return MLPEmbedding(layers, sample_rate=int(rate) if rate else None, source=str(path))


def load_embedding_model(path: str | os.PathLike) -> EmbeddingModel:
    """A user's embedding model from a local file: TorchScript (``.pt``, ``.ts``, ``.jit``) or
    safetensors (``.safetensors``, a frame-wise MLP over log-mel frames). Never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding model file not found (only local files are read)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_mlp(path)
    if suffix in (".pt", ".ts", ".jit", ".pth"):
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a TorchScript archive ({exc}); save the model with "
                             "torch.jit.script(model).save(path)") from None
        return TorchScriptEmbedding(module.eval(), source=str(path))
    raise ValueError(f"{path}: unknown embedding file type {suffix!r}; use a TorchScript file "
                     "(.pt/.ts) or safetensors (.safetensors)")


# --- ViSQOL ------------------------------------------------------------------------------------


def visqol_unavailable() -> str | None:
    """None when the ``visqol`` package (visqol-python) imports, else the reason it cannot run."""
    try:
        import visqol  # noqa: F401
    except ImportError as exc:
        return f"ViSQOL unavailable: the 'visqol' package does not import ({exc}); pip install visqol-python"
    return None


def visqol(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> dict:
    """ViSQOL (audio mode, 48 kHz) MOS-LQO of ``test`` against ``reference``.

    Returns ``{"status": "ok", "moslqo": float}`` or ``{"status": "unavailable", "reason": ...}``.
    """
    reason = visqol_unavailable()
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    import soundfile
    from visqol import VisqolApi

    api = VisqolApi()
    api.create(mode="audio")
    with tempfile.TemporaryDirectory(prefix="visqol-") as tmp:
        paths = []
        for name, audio in (("reference.wav", reference), ("test.wav", test)):
            p = Path(tmp) / name
            soundfile.write(p, resample(to_mono(audio)[None], sample_rate, VISQOL_AUDIO_RATE)[0],
                            VISQOL_AUDIO_RATE, subtype="FLOAT")
            paths.append(str(p))
        result = api.measure(*paths)
    return {"status": "ok", "moslqo": float(result.moslqo)}


def quality_summary(reference_clips: Sequence[np.ndarray], test_clips: Sequence[np.ndarray],
                    sample_rate: int, *, model: EmbeddingModel | None = None) -> dict:
    """Log-mel Fréchet distance, the user's embedding's (when given) and ViSQOL's status, as JSON."""
    out = {"log_mel_frechet": log_mel_frechet(reference_clips, test_clips, sample_rate)}
    if model is not None:
        out["embedding_frechet"] = audio_frechet(reference_clips, test_clips, sample_rate, model=model)
    reason = visqol_unavailable()
    if reason is None:
        scores = [visqol(r, t, sample_rate)["moslqo"] for r, t in zip(reference_clips, test_clips)]
        out["visqol"] = {"status": "ok", "moslqo_mean": float(np.mean(scores))}
    else:
        out["visqol"] = {"status": "unavailable", "reason": reason}
    return out
