"""Deterministic randomness keyed by the data, not by the shard a row happens to be in, and the bounded sample the
k-means fits on, drawn in one pass over the shards: a row is kept by a hash of its own key (image id and patch),
so the sample does not depend on how the data is cut."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.fanout import serial_map

# ``load(shard) -> (unit vectors on the grid, group ids, row keys, *extra)``: how a k-means reads one shard
Loader = Callable[[Any], tuple]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash per string id (image ids)."""
    return np.asarray(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids], dtype=np.uint64
    )


def row_keys(base: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row keys from a per-row base (an image's hash) and the row's place inside it (its patch index)."""
    with np.errstate(over="ignore"):
        spread = np.asarray(offsets, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return _splitmix64(np.asarray(base, np.uint64) ^ spread)


def uniforms(keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, for a seed: the same row gets the same number in any shard."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.asarray(keys, np.uint64) ^ _splitmix64(np.full(1, seed, np.uint64)))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_budgets(sizes: np.ndarray, total: int, k: int) -> np.ndarray:
    """Rows to draw per group: ``total`` shared equally by the groups, at least 50 per centroid each (a group is
    never starved), never more than the group holds."""
    sizes = np.asarray(sizes, np.int64)
    return np.minimum(sizes, max(total // max(len(sizes), 1), 50 * k)).astype(np.int64)


def keep_probs(sizes: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Per group, the chance a shard task keeps a row: a little above budget/size (4 standard deviations and some),
    so that the ``budget`` rows with the smallest uniform numbers are, but for odds of about 1e-5, all among the
    rows sent back, and the driver never receives much more than the budget."""
    b = np.asarray(budgets, np.float64)
    return np.minimum(1.0, (b + 4 * np.sqrt(b) + 16) / np.maximum(np.asarray(sizes, np.float64), 1))


def bottom_k(u: np.ndarray, groups: np.ndarray, keys: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Indices of the ``budgets[g]`` rows of each group g with the smallest uniform number ``u`` (ties by row key),
    ordered by (group, u): the sample and its order depend on the rows alone, not on the shards they came in."""
    order = np.lexsort((keys, u, groups))
    g = groups[order]
    first = np.searchsorted(g, np.arange(len(budgets)))
    rank = np.arange(len(order)) - first[g]
    return order[rank < np.asarray(budgets)[g]]


def _draw_task(shard: Any, load: Loader, prob: np.ndarray, seed: int) -> list:
    x, groups, keys, *extra = load(shard)
    u = uniforms(keys, seed)
    keep = u < np.asarray(prob)[groups]
    return [a[keep] for a in (x, groups, keys, u, *extra)]


def draw_rows(
    shards: Sequence[Any], load: Callable, prob: np.ndarray, seed: int, map_fn: Callable = serial_map
) -> list[np.ndarray]:
    """One pass over the shards: every row whose uniform number (from its own key and ``seed``) is below its
    group's ``prob``. ``load(shard) -> (x, groups, keys, *extra)``; returns the kept rows' (x, groups, keys, u,
    *extra), concatenated; pick the sample with :func:`bottom_k`."""
    parts = map_fn(_draw_task, shards, load, prob, seed)
    if not parts:
        raise ValueError("k-means: no vectors")
    cols = []
    for j in range(len(parts[0])):  # one column at a time, each part dropped once copied
        cols.append(np.concatenate([p[j] for p in parts]))
        for p in parts:
            p[j] = None
    return cols
