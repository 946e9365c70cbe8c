"""LiteFocus (seed 002): sparse self-attention for audio longer than the model's training clips.

Each query i attends only to its focus set F_i = S_i ∪ C (eq. 4), with one softmax over it (eq. 1,
keys and values gathered by eqs. 2–3): S_i a structured set, C a random compensation set of
⌊r · N⌋ keys (eq. 6) shared by every query, head and batch row of one attention call. The keys of
F_i are gathered (index_select, slices, a blockwise band); nothing here builds an N × N mask, which
would cost as much as dense attention.

Two structured sets:

* ``litefocus_grid_attention``: the paper's literal form for 2-D (time × frequency) token grids,
  S_i = every token in the same frequency row (eq. 5). Tokens are flattened time-major,
  i = t · n_freq + f, so eq. 5 reads S_i = {j : j mod n_freq = i mod n_freq} (the paper writes the
  flattening as i = a · N_t + b; the set is the same: one frequency coordinate, every time).
* ``litefocus_attention``: 1-D latents (SoftAlign), where tokens are time frames and the latent
  channels are features mixed by every projection, so eq. 5 has no literal counterpart. The paper
  chose S_i from where its attention maps put their mass (§3.2, Fig. 2: repeating stripes of the
  same frequency). Here S_i = a band of ±``band`` frames around i (the diagonal band that attention
  over time frames concentrates on; `toolkit attention-maps` reports how much of the mass it
  holds), plus optional periodic ``lags`` {i ± p} (e.g. beat or bar lags, the 1-D analogue of the
  paper's equidistant stripes). This is a departure from the paper: its S_i spans the whole time
  axis of one frequency row, ours is local in time.

Also departures, on purpose: F_i is a set union (eq. 4), so a compensation key that is already in
S_i is dropped from C for that query (the authors' code counts it twice; with the union, r = 1 is
exactly dense attention); and C is drawn from a counter-based hash of (seed, call) instead of an
unseeded ``randperm``, so that a device's numpy or C++ sampler draws the same indices and passes
them to a compiled graph as an input (static shapes, no random op in the graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime_py.compensation import (  # noqa: F401  (re-exported: the numpy draw is the device's)
    call_key,
    compensation_count,
    compensation_indices_np,
    mix32,
)
from toolkit.config import register, require

NEG_INF = float("-inf")


@register
@dataclass(frozen=True)
class LiteFocusConfig:
    """How the global self-attention runs beyond the training length.

    ``ratio``: r of eq. 6 (the paper's default 0.1). ``band``: half-width of the structured set's
    band in frames at the attention's resolution (None: half the training length there, the
    offsets the model saw in training; on demo v3, ±16 of 32 bottleneck frames holds 91 % of the
    global attention's mass, `toolkit attention-maps`). ``lags``: extra
    periodic offsets in S_i (each > band). ``seed``: the compensation draw's seed (a sampler draws
    call k of a generation with ``call=k``). ``structured=False`` drops S_i: compensation only, the
    paper's Table 2 ablation (``ratio=0`` is its other one, focus only, Table 3).
    """

    TYPE = "litefocus"
    VERSION = 1

    ratio: float = 0.1
    band: int | None = None
    lags: tuple[int, ...] = ()
    seed: int = 0
    structured: bool = True

    def __post_init__(self) -> None:
        n = "LiteFocusConfig"
        require(0.0 <= self.ratio <= 1.0, n, "ratio", f"must be in [0, 1], got {self.ratio}")
        require(self.band is None or self.band >= 0, n, "band", "must be >= 0 (0: the frame itself)")
        require(all(p > 0 for p in self.lags), n, "lags", "must be positive offsets")
        require(len(set(self.lags)) == len(self.lags), n, "lags", "must be distinct")
        require(self.structured or self.ratio > 0, n, "ratio",
                "must be > 0 without the structured set (the focus set would be empty)")
        if self.band is not None:
            require(all(p > self.band for p in self.lags), n, "lags",
                    f"every lag must exceed band={self.band} (smaller ones are in the band already)")


# --- the compensation set C (eq. 6), drawn identically in torch, numpy and C++ ----------------------
# The numpy draw and the hash live in runtime_py.compensation (the device side, which a bundle's
# runtime runs); the torch twin below uses the same integer mix on tensors.


def compensation_indices(n_keys: int, ratio: float, *, seed: int, call: int) -> torch.Tensor:
    """C for one attention call (torch): equal to :func:`compensation_indices_np` element for element."""
    k = compensation_count(n_keys, ratio)
    h = mix32(torch.arange(n_keys, dtype=torch.int64) ^ call_key(seed, call))
    return torch.sort(torch.argsort(h, stable=True)[:k]).values


# --- banded attention (seed 000 eq. 1, and LiteFocus's band), blockwise in O(N · w) --------------


def _block_size(lo: int, hi: int) -> int:
    return max(lo + hi, 1)


def _pad_queries(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[2]
    nb = -(-n // block)
    return F.pad(x, (0, 0, 0, nb * block - n))


def _chunks(x: torch.Tensor, lo: int, block: int) -> torch.Tensor:
    """(B, H, N, D) → (B, H, nb, 2·block, D): block n's keys j ∈ [n·block − lo, n·block − lo + 2·block).

    Built from one pad, one reshape and a concatenation of neighbouring blocks (ops that every
    export target handles), not from a gather.
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    xp = F.pad(x, (0, 0, lo, (nb + 1) * block - n - lo))
    xb = xp.reshape(b, h, nb + 1, block, d)
    return torch.cat([xb[:, :, :-1], xb[:, :, 1:]], dim=3)


