"""Spherical k-means, one implementation for every clustering in the project. Maths only: no Ray here.

* :func:`distributed_kmeans`: Lloyd iterations over *shards*. ``load(shard) -> (unit vectors, group ids, row keys)``
  is called inside ``map_fn`` (the executor's map: Ray tasks, or a plain loop), each shard reduced to per-centroid
  sums and counts that the caller adds up. No process ever holds more than one shard. ``groups`` lets one pass
  cluster many independent sets at once (G groups x k centroids): the category level is every CLS group clustered
  in the same pass over the store.
* :func:`batched_kmeans`: many small problems (one per image) vectorised over a padded batch with torch; no Python
  loop per image.

Results do not depend on how the data is cut into shards: the initialisation sample keeps a row by a hash of the
row's own key (image id and patch, not its shard), vectors are put on a 2^-20 grid so that float64 sums of them are
exact in any order, and each image's k-means++ draws come from its own id.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or Inf")


GRID = float(2 ** 20)  # unit vectors on this grid sum exactly in float64 (any order) for up to 2^32 rows


def to_grid(x: np.ndarray) -> np.ndarray:
    """Unit vectors (float32) rounded in place onto a 2^-20 grid: exact, order-free sums, the same for any sharding."""
    x *= GRID
    np.rint(x, out=x)
    x /= GRID
    return x


def exact_weights(w: np.ndarray) -> np.ndarray:
    """Weights in [0, 2] as float64 multiples of 2^-24: their sums are exact in any order."""
    return np.rint(np.asarray(w, np.float64) * 2 ** 24) / 2 ** 24


def unit_vectors(x: np.ndarray) -> np.ndarray:
    """What every loader hands the k-means: L2-normalised float32 on the summation grid."""
    return to_grid(l2_normalize(x))


# --- deterministic randomness keyed by the data, not by the shard a row happens to be in ---

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash per string id (image ids)."""
    return np.asarray([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                      dtype=np.uint64)


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


# ---------------------------------------------------------------------------------------------------------------
# plain functions
# ---------------------------------------------------------------------------------------------------------------


def segment_sum(labels: np.ndarray, x: np.ndarray, n_segments: int) -> np.ndarray:
    """Row sums of ``x`` per label, (n_segments, D) float64, by a one-hot matrix product (BLAS), not ``np.add.at``,
    which is two orders of magnitude slower. In float64, so that grid vectors (:func:`to_grid`) sum exactly."""
    out = np.zeros((n_segments, x.shape[1]), np.float64)
    step = max(1, min((1 << 22) // max(1, n_segments), (1 << 22) // max(1, x.shape[1])))  # ~32 MB blocks
    for i in range(0, len(x), step):
        lab = labels[i: i + step]
        onehot = np.zeros((n_segments, len(lab)), np.float64)
        onehot[lab, np.arange(len(lab))] = 1.0
        out += onehot @ x[i: i + step].astype(np.float64)
    return out


_GPU_RESOURCES = None


def visible_gpu() -> bool:
    """Whether this process was given a GPU. Ray hides GPUs from tasks that did not request one, so inside a
    shard task this is the cluster-level choice (``device``) made by the executor's resources."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


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
    import torch

    cg = torch.from_numpy(c).cuda()
    labels, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for i in range(0, len(x), chunk):
        sim, idx = (torch.from_numpy(x[i: i + chunk]).cuda() @ cg.T).max(1)
        labels[i: i + chunk], sims[i: i + chunk] = idx.cpu().numpy(), sim.cpu().numpy()
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
    return {"sums": sums.reshape(G, k, D), "counts": counts.reshape(G, k),
            "inertia": float(np.sum(exact_weights(1.0 - sims)))}


def sample_rows(x: np.ndarray, groups: np.ndarray, keys: np.ndarray, group_prob: np.ndarray,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row kept with its group's probability (``group_prob[g]``), decided by the row's own key: the sample is
    the same however the rows are cut into shards."""
    keep = uniforms(keys, seed) < np.asarray(group_prob)[groups]
    return (x, groups, keys) if keep.all() else (x[keep], groups[keep], keys[keep])  # all kept: no copy


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


def lloyd(x: np.ndarray, centers: np.ndarray, iters: int) -> np.ndarray:
    """A few in-memory spherical Lloyd steps (used on the init sample, before the distributed passes)."""
    for _ in range(iters):
        labels = np.argmax(x @ centers.T, axis=1)
        sums = segment_sum(labels, x, len(centers))
        filled = np.bincount(labels, minlength=len(centers)) > 0
        centers = np.where(filled[:, None], l2_normalize(sums), centers).astype(np.float32)
    return centers


def reduce_sum(dicts) -> dict:
    """Element-wise sum of dicts of arrays/numbers (the reduce of every map over shards)."""
    total: dict = {}
    for d in dicts:
        for key, v in d.items():
            total[key] = v if key not in total else total[key] + v
    return total


# ---------------------------------------------------------------------------------------------------------------
# distributed spherical k-means
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (G, k, D), unit-norm
    counts: np.ndarray  # (G, k) points per centroid at the last assignment
    sums: np.ndarray  # (G, k, D) sums of the points (unnormalised means = sums / counts)
    inertia: float
    iterations: int
    history: list
    sample_size: int = 0  # points drawn for the initialisation (held by the driver)


def serial_map(fn: Callable, items: Sequence, *shared, on_done=None) -> list:
    """The default ``map_fn``: a plain loop in this process (``on_done()`` after each item, for progress)."""
    out = []
    for item in items:
        out.append(fn(item, *shared))
        if on_done:
            on_done()
    return out


def _sample_task(shard, load, prob: np.ndarray, seed: int):
    x, groups, keys = load(shard)
    return sample_rows(x, groups, keys, prob, seed)


def _size_task(shard, load):
    x, groups, _ = load(shard)
    return np.bincount(groups, minlength=1).astype(np.int64) if len(groups) else np.zeros(1, np.int64)


def _accumulate_task(shard, load, centroids):
    x, groups, _ = load(shard)
    return accumulate(x, groups, centroids)


def distributed_kmeans(
    shards: Sequence[Any],
    load: Callable[[Any], tuple[np.ndarray, np.ndarray, np.ndarray]],
    k: int,
    n_groups: int = 1,
    iters: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    init_sample: int = 100_000,
    sizes: np.ndarray | None = None,
    map_fn: Callable = serial_map,
) -> KMeansResult:
    """Spherical k-means over vectors spread across ``shards``; ``load(shard)`` -> (unit vectors on the grid, group
    ids, row keys). ``map_fn(fn, shards, *shared)`` runs the per-shard work (the executor's map: Ray tasks that may
    share a GPU, or a loop); inside a task the assignment uses whatever GPU the task was given."""
    rng = np.random.default_rng(seed)
    if sizes is None:  # one pass to count; callers that know the counts (from metadata) pass them
        sizes = reduce_sum({"n": _pad(c, n_groups)} for c in map_fn(_size_task, shards, load))
        sizes = sizes.get("n", np.zeros(n_groups, np.int64))
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("k-means: no vectors")
    # A deliberate sample for initialisation: about init_sample points in all, shared equally by the groups (at
    # least 20 per centroid each). A budget per group would make the driver hold G x init_sample points, which
    # grows with the number of images until every group is that large (3 GB for 20 groups of 384-d keys).
    prob = np.minimum(1.0, max(init_sample // n_groups, 20 * k) / np.maximum(sizes, 1))
    sx, sg = _concat_releasing(map_fn(_sample_task, shards, load, prob, seed))
    D = sx.shape[1]
    centroids = np.zeros((n_groups, k, D), np.float32)
    for g in range(n_groups):
        pts = sx if n_groups == 1 else sx[sg == g]  # one group: no copy of the sample
        if len(pts):
            centroids[g] = lloyd(pts, kmeans_pp(pts, k, rng), iters=10)
    del pts
    history, prev_inertia, last = [], None, None
    for it in range(1, iters + 1):
        acc = reduce_sum(map_fn(_accumulate_task, shards, load, centroids))
        last = acc  # sums/counts/inertia of this assignment: the new centroids are its normalised sums
        new = l2_normalize(acc["sums"]).astype(np.float32)
        empty = acc["counts"] == 0
        for g, c in zip(*np.nonzero(empty)):
            # Re-seed an empty cluster from the group's sample, away from the existing centroids, deterministically.
            pts = sx if n_groups == 1 else sx[sg == g]
            if len(pts):
                far = np.argmin((pts @ new[g].T).max(1))
                new[g, c] = pts[far]
            else:
                new[g, c] = centroids[g, c]
        shift = float(np.max(1.0 - np.sum(new * centroids, axis=-1)))
        centroids = new
        history.append({"iteration": it, "inertia": acc["inertia"], "shift": shift})
        converged = shift < tol or (prev_inertia is not None
                                    and abs(prev_inertia - acc["inertia"]) <= tol * max(prev_inertia, EPS))
        prev_inertia = acc["inertia"]
        if converged and not empty.any():
            break
    # As faiss does: counts, sums and inertia are those of the last assignment step (no extra pass over the data).
    return KMeansResult(centroids, last["counts"], last["sums"], last["inertia"], len(history), history, len(sx))


def _concat_releasing(samples: list) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the per-shard (x, groups, keys) samples, dropping each part once copied: the driver holds the
    sample about once, not twice."""
    n = sum(len(g) for _, g, _ in samples)
    D = next((x.shape[1] for x, _, _ in samples if x.ndim == 2), 1)
    sx, sg = np.empty((n, D), np.float32), np.empty(n, np.int64)
    pos = 0
    while samples:
        x, g, _ = samples.pop(0)
        sx[pos: pos + len(g)], sg[pos: pos + len(g)] = x, g
        pos += len(g)
    return sx, sg


def _pad(counts: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    out[: min(n, len(counts))] = counts[:n]
    return out


def kmeans_arrays(x: np.ndarray, k: int, groups: np.ndarray | None = None, n_groups: int = 1, chunk: int = 65536,
                  normalized: bool = False, **kw) -> KMeansResult:
    """The same k-means over an in-memory array (CLS tokens, test data), split into chunks. Row keys are the row
    indices. ``normalized``: x is already unit-norm float32 on the grid (no copy is made)."""
    x = x if normalized else unit_vectors(x)
    groups = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups, np.int64)
    keys = np.arange(len(x), dtype=np.uint64)
    chunks = [(x[i: i + chunk], groups[i: i + chunk], keys[i: i + chunk]) for i in range(0, len(x), chunk)]
    return distributed_kmeans(chunks, _identity_load, k, n_groups=n_groups, **kw)


def _identity_load(chunk):
    return chunk


# ---------------------------------------------------------------------------------------------------------------
# batched k-means: one small problem per image, vectorised
# ---------------------------------------------------------------------------------------------------------------


def kmeans_draws(image_ids: Sequence[str], k: int, seed: int) -> np.ndarray:
    """The uniform numbers :func:`batched_kmeans` seeds each image with, from the image's own id: an image's
    clustering does not depend on the other images of its batch or shard."""
    n = 1 + (k - 1) * (2 + int(np.log(k)))
    base = np.repeat(id_hash(image_ids), n)
    return uniforms(row_keys(base, np.tile(np.arange(n), len(image_ids))), seed).reshape(len(image_ids), n)


def batched_kmeans(x, valid, k: int, iters: int = 20, seed: int = 0, device: str = "cpu", draws=None):
    """Spherical k-means on B independent sets at once.

    x: (B, N, D) unit vectors on the grid, zero-padded; valid: (B, N) bool. Returns labels (B, N) (-1 on padding)
    and centroids (B, k, D). A set with fewer than k points gets one cluster per point. ``draws`` (B, 1 + (k-1) *
    trials) uniform numbers for the k-means++ seeding of each set (:func:`kmeans_draws`); without them they come
    from a generator seeded with ``seed``. Centroid sums are in float64 (exact on the grid), so a set's result does
    not depend on the padding its batch needs.
    """
    import torch

    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    valid = torch.as_tensor(valid, dtype=torch.bool, device=device)
    B, N, D = x.shape
    trials = 2 + int(np.log(k))  # greedy k-means++, as for the distributed k-means
    if draws is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        draws = torch.rand(B, 1 + (k - 1) * trials, generator=gen, device=device, dtype=torch.float64)
    draws = torch.as_tensor(draws, dtype=torch.float64, device=device)
    n_valid = valid.sum(1)
    # k-means++ seeding, vectorised over the batch, by inverse-CDF sampling from each set's own draws.
    cent = torch.zeros(B, k, D, device=device)
    first = (draws[:, 0] * n_valid.clamp(min=1)).long().clamp(max=N - 1)
    idx_valid = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid positions first
    ar = torch.arange(B, device=device)
    cent[:, 0] = x[ar, idx_valid[ar, first]]
    dist = (1 - torch.bmm(x, cent[:, 0, :, None])[..., 0]).clamp(min=0) * valid
    for i in range(1, k):
        weights = dist.double()
        flat = weights.sum(1, keepdim=True) <= EPS  # all points on the centres: any valid point will do
        weights = torch.where(flat, valid.double(), weights)
        weights = weights + (weights.sum(1, keepdim=True) <= 0).double()  # an all-padding row: any index
        cdf = torch.cumsum(weights, dim=1)
        u = draws[:, 1 + (i - 1) * trials: 1 + i * trials] * cdf[:, -1:]
        cand = torch.searchsorted(cdf, u, right=True).clamp(max=N - 1)  # (B, trials)
        cand_x = x[ar[:, None], cand]  # (B, trials, D)
        cand_sim = torch.bmm(cand_x, x.transpose(1, 2))  # (B, trials, N)
        cand_d = torch.minimum(dist[:, None], (1 - cand_sim).clamp(min=0) * valid[:, None])
        best = cand_d.double().sum(-1).argmin(1)
        cent[:, i] = cand_x[ar, best]
        dist = cand_d[ar, best]
    labels = torch.zeros(B, N, dtype=torch.long, device=device)
    validf = valid.float()
    ks = torch.arange(k, device=device)[None, :, None]
    x64 = x.double()
    for _ in range(iters):
        sim = torch.bmm(x, cent.transpose(1, 2))  # (B, N, k)
        new_labels = sim.argmax(-1)
        onehot = (new_labels[:, None, :] == ks).double() * validf[:, None]  # (B, k, N)
        sums = torch.bmm(onehot, x64)
        counts = onehot.sum(2)
        norm = sums.norm(dim=-1, keepdim=True)
        cent = torch.where(counts[..., None] > 0, (sums / norm.clamp(min=EPS)).float(), cent)  # empty: keep old
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    labels = torch.bmm(x, cent.transpose(1, 2)).argmax(-1)
    # Fewer points than clusters: each point is its own cluster.
    small = n_valid < k
    if small.any():
        labels[small] = torch.arange(N, device=device).clamp(max=k - 1)[None].expand(int(small.sum()), N)
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return labels.cpu().numpy(), cent.cpu().numpy()
