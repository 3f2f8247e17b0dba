"""Spherical k-means, one implementation for every clustering in the project. Maths only: no Ray here.

* :func:`sampled_kmeans`: vectors spread over *shards*, fitted on a bounded sample drawn in one pass.
  ``load(shard) -> (unit vectors, group ids, row keys)`` is called inside ``map_fn`` (the executor's map: Ray
  tasks, or a plain loop); each task sends back only the rows below a keep probability (:func:`draw_rows`), the
  sample is the rows with the smallest hash (:func:`bottom_k`), and :func:`fit_groups` fits it in memory. No
  process ever holds more than one shard and the sample. ``groups`` clusters many independent sets in the same
  pass (G groups x k centroids).
* many small problems (one per image) vectorised over a padded batch: :mod:`mlcseg_ray.ops.batched_kmeans`.

Results do not depend on how the data is cut into shards: the sample keeps a row by a hash of the row's own key
(image id and patch, not its shard), vectors are put on a 2^-20 grid so that float64 sums of them are exact in any
order, and each image's k-means++ draws come from its own id (the keyed draws: :mod:`mlcseg_ray.ops.sampling`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.fanout import serial_map
from .sampling import Loader, bottom_k, draw_rows, keep_probs, sample_budgets

EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or Inf")


GRID = float(2**20)  # unit vectors on this grid sum exactly in float64 (any order) for up to 2^32 rows


def to_grid(x: np.ndarray) -> np.ndarray:
    """Unit vectors (float32) rounded in place onto a 2^-20 grid: exact, order-free sums, the same for any sharding."""
    x *= GRID
    np.rint(x, out=x)
    x /= GRID
    return x


def exact_weights(w: np.ndarray) -> np.ndarray:
    """Weights in [0, 2] as float64 multiples of 2^-24: their sums are exact in any order."""
    return np.rint(np.asarray(w, np.float64) * 2**24) / 2**24


# Rows normalised at a time: a shard's keys are hundreds of MB, and whole-array temporaries of that size cost more
# in fresh memory than the arithmetic (BENCHMARKS.md, issue 23). Each row's result does not depend on the blocks.
ROWS_PER_BLOCK = 1 << 14


def unit_vectors(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """What every loader hands the k-means: L2-normalised float32 (n, D) on the summation grid. ``in_place``
    overwrites ``x`` when it is a writable float32 array the caller owns (a shard's keys)."""
    out = np.asarray(x, np.float32) if in_place else np.array(x, np.float32)
    for i in range(0, len(out), ROWS_PER_BLOCK):
        block = out[i : i + ROWS_PER_BLOCK]
        np.copyto(block, l2_normalize(block))
        to_grid(block)
    return out


# ---------------------------------------------------------------------------------------------------------------
# plain functions
# ---------------------------------------------------------------------------------------------------------------


def segment_sum(labels: np.ndarray, x: np.ndarray, n_segments: int) -> np.ndarray:
    """Row sums of ``x`` per label, (n_segments, D) float64, by a one-hot matrix product (BLAS), not ``np.add.at``,
    which is two orders of magnitude slower. In float64, so that grid vectors (:func:`to_grid`) sum exactly."""
    out = np.zeros((n_segments, x.shape[1]), np.float64)
    step = max(1, min((1 << 22) // max(1, n_segments), (1 << 22) // max(1, x.shape[1])))  # ~32 MB blocks
    for i in range(0, len(x), step):
        lab = labels[i : i + step]
        onehot = np.zeros((n_segments, len(lab)), np.float64)
        onehot[lab, np.arange(len(lab))] = 1.0
        out += onehot @ x[i : i + step].astype(np.float64)
    return out


_GPU_RESOURCES = None


def visible_gpu() -> bool:
    """Whether this process was given a GPU. Ray hides GPUs from tasks that did not request one, so inside a
    shard task this is the cluster-level choice (``device``) made by the executor's resources."""
    return torch.cuda.is_available()


def _faiss_gpu_index(dim: int):
    """faiss inner-product index on the GPU, or None without one or without faiss's GPU build (extra ``gpu``)."""
    import faiss

    global _GPU_RESOURCES
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return None
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.GpuIndexFlatIP(_GPU_RESOURCES, dim)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (x and centroids unit-norm). Returns (labels, similarity).

    faiss on the GPU where it can, else torch on the GPU (a CUDA node without faiss's GPU build), else faiss on
    the CPU."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    import faiss

    if visible_gpu():
        index = _faiss_gpu_index(c.shape[1])
        if index is None:
            return _assign_torch_cuda(x, c)
    else:
        index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sim, idx = index.search(x, 1)
    return idx[:, 0].astype(np.int64), sim[:, 0]


def _assign_torch_cuda(x: np.ndarray, c: np.ndarray, chunk: int = 1 << 20):
    cg = torch.from_numpy(c).cuda()
    labels, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for i in range(0, len(x), chunk):
        sim, idx = (torch.from_numpy(x[i : i + chunk]).cuda() @ cg.T).max(1)
        labels[i : i + chunk], sims[i : i + chunk] = idx.cpu().numpy(), sim.cpu().numpy()
    return labels, sims


def assign_groups(x: np.ndarray, groups: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid within each vector's group. centroids: (G, k, D)."""
    present = np.unique(groups)
    if len(present) == 1:  # one group (the dataset level): no per-group copy of the shard
        return assign(x, centroids[present[0]])
    labels = np.zeros(len(x), np.int64)
    sims = np.zeros(len(x), np.float32)
    for g in present:
        sel = np.flatnonzero(groups == g)
        labels[sel], sims[sel] = assign(x[sel], centroids[g])
    return labels, sims


def accumulate(x: np.ndarray, groups: np.ndarray, centroids: np.ndarray) -> dict:
    """Per-(group, centroid) sums and counts, and the spherical inertia sum(1 - cos)."""
    G, k, D = centroids.shape
    labels, sims = assign_groups(x, groups, centroids)
    flat = groups.astype(np.int64) * k + labels
    sums = segment_sum(flat, x, G * k)
    counts = np.bincount(flat, minlength=G * k).astype(np.int64)
    return {
        "sums": sums.reshape(G, k, D),
        "counts": counts.reshape(G, k),
        "inertia": float(np.sum(exact_weights(1.0 - sims))),
    }


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step, keep the best) for unit vectors,
    distance 1 - cos. Fewer distinct points than k: repeats allowed."""
    n = len(x)
    trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]), np.float32)
    centers[0] = x[rng.integers(n)]
    d = np.maximum(1.0 - x @ centers[0], 0.0)
    for i in range(1, k):
        total = d.sum()
        if total <= EPS:
            centers[i] = x[rng.integers(n)]
            continue
        cand = rng.choice(n, size=trials, p=d / total)
        cand_d = np.minimum(d[None], np.maximum(1.0 - x[cand] @ x.T, 0.0))  # (trials, n)
        best = int(np.argmin(cand_d.sum(1)))
        centers[i], d = x[cand[best]], cand_d[best]
    return centers


def fit_kmeans(
    x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25, tol: float = 1e-4, n_init: int = 3
) -> tuple[np.ndarray, int]:
    """Spherical k-means in memory, the best (lowest inertia) of ``n_init`` k-means++ starts: one start can merge
    two clusters and split another, and on a bounded sample a few starts cost little. Each start runs Lloyd steps
    until the centroids move less than ``tol`` (1 - cos) or the partition stops changing; an emptied cluster is
    re-seeded at the points farthest from every centroid. Sums are float64 over grid vectors, so the result
    depends only on the rows and their order. Returns (centroids (k, D), Lloyd steps of the chosen start)."""
    best = None
    for _ in range(n_init):
        centers, it, inertia = _lloyd(x, kmeans_pp(x, k, rng), iters, tol)
        if best is None or inertia < best[2]:
            best = (centers, it, inertia)
    return best[0], best[1]


def _lloyd(x: np.ndarray, centers: np.ndarray, iters: int, tol: float) -> tuple[np.ndarray, int, float]:
    k = len(centers)
    labels = None
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 - the steps taken are returned
        sims = x @ centers.T
        new_labels = np.argmax(sims, axis=1)
        counts = np.bincount(new_labels, minlength=k)
        new = l2_normalize(segment_sum(new_labels, x, k)).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # the farthest points, one per emptied cluster
            far = np.argsort(sims.max(1), kind="stable")[: len(empty)]
            new[empty] = x[far] if len(x) >= k else centers[empty]
        shift = float(np.max(1.0 - np.sum(new * centers, axis=1)))
        centers = new
        if shift < tol or (labels is not None and np.array_equal(labels, new_labels)):
            break
        labels = new_labels
    inertia = float(np.sum(1.0 - (x @ centers.T).max(1), dtype=np.float64))
    return centers, it, inertia


def fit_groups(
    x: np.ndarray,
    groups: np.ndarray,
    k: int,
    n_groups: int,
    rng: np.random.Generator,
    iters: int = 25,
    tol: float = 1e-4,
) -> tuple[np.ndarray, int]:
    """The sampled fit's in-memory step: :func:`fit_kmeans` on each group's rows of ``x`` (in group order, one
    ``rng`` for all), zeros for an empty group. Returns (centroids (G, k, D), Lloyd steps of the slowest group)."""
    centroids = np.zeros((n_groups, k, x.shape[1]), np.float32)
    iterations = 0
    for g in range(n_groups):
        pts = x if n_groups == 1 else x[groups == g]
        if len(pts):
            centroids[g], it = fit_kmeans(pts, k, rng, iters, tol)
            iterations = max(iterations, it)
    return centroids, iterations


def reduce_sum(dicts: Iterable[dict]) -> dict:
    """Element-wise sum of dicts of arrays/numbers (the reduce of every map over shards)."""
    total: dict = {}
    for d in dicts:
        for key, v in d.items():
            total[key] = v if key not in total else total[key] + v
    return total


# ---------------------------------------------------------------------------------------------------------------
# a bounded, deterministic sample drawn in one pass, and k-means fitted on it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (G, k, D), unit-norm
    counts: np.ndarray  # (G, k) points per centroid: all of them with ``assign_all``, else the sample's
    sums: np.ndarray  # (G, k, D) sums of those points (unnormalised means = sums / counts)
    inertia: float  # sum(1 - cos) over the same points
    iterations: int  # Lloyd steps of the slowest group (in memory)
    sample_size: int  # rows the fit saw (held by the driver)
    passes: int  # passes over the shards


def _size_task(shard: Any, load: Loader) -> np.ndarray:
    x, groups, *_ = load(shard)
    return np.bincount(groups, minlength=1).astype(np.int64) if len(groups) else np.zeros(1, np.int64)


def _accumulate_task(shard: Any, load: Loader, centroids: np.ndarray) -> dict:
    x, groups, *_ = load(shard)
    return accumulate(x, groups, centroids)


def sampled_kmeans(
    shards: Sequence[Any],
    load: Callable[[Any], tuple],
    k: int,
    n_groups: int = 1,
    sample: int = 100_000,
    sizes: np.ndarray | None = None,
    iters: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    assign_all: bool = True,
    map_fn: Callable = serial_map,
) -> KMeansResult:
    """Spherical k-means of vectors spread across ``shards``, fitted on a bounded sample drawn in one pass.

    ``load(shard) -> (unit vectors on the grid, group ids, row keys, ...)``; ``map_fn(fn, shards, *shared)`` runs
    the per-shard work (Ray tasks, or a loop). ``groups`` clusters G independent sets in the same pass. With k
    centroids and millions of points a well-drawn sample fits as well as everything (issue 14); the whole data is
    needed only to assign, which ``assign_all`` does in one more pass (counts, sums and inertia of every point).
    Passes: 1 (+1 to count when ``sizes`` is not given, +1 with ``assign_all``)."""
    passes = 0
    if sizes is None:
        sizes = np.zeros(n_groups, np.int64)
        for c in map_fn(_size_task, shards, load):
            sizes[: min(n_groups, len(c))] += c[:n_groups]
        passes += 1
    sizes = np.asarray(sizes, np.int64)
    if not len(shards) or sizes.sum() == 0:
        raise ValueError("k-means: no vectors")
    budgets = sample_budgets(sizes, sample, k)
    x, groups, keys, u = draw_rows(shards, load, keep_probs(sizes, budgets), seed, map_fn)[:4]
    passes += 1
    pick = bottom_k(u, groups, keys, budgets)
    x, groups = x[pick], groups[pick]
    centroids, iterations = fit_groups(x, groups, k, n_groups, np.random.default_rng(seed), iters, tol)
    if assign_all:
        acc = reduce_sum(map_fn(_accumulate_task, shards, load, centroids))
        passes += 1
    else:
        acc = accumulate(x, groups, centroids)
    return KMeansResult(centroids, acc["counts"], acc["sums"], acc["inertia"], iterations, len(x), passes)


def kmeans_arrays(
    x: np.ndarray,
    k: int,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    chunk: int = 65536,
    normalized: bool = False,
    **kw,
) -> KMeansResult:
    """The same k-means over an in-memory array (CLS tokens, test data), split into chunks. Row keys are the row
    indices. ``normalized``: x is already unit-norm float32 on the grid (no copy is made)."""
    x = x if normalized else unit_vectors(x)
    groups = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups, np.int64)
    keys = np.arange(len(x), dtype=np.uint64)
    chunks = [(x[i : i + chunk], groups[i : i + chunk], keys[i : i + chunk]) for i in range(0, len(x), chunk)]
    sizes = np.bincount(groups, minlength=n_groups)[:n_groups]
    return sampled_kmeans(chunks, _identity_load, k, n_groups=n_groups, sizes=sizes, **kw)


def _identity_load(chunk: tuple) -> tuple:
    return chunk
