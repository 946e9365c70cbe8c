"""The Oobleck VAE of Stable Audio Open (stable-audio-tools ``models/autoencoders.py``).

Module paths and parameter names follow stable-audio-tools exactly, so the autoencoder half of a
Stable Audio Open checkpoint loads after stripping ``pretransform.model.`` and nothing else:

* ``encoder.layers``: [WN-Conv1d(k7), EncoderBlock × len(strides), SnakeBeta, WN-Conv1d(k3)]
* ``decoder.layers``: [WN-Conv1d(k7), DecoderBlock × len(strides), SnakeBeta, WN-Conv1d(k7, no
  bias), Tanh or Identity]
* ``EncoderBlock.layers``: ResidualUnit(d=1, 3, 9), SnakeBeta, WN-Conv1d(2s, stride s, pad ceil(s/2))
* ``DecoderBlock.layers``: SnakeBeta, WN-ConvTranspose1d(2s, stride s, pad ceil(s/2)), ResidualUnit × 3
* ``ResidualUnit.layers``: SnakeBeta, WN-Conv1d(k7, dilation d), SnakeBeta, WN-Conv1d(k1); plus skip

Weight norm is the legacy ``torch.nn.utils.weight_norm`` form (``weight_g`` / ``weight_v``, norm over
every dim but 0), written out here because torch's parametrization API stores other names. Snake
keeps α and β as logs (``alpha_logscale=True``).

The bottleneck is the VAE one: the encoder emits ``2 * latent_dim`` channels, ``mean, scale =
chunk(2)``, ``std = softplus(scale) + 1e-4``; deployment uses the mean.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.checkpoint_errors import CheckpointError, check_state_dict
from toolkit.config import register, require

# Added to softplus(scale) in the VAE bottleneck (stable-audio-tools ``vae_sample``).
STD_FLOOR = 1e-4
# Added to exp(β) before the reciprocal in SnakeBeta (stable-audio-tools ``snake_beta``).
SNAKE_EPS = 1e-9
# Dilations of the three residual units in every encoder / decoder block.
RESIDUAL_DILATIONS = (1, 3, 9)
# Key prefix of the autoencoder inside a full Stable Audio Open checkpoint.
SAO_PREFIX = "pretransform.model."


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@register
@dataclasses.dataclass(frozen=True)
class OobleckConfig:
    """Shape of an Oobleck VAE. ``latent_dim`` is the decoder's input; the encoder emits twice that
    (mean and scale halves). Encoder and decoder share ``channels``, ``c_mults`` and ``strides``."""

    TYPE: ClassVar[str] = "oobleck"
    VERSION: ClassVar[int] = 1

    audio_channels: int
    channels: int
    c_mults: tuple[int, ...]
    strides: tuple[int, ...]
    latent_dim: int
    sample_rate: int
    final_tanh: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("audio_channels", "channels", "latent_dim", "sample_rate"):
            value = getattr(self, field)
            require(_is_positive_int(value), name, field, f"must be a positive int, got {value!r}")
        for field in ("c_mults", "strides"):
            value = getattr(self, field)
            require(
                isinstance(value, tuple) and len(value) > 0,
                name,
                field,
                f"must be a non-empty tuple of ints, got {value!r}",
            )
            require(
                all(_is_positive_int(v) for v in value),
                name,
                field,
                f"every entry must be a positive int, got {value!r}",
            )
        require(
            len(self.c_mults) == len(self.strides),
            name,
            "strides",
            f"needs one stride per c_mult: {len(self.c_mults)} c_mults, {len(self.strides)} strides",
        )
        # Kernel 2s with padding ceil(s/2) maps L -> L/s and back to L*s only for even s.
        require(
            all(s % 2 == 0 for s in self.strides),
            name,
            "strides",
            f"every stride must be even (kernel 2s, padding ceil(s/2) keeps lengths exact only then), "
            f"got {self.strides!r}",
        )
        require(
            isinstance(self.final_tanh, bool),
            name,
            "final_tanh",
            f"must be a bool, got {self.final_tanh!r}",
        )

    @property
    def downsampling(self) -> int:
        """Audio samples per latent frame."""
        return math.prod(self.strides)

    @property
    def latent_rate_hz(self) -> float:
        return self.sample_rate / self.downsampling


OOBLECK_PRESETS: dict[str, OobleckConfig] = {
    # Stable Audio Open 1.0: 2048x downsampling, ~156 M parameters.
    "sao": OobleckConfig(
        audio_channels=2,
        channels=128,
        c_mults=(1, 2, 4, 8, 16),
        strides=(2, 4, 4, 8, 8),
        latent_dim=64,
        sample_rate=44100,
        final_tanh=False,
    ),
    # Small enough to train on this CPU in minutes: mono 2 kHz (the pitch range that chroma and
    # chord agreement look at), 32x downsampling, so 62.5 latent frames per second.
    "demo": OobleckConfig(
        audio_channels=1,
        channels=16,
        c_mults=(1, 2, 4, 8),
        strides=(2, 2, 2, 4),
        latent_dim=16,
        sample_rate=2000,
        final_tanh=False,
    ),
    # For unit tests: 8x downsampling.
    "tiny": OobleckConfig(
        audio_channels=1,
        channels=4,
        c_mults=(1, 2),
        strides=(2, 4),
        latent_dim=4,
        sample_rate=8000,
        final_tanh=False,
    ),
}


# ---------------------------------------------------------------------------------------------
# Building blocks (training / checkpoint form)
# ---------------------------------------------------------------------------------------------


def _weight_from_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """Legacy weight norm with dim=0: w = g · v / ‖v‖, the norm taken over every dim but 0."""
    norm = torch.linalg.vector_norm(weight_v, dim=tuple(range(1, weight_v.dim())), keepdim=True)
    return weight_v * (weight_g / norm)


def _snake_coefficients(
    log_alpha: torch.Tensor, log_beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(α), 1 / (exp(β) + eps)) shaped [1, C, 1]; shared by the live and the folded Snake so
    both compute bit-identical values."""
    alpha = torch.exp(log_alpha)[None, :, None]
    inv_beta = torch.reciprocal(torch.exp(log_beta)[None, :, None] + SNAKE_EPS)
    return alpha, inv_beta