def _band_bias(n: int, lo: int, hi: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(nb, block, 2·block) additive bias: 0 where key j ∈ [i − lo, i + hi] ∩ [0, N), else −inf.

    Query rows past N (padding) see their whole band, so that no row is empty.
    """
    nb = -(-n // block)
    r = torch.arange(block)[None, :, None]
    u = torch.arange(2 * block)[None, None, :]
    start = torch.arange(nb)[:, None, None] * block
    i = start + r
    j = start - lo + u
    in_range = torch.logical_or(torch.logical_and(j >= 0, j < n), i >= n)
    inside = torch.logical_and(torch.logical_and(u >= r, u <= r + lo + hi), in_range)
    return torch.where(inside, 0.0, NEG_INF).to(dtype)


def band_bias(n: int, lo: int, hi: int) -> torch.Tensor:
    """The additive bias ``band_attention`` adds to its blockwise scores, (nb, block, 2·block)."""
    return _band_bias(n, lo, hi, _block_size(lo, hi), torch.float32)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lo: int, hi: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y_i = Σ_{j ∈ W(i)} softmax_j(q_i · k_j / √d) v_j with W(i) = [i − lo, i + hi] ∩ [0, N).

    Seed 000 eq. 1 with lo = ⌊w/2⌋, hi = w − ⌊w/2⌋ − 1. Queries go in blocks of lo + hi; each block
    attends to the 2·block keys that hold its windows, so the cost is O(N · w), not O(N²).
    ``bias``: ``band_bias(N, lo, hi)`` made beforehand (a module keeps it as a constant, so that an
    exported graph holds no mask arithmetic).
    """
    b, h, n, d = q.shape
    block = _block_size(lo, hi)
    qb = _pad_queries(q, block).reshape(b, h, -1, block, d)
    scores = (qb @ _chunks(k, lo, block).transpose(-1, -2)) * (1.0 / math.sqrt(d))
    scores = scores + (band_bias(n, lo, hi).to(q.dtype) if bias is None else bias)
    out = scores.softmax(dim=-1) @ _chunks(v, lo, block)
    return out.reshape(b, h, -1, d)[:, :, :n]


# --- LiteFocus over 1-D sequences -----------------------------------------------------------------


def _shift(x: torch.Tensor, offset: int, n_rows: int) -> torch.Tensor:
    """Rows r ↦ x[:, :, r + offset] for r < n_rows (zeros outside [0, N))."""
    n = x.shape[2]
    left = max(0, -offset)
    right = max(0, n_rows + offset - n)
    xp = F.pad(x, (0, 0, left, right))
    start = offset + left
    return xp[:, :, start:start + n_rows]


def _in_structured_set(d: torch.Tensor, band: int, lags: tuple[int, ...]) -> torch.Tensor:
    """Whether key j = i + d is in S_i (band and lags), for an integer tensor of offsets d."""
    inside = d.abs() <= band
    for p in lags:
        inside = torch.logical_or(inside, d.abs() == p)
    return inside


def litefocus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comp_idx: torch.Tensor,
    *,
    band: int,
    lags: tuple[int, ...] = (),
    structured: bool = True,
) -> torch.Tensor:
    """Eq. 1 over F_i = S_i ∪ C (eq. 4) for (B, H, N, D) sequences; ``comp_idx`` is C (eq. 6), int64.

    S_i = {j : |i − j| ≤ band} ∪ {i ± p : p ∈ lags}, clipped to [0, N) (our 1-D counterpart of eq. 5,
    see the module doc). ``structured=False`` drops S_i (the paper's "compensation only", Table 2).
    The band's keys come in blocks (O(N · band)), each lag is one shifted copy of K and V (O(N)),
    and C is one index_select of |C| keys; every query's scores over its focus set go through one
    softmax. A key of C already in S_i is left out of C for that query (the union of eq. 4).
    """
    b, h, n, d = q.shape
    if not structured and comp_idx.shape[0] == 0:
        raise ValueError("an empty focus set: compensation only (structured=False) needs r·N >= 1")
    scale = 1.0 / math.sqrt(d)
    parts: list[torch.Tensor] = []
    if structured:
        lo = hi = band
        block = _block_size(lo, hi)
        qp = _pad_queries(q, block)
        n_rows = qp.shape[2]
        k_band, v_band = _chunks(k, lo, block), _chunks(v, lo, block)
        s_band = (qp.reshape(b, h, -1, block, d) @ k_band.transpose(-1, -2)) * scale
        s_band = (s_band + _band_bias(n, lo, hi, block, q.dtype)).reshape(b, h, n_rows, 2 * block)
        parts.append(s_band)
        rows = torch.arange(n_rows)
        for p in lags:
            for offset in (p, -p):
                j = rows + offset
                ok = torch.logical_or(torch.logical_and(j >= 0, j < n), rows >= n)
                s_lag = (qp * _shift(k, offset, n_rows)).sum(dim=-1, keepdim=True) * scale
                parts.append(s_lag + torch.where(ok, 0.0, NEG_INF).to(q.dtype)[:, None])
    else:
        qp, n_rows = q, n
    k_c, v_c = k.index_select(2, comp_idx), v.index_select(2, comp_idx)  # eqs. 2–3 for C
    s_c = (qp @ k_c.transpose(-1, -2)) * scale
    if structured:
        dup = _in_structured_set(comp_idx[None, :] - torch.arange(n_rows)[:, None], band, lags)
        s_c = s_c + torch.where(dup, NEG_INF, 0.0).to(q.dtype)
    parts.append(s_c)
    p_all = torch.cat(parts, dim=-1).softmax(dim=-1)  # eq. 1: one softmax over F_i
    out = p_all[..., p_all.shape[-1] - s_c.shape[-1]:] @ v_c
    if structured:
        p_band = p_all[..., :2 * block].reshape(b, h, -1, block, 2 * block)
        out = out + (p_band @ v_band).reshape(b, h, n_rows, d)
        col = 2 * block
        for p in lags:
            for offset in (p, -p):
                out = out + p_all[..., col:col + 1] * _shift(v, offset, n_rows)
                col += 1
    return out[:, :, :n]


