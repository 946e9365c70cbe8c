"""The SoftAlign U-Net of seed 000: a vocal-conditioned latent denoiser with soft alignment attention.

Latents (B, C, L) → levels (64, L) → (128, L/2) → (256, L/4) → (512, L/8) in the ``paper`` config
(seed 000 §IV-A). Each down/up block is GroupNorm → SiLU → FiLM (from the timestep embedding) →
Conv1d, with skip connections between mirrored levels. The bottleneck holds the soft alignment
attention (§IV-B): local attention inside sliding windows of 16 from convolutional projections
(eq. 1), global attention with RoPE (eq. 2), mixed as √ᾱ_t · global + (1 − √ᾱ_t) · local (eq. 3).
Vocal conditioning is dual-stream (Fig. 2): the vocal latent is concatenated with the noisy latent
at the input, and a vocal encoder's features enter through cross-attention at several stages.

Attention is written as explicit ``softmax(q kᵀ · s) v`` rather than ``scaled_dot_product_attention``
so that it lowers to XNNPACK as one delegate (NOTES.md).

Length. ``SoftAlignConfig.latent_length`` is the training length (checkpoint metadata); the network
runs at any length that is a multiple of its downsampling factor 2^(levels−1): RoPE tables are made
for the length in use, the local window (eq. 1) is computed blockwise in O(L·w), and cross-attention
has no length-bound state. Beyond the training length the global attention (eq. 2) may run as
LiteFocus (seed 002, ``toolkit.models.litefocus``): ``forward(..., comp_idx, litefocus=cfg)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import register, require
from toolkit.diffusion import CosineSchedule, alpha_sigma
from toolkit.models.litefocus import LiteFocusConfig, band_attention, band_bias, litefocus_attention


@register
@dataclass(frozen=True)
class SoftAlignConfig:
    """Shape and width of a SoftAlign U-Net. ``channels[i]`` is level i's width; length halves per level."""

    TYPE = "softalign_unet"
    VERSION = 1

    latent_channels: int = 64
    latent_length: int = 1024  # the training length; the model runs at any multiple of `downsampling`
    channels: tuple[int, ...] = (64, 128, 256, 512)
    res_blocks: int = 1  # residual blocks per level on the way down
    up_res_blocks: int = 1  # residual blocks per level on the way up (the first takes the skip)
    mid_res_blocks: int = 1  # residual blocks in the bottleneck, before the soft alignment attention
    head_dim: int = 64  # seed 000 §IV-C: 8 heads of 64 dims at the 512-wide bottleneck
    window: int = 16  # seed 000 §IV-B: local attention window
    cross_attn_levels: tuple[int, ...] = (2, 3)  # levels whose blocks cross-attend to the vocal
    time_embed_dim: int = 256
    groups: int = 32
    rope_base: float = 10000.0
    schedule_offset: float = 0.008  # the cosine schedule's s, for √ᾱ_t in eq. 3

    def __post_init__(self) -> None:
        n = "SoftAlignConfig"
        require(self.latent_channels > 0, n, "latent_channels", "must be positive")
        require(len(self.channels) >= 2, n, "channels", "needs at least two levels")
        require(all(c > 0 for c in self.channels), n, "channels", "widths must be positive")
        down = 2 ** (len(self.channels) - 1)
        require(
            self.latent_length % down == 0,
            n,
            "latent_length",
            f"{self.latent_length} must be divisible by 2^(levels-1) = {down}",
        )
        for c in self.channels:
            require(c % self.groups == 0, n, "groups", f"{self.groups} must divide every width ({c})")
        require(self.res_blocks >= 1, n, "res_blocks", "must be at least 1")
        require(self.up_res_blocks >= 1, n, "up_res_blocks", "must be at least 1")
        require(self.mid_res_blocks >= 0, n, "mid_res_blocks", "must be non-negative")
        require(self.head_dim > 0 and self.head_dim % 2 == 0, n, "head_dim", "must be even (RoPE)")
        for level in self.cross_attn_levels:
            require(0 <= level < len(self.channels), n, "cross_attn_levels", f"no level {level}")
            require(self.channels[level] % self.head_dim == 0, n, "head_dim",
                    f"must divide the width of cross-attention level {level}")
        require(self.channels[-1] % self.head_dim == 0, n, "head_dim",
                "must divide the bottleneck width")
        require(1 <= self.window <= self.bottleneck_length, n, "window",
                f"must be in [1, bottleneck length {self.bottleneck_length}]")
        require(self.time_embed_dim > 0, n, "time_embed_dim", "must be positive")

    @property
    def downsampling(self) -> int:
        """Latent frames per bottleneck frame: lengths the network accepts are multiples of it."""
        return 2 ** (len(self.channels) - 1)

    @property
    def bottleneck_length(self) -> int:
        """Bottleneck frames at the training length (where the global attention runs)."""
        return self.latent_length // self.downsampling

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.latent_channels, self.latent_length)