def _snake(x: torch.Tensor, alpha: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    return x + inv_beta * torch.sin(x * alpha).pow(2)


class SnakeBeta(nn.Module):
    """x + 1/β · sin²(αx), per channel, with ``alpha`` and ``beta`` ([C]) stored as logs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Zero logs: α = β = 1 at init, as upstream.
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, inv_beta = _snake_coefficients(self.alpha, self.beta)
        return _snake(x, alpha, inv_beta)


class WNConv1d(nn.Module):
    """Conv1d with legacy weight norm: parameters ``bias`` (optional), ``weight_g`` [out,1,1] and
    ``weight_v`` [out,in,k]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        # Borrow torch's default Conv1d initialisation, then split it into g and v.
        ref = nn.Conv1d(in_channels, out_channels, kernel_size, bias=bias)
        self.bias = nn.Parameter(ref.bias.detach()) if bias else None
        weight_v = ref.weight.detach()
        self.weight_g = nn.Parameter(
            torch.linalg.vector_norm(weight_v, dim=(1, 2), keepdim=True)
        )
        self.weight_v = nn.Parameter(weight_v)

    def weight(self) -> torch.Tensor:
        return _weight_from_norm(self.weight_g, self.weight_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(
            x, self.weight(), self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    def folded(self) -> nn.Conv1d:
        """A plain Conv1d holding the normalised weight."""
        out_channels, in_channels, kernel_size = self.weight_v.shape
        conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device="meta",
        )
        conv.weight = nn.Parameter(self.weight().detach().clone(), requires_grad=False)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return conv


class WNConvTranspose1d(nn.Module):
    """ConvTranspose1d with legacy weight norm: ``bias`` [out], ``weight_g`` [in,1,1], ``weight_v``
    [in,out,k] (a transposed conv stores its weight input-channel first)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        ref = nn.ConvTranspose1d(in_channels, out_channels, kernel_size)
        self.bias = nn.Parameter(ref.bias.detach())
        weight_v = ref.weight.detach()
        self.weight_g = nn.Parameter(
            torch.linalg.vector_norm(weight_v, dim=(1, 2), keepdim=True)
        )
        self.weight_v = nn.Parameter(weight_v)

    def weight(self) -> torch.Tensor:
        return _weight_from_norm(self.weight_g, self.weight_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)

    def folded(self) -> nn.ConvTranspose1d:
        in_channels, out_channels, kernel_size = self.weight_v.shape
        conv = nn.ConvTranspose1d(
            in_channels,
            out_channels,
            kernel_size,
            stride=self.stride,
            padding=self.padding,
            device="meta",
        )
        conv.weight = nn.Parameter(self.weight().detach().clone(), requires_grad=False)
        conv.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return conv


class ResidualUnit(nn.Module):
    """Snake → WN-Conv1d(k7, dilation d) → Snake → WN-Conv1d(k1), plus the input."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(channels),
            WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(channels),
            WNConv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class EncoderBlock(nn.Module):
    """Three residual units at ``in_channels``, then a strided conv down by ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(ResidualUnit(in_channels, d) for d in RESIDUAL_DILATIONS),
            SnakeBeta(in_channels),
            WNConv1d(
                in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderBlock(nn.Module):
    """A transposed conv up by ``stride``, then three residual units at ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(in_channels),
            WNConvTranspose1d(
                in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)
            ),
            *(ResidualUnit(out_channels, d) for d in RESIDUAL_DILATIONS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _block_channels(config: OobleckConfig) -> list[int]:
    # Upstream prepends 1 to c_mults: the stem conv outputs `channels`, block i maps
    # widths[i] -> widths[i + 1].
    return [config.channels * m for m in (1, *config.c_mults)]


class OobleckEncoder(nn.Module):
    """Audio (B, audio_channels, L) → (B, 2·latent_dim, L / downsampling): mean and scale halves."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        widths = _block_channels(config)
        self.layers = nn.Sequential(
            WNConv1d(config.audio_channels, widths[0], 7, padding=3),
            *(
                EncoderBlock(widths[i], widths[i + 1], stride)
                for i, stride in enumerate(config.strides)
            ),
            SnakeBeta(widths[-1]),
            WNConv1d(widths[-1], 2 * config.latent_dim, 3, padding=1),
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.layers(audio)


class OobleckDecoder(nn.Module):
    """Latent (B, latent_dim, T) → audio (B, audio_channels, T · downsampling)."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        widths = _block_channels(config)
        n = len(config.strides)
        self.layers = nn.Sequential(
            WNConv1d(config.latent_dim, widths[-1], 7, padding=3),
            *(DecoderBlock(widths[i], widths[i - 1], config.strides[i - 1]) for i in range(n, 0, -1)),
            SnakeBeta(widths[0]),
            WNConv1d(widths[0], config.audio_channels, 7, padding=3, bias=False),
            nn.Tanh() if config.final_tanh else nn.Identity(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent)


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------


def latent_std(scale: torch.Tensor) -> torch.Tensor:
    """The posterior standard deviation from the encoder's raw scale half."""
    return F.softplus(scale) + STD_FLOOR


def vae_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL term as stable-audio-tools computes it: Σ_channels (μ² + σ² − log σ² − 1), averaged over
    batch and frames (twice the textbook KL to N(0, I); loss weights tuned upstream assume this)."""
    var = std * std
    return (mean * mean + var - torch.log(var) - 1).sum(1).mean()


@dataclasses.dataclass
class OobleckOutput:
    """What a training step needs: the reconstruction, the latent it came from and the KL term."""

    reconstruction: torch.Tensor
    latent: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kl: torch.Tensor


class OobleckVAE(nn.Module):
    """Encoder + VAE bottleneck + decoder. Audio is (B, C, samples), latents are
    (B, latent_dim, samples // downsampling); inputs must already have those shapes."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = OobleckEncoder(config)
        self.decoder = OobleckDecoder(config)

    def _check_audio(self, audio: torch.Tensor) -> None:
        c = self.config
        if audio.dim() != 3 or audio.shape[1] != c.audio_channels:
            raise ValueError(
                f"audio must be (batch, {c.audio_channels}, samples), got {tuple(audio.shape)}"
            )
        if audio.shape[-1] % c.downsampling != 0:
            raise ValueError(
                f"audio length {audio.shape[-1]} is not a multiple of the downsampling factor "
                f"{c.downsampling}; pad or crop it first"
            )

    def encode(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale): the posterior mean and the raw scale (std = softplus(scale) + 1e-4)."""
        self._check_audio(audio)
        mean, scale = self.encoder(audio).chunk(2, dim=1)
        return mean, scale

    def encode_latent(
        self,
        audio: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The latent for ``audio``: the posterior mean (deployment), or a draw when ``sample``."""
        mean, scale = self.encode(audio)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + noise * latent_std(scale)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        c = self.config
        if latent.dim() != 3 or latent.shape[1] != c.latent_dim:
            raise ValueError(
                f"latent must be (batch, {c.latent_dim}, frames), got {tuple(latent.shape)}"
            )
        return self.decoder(latent)

    def forward(
        self, audio: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> OobleckOutput:
        """Training helper: encode, draw a latent (or take the mean), decode, and the KL term."""
        mean, scale = self.encode(audio)
        std = latent_std(scale)
        latent = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            latent = mean + noise * std
        return OobleckOutput(
            reconstruction=self.decoder(latent), latent=latent, mean=mean, std=std, kl=vae_kl(mean, std)
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Export form
# ---------------------------------------------------------------------------------------------


class FoldedSnakeBeta(nn.Module):
    """Snake with exp(α) and 1/(exp(β)+eps) precomputed as [1, C, 1] buffers, so an exported graph
    has no ``exp``/``reciprocal`` left outside the delegate."""

    def __init__(self, alpha: torch.Tensor, inv_beta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("alpha", alpha)
        self.register_buffer("inv_beta", inv_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _snake(x, self.alpha, self.inv_beta)


def _folded(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (WNConv1d, WNConvTranspose1d)):
        return module.folded()
    if isinstance(module, SnakeBeta):
        with torch.no_grad():
            alpha, inv_beta = _snake_coefficients(module.alpha, module.beta)
        return FoldedSnakeBeta(alpha.clone(), inv_beta.clone())
    return None


def fold_for_export(vae: OobleckVAE) -> OobleckVAE:
    """A copy of ``vae`` in eval mode with weight norm folded into plain Conv1d / ConvTranspose1d
    weights and Snake's exponentials precomputed. Its output equals the original's; its state dict
    no longer matches a checkpoint (``weight`` instead of ``weight_g``/``weight_v``)."""
    folded = copy.deepcopy(vae)
    # Collect first: replacing while iterating named_modules would visit the new children.
    targets = [
        (name, module)
        for name, module in folded.named_modules()
        if isinstance(module, (WNConv1d, WNConvTranspose1d, SnakeBeta))
    ]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, child_name, _folded(module))
    folded.eval()
    folded.requires_grad_(False)
    return folded


# ---------------------------------------------------------------------------------------------
# Loading Stable Audio Open weights
# ---------------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> Mapping[str, object]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error type for bad headers / sizes
            raise CheckpointError(
                f"{path}: cannot read safetensors file ({type(exc).__name__}: {exc}); "
                "it is truncated or not a safetensors file"
            ) from exc
    if suffix in (".ckpt", ".pt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip, pickle and EOF errors all mean the same to a caller
            raise CheckpointError(
                f"{path}: cannot read torch checkpoint ({type(exc).__name__}: {exc}); "
                "it is truncated, not a torch file, or holds objects other than tensors"
            ) from exc
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{path}: expected a dict of tensors (or {{'state_dict': ...}}), got {type(data).__name__}"
            )
        return data
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or .ckpt"
    )


def _autoencoder_state(raw: Mapping[str, object], *, source: str) -> dict[str, torch.Tensor]:
    if any(key.startswith(SAO_PREFIX) for key in raw):
        # A full Stable Audio Open checkpoint: keep the autoencoder, ignore the diffusion model
        # and the conditioners.
        state = {k[len(SAO_PREFIX):]: v for k, v in raw.items() if k.startswith(SAO_PREFIX)}
    elif any(key.startswith(("encoder.", "decoder.")) for key in raw):
        # A bare autoencoder: every key must belong to it (check_state_dict rejects strays).
        state = dict(raw)
    else:
        sample = sorted(raw)[:3]
        raise CheckpointError(
            f"{source}: no autoencoder tensors found (expected keys under '{SAO_PREFIX}encoder.' "
            f"or 'encoder.'); first keys are {sample}"
        )
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{name}' is a {type(value).__name__}, not a tensor")
    return state  # type: ignore[return-value]


def load_sao_autoencoder(
    path: str | Path,
    config: OobleckConfig = OOBLECK_PRESETS["sao"],
    *,
    dtype: torch.dtype = torch.float32,
) -> OobleckVAE:
    """Load the Oobleck autoencoder from a Stable Audio Open ``model.safetensors`` / ``model.ckpt``
    (keys under ``pretransform.model.``) or a bare autoencoder file (``encoder.*``/``decoder.*``).

    Every tensor is checked against ``config`` (names, shapes, ``dtype``, finiteness) before
    loading; any mismatch raises :class:`CheckpointError` naming the tensor and the file. The model
    is returned in eval mode on the CPU.
    """
    path = Path(path)
    source = str(path)
    state = _autoencoder_state(_read_tensors(path), source=source)
    # Build on the meta device and take the file's tensors as parameters: no random init, no copy.
    with torch.device("meta"):
        vae = OobleckVAE(config).to(dtype)
    check_state_dict(vae, state, source=source)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()