def focus_sets(n: int, comp_idx, *, band: int, lags: tuple[int, ...] = (), structured: bool = True):
    """The focus sets F_i as an (N, N) boolean matrix: a reference for tests and attention maps only."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    inside = _in_structured_set(j - i, band, lags) if structured else torch.zeros(n, n, dtype=torch.bool)
    comp = torch.zeros(n, dtype=torch.bool)
    comp[torch.as_tensor(comp_idx, dtype=torch.int64)] = True
    return inside | comp[None, :]


# --- LiteFocus over 2-D (time × frequency) token grids: the paper's literal form --------------------


def grid_focus_sets(n_time: int, n_freq: int, comp_idx) -> torch.Tensor:
    """(N, N) boolean focus sets of the 2-D form (reference for tests): same frequency (eq. 5) ∪ C."""
    f = torch.arange(n_time * n_freq) % n_freq
    comp = torch.zeros(n_time * n_freq, dtype=torch.bool)
    comp[torch.as_tensor(comp_idx, dtype=torch.int64)] = True
    return (f[:, None] == f[None, :]) | comp[None, :]


def litefocus_grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comp_idx: torch.Tensor,
    *,
    n_time: int,
    n_freq: int,
) -> torch.Tensor:
    """Eqs. 1–6 for (B, H, N, D) tokens of an n_time × n_freq grid flattened time-major.

    S_i is query i's frequency row (eq. 5): per frequency, a (T × T) attention over time, computed as
    one batched matmul; C is shared by all queries (eq. 6); one softmax over both (eq. 1).
    """
    b, h, n, d = q.shape
    if n != n_time * n_freq:
        raise ValueError(f"{n} tokens are not a {n_time} x {n_freq} grid")
    scale = 1.0 / math.sqrt(d)

    def rows(x):  # (B, H, T·F, D) → (B, H, F, T, D)
        return x.reshape(b, h, n_time, n_freq, d).transpose(2, 3)

    qg = rows(q)
    s_s = (qg @ rows(k).transpose(-1, -2)) * scale  # (B, H, F, T, T)
    k_c, v_c = k.index_select(2, comp_idx), v.index_select(2, comp_idx)
    s_c = (qg @ k_c[:, :, None].transpose(-1, -2)) * scale  # (B, H, F, T, |C|)
    same_row = (comp_idx % n_freq)[None, :] == torch.arange(n_freq)[:, None]  # C_j ∈ S_i, (F, |C|)
    s_c = s_c + torch.where(same_row, NEG_INF, 0.0).to(q.dtype)[:, None, :]
    p = torch.cat([s_s, s_c], dim=-1).softmax(dim=-1)
    out = p[..., :n_time] @ rows(v) + p[..., n_time:] @ v_c[:, :, None]
    return out.transpose(2, 3).reshape(b, h, n, d)


class GridSelfAttention(nn.Module):
    """Self-attention over a (B, C, T, F) feature map, the block an AudioLDM-style U-Net applies to
    its mel-spectrogram latents: dense, or LiteFocus beyond ``dense_up_to_time`` frames."""

    def __init__(self, channels: int, n_heads: int, groups: int = 1):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, comp_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``comp_idx`` None: dense attention; else LiteFocus with C = ``comp_idx`` (flat token indices)."""
        b, c, t, f = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)

        def heads(a):  # (B, C, T, F) → (B, H, T·F, D), time-major
            return a.reshape(b, self.n_heads, c // self.n_heads, t * f).transpose(2, 3)

        q, k, v = heads(q), heads(k), heads(v)
        if comp_idx is None:
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            out = scores.softmax(dim=-1) @ v
        else:
            out = litefocus_grid_attention(q, k, v, comp_idx, n_time=t, n_freq=f)
        out = out.transpose(2, 3).reshape(b, c, t, f)
        return x + self.proj(out)
