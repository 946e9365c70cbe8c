"""LiteFocus's compensation set C (seed 002 eq. 6), drawn on the device exactly as the toolkit drew it.

A LiteFocus bundle's denoiser takes C as an input (int64 key indices, static shape): the graph holds
no random op, so every runtime that feeds it must draw the same indices the full-precision reference
was computed with. The draw is a counter hash of (seed, call), written with integer ops only, so that
numpy (here), torch (``toolkit.models.litefocus.compensation_indices``) and C++ (``native/
compensation.cpp``) agree bit for bit; tests check all three.

The scheme, named ``HASH`` in the manifest (``attention.compensation``)::

    mix(x)   = x ^= x >> 16; x = x * 0x45D9F3B mod 2^32; x ^= x >> 16; x = x * 0x45D9F3B mod 2^32; x ^ (x >> 16)
    key      = mix(mix(seed mod 2^32) ^ (call * 0x9E3779B9 mod 2^32))
    h_j      = mix(j ^ key)                   for every key j in [0, keys)
    C        = the ``count`` keys of smallest h_j, in ascending index order (int64)

``mix`` is a bijection of 32-bit integers, so no two keys tie. ``call`` is the 0-based index of the
denoiser call within one generation (= the DDIM step; CFG's two branches are one batch-2 call).
"""

from __future__ import annotations

import math

import numpy as np

HASH = "adm-counter-hash-v1"
MASK32 = 0xFFFFFFFF
# Multiplier of the 32-bit integer mix (odd, so x ↦ x·M mod 2³² is a bijection; < 2³¹, so the
# product of a 32-bit value and M fits in int64 in torch and numpy alike).
MIX = 0x45D9F3B
GOLDEN = 0x9E3779B9


def mix32(x):
    """A bijective 32-bit integer mix on int64 values in [0, 2³²) (numpy arrays or torch tensors)."""
    x = x ^ (x >> 16)
    x = (x * MIX) & MASK32
    x = x ^ (x >> 16)
    x = (x * MIX) & MASK32
    return x ^ (x >> 16)


def call_key(seed: int, call: int) -> int:
    """The per-call key of the draw: mix(mix(seed) ^ call · golden), all mod 2³²."""
    s = int(mix32(np.int64(seed & MASK32)))
    return int(mix32(np.int64((s ^ ((call * GOLDEN) & MASK32)) & MASK32)))


def compensation_count(n_keys: int, ratio: float) -> int:
    """|C| = ⌊r · |I|⌋ (eq. 6). A bundle records the count itself, so a device never recomputes it."""
    return math.floor(ratio * n_keys)


def draw_indices(n_keys: int, count: int, *, seed: int, call: int) -> np.ndarray:
    """C for one denoiser call: ``count`` of ``n_keys`` key indices, int64, ascending (the module doc)."""
    if not 0 <= count <= n_keys:
        raise ValueError(f"compensation count must be in [0, {n_keys}], got {count}")
    h = mix32(np.arange(n_keys, dtype=np.int64) ^ call_key(seed, call))
    return np.sort(np.argsort(h, kind="stable")[:count]).astype(np.int64)


def compensation_indices_np(n_keys: int, ratio: float, *, seed: int, call: int) -> np.ndarray:
    """C = ⌊r · N⌋ keys for one attention call (see :func:`draw_indices`)."""
    return draw_indices(n_keys, compensation_count(n_keys, ratio), seed=seed, call=call)


class CompensationDraw:
    """A bundle's ``attention.compensation`` record, ready to draw: ``indices(call)`` → int64 (count,).

    ``record`` is that manifest object; ``source`` names the manifest in errors.
    """

    FIELDS = ("hash", "input", "keys", "count", "seed", "dtype", "shape")

    def __init__(self, record: dict, *, source: str):
        missing = [k for k in self.FIELDS if k not in record]
        if missing:
            raise ValueError(f"{source}: attention.compensation.{missing[0]} is missing; re-export the bundle")
        if record["hash"] != HASH:
            raise ValueError(f"{source}: attention.compensation.hash is {record['hash']!r}; this runtime draws "
                             f"{HASH!r} only (update runtime_py or re-export the bundle)")
        if record["dtype"] != "int64" or list(record["shape"]) != [record["count"]]:
            raise ValueError(f"{source}: attention.compensation.shape/dtype must be [count] int64, got "
                             f"{record['shape']} {record['dtype']}")
        self.input = str(record["input"])
        self.keys, self.count, self.seed = int(record["keys"]), int(record["count"]), int(record["seed"])
        if not 0 < self.count <= self.keys:
            raise ValueError(f"{source}: attention.compensation.count={self.count} must be in [1, keys={self.keys}]")
        self._cache: dict[int, np.ndarray] = {}

    def indices(self, call: int) -> np.ndarray:
        if call not in self._cache:
            self._cache[call] = draw_indices(self.keys, self.count, seed=self.seed, call=call)
        return self._cache[call]
