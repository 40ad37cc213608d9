"""Pseudo-random permutations of [0, n) evaluated pointwise, in O(1) memory.

The loader needs "the window at position p of epoch e" for any p, on every rank, for corpora of
up to billions of windows. Materialising ``rng.permutation(n)`` costs 8 bytes per window per
epoch (gigabytes at 2T tokens) and seconds at startup; a keyed Feistel network over the
smallest power-of-4 domain >= n, with cycle walking back into [0, n), is a bijection computed
for just the positions asked for (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", 2002).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

ROUNDS = 6


@functools.lru_cache(maxsize=256)
def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    return np.random.SeedSequence(list(key)).generate_state(ROUNDS, dtype=np.uint64)


def _mix(x: np.ndarray, k: np.uint64) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing 64-bit hash (uint64 arithmetic wraps)."""
    x = x ^ k
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right, k) & mask)
    return (left << shift) | right


def permute(indices: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """The image of ``indices`` (ints in [0, n)) under the permutation of [0, n) named by ``key``."""
    if n <= 0:
        raise ValueError("permute needs n > 0")
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    keys = _round_keys(tuple(int(k) for k in key))
    with np.errstate(over="ignore"):
        y = _feistel(np.asarray(indices, dtype=np.uint64), half_bits, keys)
        outside = y >= n
        while outside.any():  # cycle walking: a permutation of the big domain, restricted to [0, n)
            y[outside] = _feistel(y[outside], half_bits, keys)
            outside = y >= n
    return y.astype(np.int64)