SOFTALIGN_PRESETS: dict[str, SoftAlignConfig] = {
    "paper": SoftAlignConfig(),
    # The demo model trained on this CPU: 16-channel latents of the 32x demo VAE (2.048 s at 2 kHz).
    "demo": SoftAlignConfig(
        latent_channels=16, latent_length=128, channels=(32, 64, 128), head_dim=32, window=8,
        cross_attn_levels=(1, 2), time_embed_dim=128, groups=16,
    ),
    # For tests: a few thousand parameters, two levels.
    "tiny": SoftAlignConfig(
        latent_channels=4, latent_length=16, channels=(8, 16), head_dim=8, window=4,
        cross_attn_levels=(1,), time_embed_dim=8, groups=4,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled to the 0..1000 range of DDPM embeddings)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.to(torch.float32) * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FiLMResBlock(nn.Module):
    """GroupNorm → SiLU → Conv1d, then GroupNorm → FiLM(γ, β from the time embedding) → SiLU → Conv1d."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)  # FiLM (Perez et al.): per-channel scale and shift
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        gamma, beta = self.film(emb)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + gamma) + beta
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, H·D, L) → (B, H, L, D)."""
    b, c, length = x.shape
    return x.reshape(b, n_heads, c // n_heads, length).transpose(2, 3)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) → (B, H·D, L)."""
    b, h, length, d = x.shape
    return x.transpose(2, 3).reshape(b, h * d, length)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
    """softmax(q kᵀ / √d + bias) v, written out so that it exports to delegable matmuls."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def rope_tables(length: int, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, D) of rotary position embeddings (Su et al.), rotate-half layout."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def local_window_bias(length: int, window: int) -> torch.Tensor:
    """Additive mask for eq. 1's W(i): the ``window`` positions j ∈ [i − ⌊w/2⌋, i + ⌈w/2⌉ − 1].

    The dense O(L²) reference of ``band_attention``; the model no longer builds it.
    """
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    inside = (j >= i - window // 2) & (j < i - window // 2 + window)
    return torch.where(inside, 0.0, float("-inf"))


class SoftAlignAttention(nn.Module):
    """Seed 000 §IV-B: Context = √ᾱ_t · GlobalAttn + (1 − √ᾱ_t) · LocalAttn (eq. 3).

    Q, K, V come from one convolutional projection (kernel 3) shared by both branches; LocalAttn
    (eq. 1) attends inside a sliding window of ``window`` frames, computed blockwise (O(L·w));
    GlobalAttn (eq. 2) attends over the whole sequence with RoPE applied to Q and K, or, when a
    LiteFocus config is given and the sequence is longer than ``length`` (the training length),
    over each query's focus set (seed 002 eqs. 1–6) with C = ``comp_idx``.
    """

    def __init__(self, channels: int, length: int, head_dim: int, window: int, groups: int,
                 rope_base: float):
        super().__init__()
        self.n_heads = channels // head_dim
        self.head_dim = head_dim
        self.length = length
        self.window = window
        self.rope_base = rope_base
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 3, padding=1)
        self.proj = nn.Conv1d(channels, channels, 1)
        cos, sin = rope_tables(length, head_dim, rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # eq. 1's window as the blockwise band's additive bias (O(L·w) entries, not L²)
        self.register_buffer("local_bias", band_bias(length, window // 2, window - window // 2 - 1),
                             persistent=False)
        # RoPE tables and window biases of other lengths, made on first use (``prepare_length``
        # before torch.export makes them constants of the graph rather than traced ops).
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bias_cache: dict[int, torch.Tensor] = {}

    def local_window(self, length: int) -> torch.Tensor:
        """The local branch's band bias for ``length`` frames."""
        if length == self.length:
            return self.local_bias
        if length not in self._bias_cache:
            w = self.window
            self._bias_cache[length] = band_bias(length, w // 2, w - w // 2 - 1)
        return self._bias_cache[length]

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for ``length`` frames (the first rows of every longer table are equal)."""
        if length == self.rope_cos.shape[0]:
            return self.rope_cos, self.rope_sin
        if length not in self._rope_cache:
            self._rope_cache[length] = rope_tables(length, self.head_dim, self.rope_base)
        return self._rope_cache[length]

    def branches(
        self,
        x: torch.Tensor,
        comp_idx: torch.Tensor | None = None,
        *,
        litefocus: LiteFocusConfig | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two contexts before mixing, (global, local), each (B, C, L)."""
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (_heads(a, self.n_heads) for a in (q, k, v))
        w = self.window
        local = band_attention(q, k, v, lo=w // 2, hi=w - w // 2 - 1,  # eq. 1, W(i) as local_window_bias
                               bias=self.local_window(q.shape[2]).to(q.dtype))
        cos, sin = self.rope(q.shape[2])
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if litefocus is None or q.shape[2] <= self.length:
            glob = attention(qr, kr, v)  # eq. 2: dense up to the training length
        else:
            if comp_idx is None:
                raise ValueError("LiteFocus beyond the training length needs the compensation indices "
                                 "(toolkit.models.litefocus.compensation_indices)")
            band = self.length // 2 if litefocus.band is None else litefocus.band
            glob = litefocus_attention(qr, kr, v, comp_idx, band=band, lags=litefocus.lags,
                                       structured=litefocus.structured)
        return _merge(glob), _merge(local)

    def forward(
        self,
        x: torch.Tensor,
        sqrt_alpha_bar: torch.Tensor,
        comp_idx: torch.Tensor | None = None,
        *,
        litefocus: LiteFocusConfig | None = None,
    ) -> torch.Tensor:
        glob, local = self.branches(x, comp_idx, litefocus=litefocus)
        w = sqrt_alpha_bar[:, None, None]
        context = w * glob + (1 - w) * local  # eq. 3
        return x + self.proj(context)


class CrossAttention(nn.Module):
    """Queries from the denoiser's features, keys/values from the vocal encoder's at that level."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.n_heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.norm_cond = nn.GroupNorm(groups, channels)
        self.q = nn.Conv1d(channels, channels, 1)
        self.kv = nn.Conv1d(channels, 2 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        q = _heads(self.q(self.norm(x)), self.n_heads)
        k, v = self.kv(self.norm_cond(cond)).chunk(2, dim=1)
        out = attention(q, _heads(k, self.n_heads), _heads(v, self.n_heads))
        return x + self.proj(_merge(out))


class VocalEncoder(nn.Module):
    """The conditioning stream: vocal latent → features at every level's width and length."""

    def __init__(self, cfg: SoftAlignConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv1d(cfg.latent_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(1, len(ch)):
            self.blocks.append(nn.Sequential(
                nn.GroupNorm(cfg.groups, ch[i - 1]), nn.SiLU(),
                nn.Conv1d(ch[i - 1], ch[i], 4, stride=2, padding=1),
            ))

    def forward(self, vocal: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.conv_in(vocal)]
        for block in self.blocks:
            feats.append(block(feats[-1]))
        return feats


class Level(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_blocks: int, cfg: SoftAlignConfig, cross: bool):
        super().__init__()
        self.res = nn.ModuleList(
            FiLMResBlock(c_in if i == 0 else c_out, c_out, cfg.time_embed_dim, cfg.groups)
            for i in range(n_blocks)
        )
        self.cross = CrossAttention(c_out, cfg.head_dim, cfg.groups) if cross else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x, emb)
        if self.cross is not None:
            x = self.cross(x, cond)
        return x


class SoftAlignUNet(nn.Module):
    """``forward(x, t, cond) -> v``: x the noisy accompaniment latent, t ∈ [0, 1], cond the vocal latent.

    The null conditioning of classifier-free guidance is an all-zero vocal latent.
    """

    def __init__(self, cfg: SoftAlignConfig):
        super().__init__()
        self.config = cfg
        self.schedule = CosineSchedule(offset=cfg.schedule_offset)
        ch, n = cfg.channels, len(cfg.channels)
        e = cfg.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.vocal = VocalEncoder(cfg)
        # Input stream of the dual conditioning: [noisy latent ‖ vocal latent] (Fig. 2).
        self.conv_in = nn.Conv1d(2 * cfg.latent_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i in range(n):
            self.down.append(Level(ch[i - 1] if i else ch[0], ch[i], cfg.res_blocks, cfg,
                                   i in cfg.cross_attn_levels))
            if i < n - 1:
                self.downsample.append(nn.Conv1d(ch[i], ch[i], 4, stride=2, padding=1))
        self.mid = nn.ModuleList(
            FiLMResBlock(ch[-1], ch[-1], e, cfg.groups) for _ in range(cfg.mid_res_blocks)
        )
        self.attn = SoftAlignAttention(ch[-1], cfg.bottleneck_length, cfg.head_dim, cfg.window,
                                       cfg.groups, cfg.rope_base)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(n)):
            self.up.append(Level(2 * ch[i], ch[i], cfg.up_res_blocks, cfg,
                                 i in cfg.cross_attn_levels))
            if i > 0:
                self.upsample.append(nn.Conv1d(ch[i], ch[i - 1], 3, padding=1))
        self.norm_out = nn.GroupNorm(cfg.groups, ch[0])
        self.conv_out = nn.Conv1d(ch[0], cfg.latent_channels, 3, padding=1)

    def check_length(self, length: int) -> None:
        """Raise unless the network runs at ``length`` latent frames (a multiple of its downsampling)."""
        down = self.config.downsampling
        if length < down or length % down:
            raise ValueError(f"SoftAlignUNet runs at latent lengths that are multiples of {down}; "
                             f"got {length} (pad the latent)")

    def prepare_length(self, length: int) -> None:
        """Make the RoPE table for ``length`` now, so that torch.export sees it as a constant."""
        self.check_length(length)
        self.attn.rope(length // self.config.downsampling)
        self.attn.local_window(length // self.config.downsampling)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        comp_idx: torch.Tensor | None = None,
        *,
        litefocus: LiteFocusConfig | None = None,
    ) -> torch.Tensor:
        """v̂ for the noisy latent ``x`` (B, D, L) at any length L that is a multiple of the downsampling.

        ``litefocus``: run the global attention as LiteFocus when the bottleneck is longer than at
        the training length; ``comp_idx`` is then its compensation set C (int64 bottleneck-frame
        indices, e.g. ``compensation_indices(L // downsampling, r, seed=..., call=step)``).
        """
        cfg = self.config
        if x.dim() != 3 or x.shape[1] != cfg.latent_channels or cond.shape != x.shape:
            raise ValueError(
                f"SoftAlignUNet expects x and cond shaped (B, {cfg.latent_channels}, L) alike "
                f"(L a multiple of {cfg.downsampling}; {cfg.latent_length} in training); got "
                f"{tuple(x.shape)} and {tuple(cond.shape)}"
            )
        self.check_length(x.shape[2])
        emb = self.time_mlp(timestep_embedding(t, cfg.time_embed_dim))
        sqrt_alpha_bar, _ = alpha_sigma(t.to(torch.float32), self.schedule)
        vocal = self.vocal(cond)
        h = self.conv_in(torch.cat([x, cond], dim=1))
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, vocal[i])
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, emb)
        h = self.attn(h, sqrt_alpha_bar, comp_idx, litefocus=litefocus)
        n = len(cfg.channels)
        for j, level in enumerate(self.up):
            i = n - 1 - j
            h = level(torch.cat([h, skips[i]], dim=1), emb, vocal[i])
            if i > 0:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
