"""Spherical k-means, one implementation for every clustering in the project.

* :func:`distributed_kmeans`: mini-batch-style Lloyd iterations over *shards*. Each shard is loaded by a task
  (``load(shard) -> (X, groups)``), assigned with faiss, and reduced to per-centroid sums and counts; the driver
  adds them up and normalises. No process ever holds more than one shard. ``groups`` lets one pass cluster many
  independent sets at once (G groups x k centroids): the category level is every CLS group clustered in the same
  pass over the store. Runs on Ray when it is initialised, in-process otherwise (same results).
* :func:`batched_kmeans`: many small problems (one per image) vectorised over a padded batch with torch; no Python
  loop per image.

Initialisation is k-means++ on a sample drawn on purpose (``init_sample`` points, spread over shards in proportion
to their size), not faiss's silent subsampling.
"""
from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------------------------
# plain functions (no Ray)
# ---------------------------------------------------------------------------------------------------------------


def segment_sum(labels: np.ndarray, x: np.ndarray, n_segments: int) -> np.ndarray:
    """Row sums of ``x`` per label, (n_segments, D) float64. A one-hot matrix product (BLAS), not ``np.add.at``,
    which is two orders of magnitude slower on large arrays."""
    out = np.zeros((n_segments, x.shape[1]), np.float64)
    step = max(1, (1 << 24) // max(1, n_segments))  # bound the one-hot block to ~64 MB
    for i in range(0, len(x), step):
        lab = labels[i: i + step]
        onehot = np.zeros((n_segments, len(lab)), np.float32)
        onehot[lab, np.arange(len(lab))] = 1.0
        out += onehot @ x[i: i + step]
    return out


_GPU_RESOURCES = None


def visible_gpu() -> bool:
    """Whether this process was given a GPU. Ray hides GPUs from tasks that did not request one, so inside a
    shard task this is the cluster-level choice (``device``) made by :func:`map_shards`."""
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
    return {"sums": sums.reshape(G, k, D), "counts": counts.reshape(G, k), "inertia": float(np.sum(1.0 - sims))}


def sample_rows(x: np.ndarray, groups: np.ndarray, group_prob: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row kept with its group's probability (``group_prob[g]``)."""
    rng = np.random.default_rng(seed)
    keep = rng.random(len(x)) < np.asarray(group_prob)[groups]
    return (x, groups) if keep.all() else (x[keep], groups[keep])  # all kept: no copy


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


# ---------------------------------------------------------------------------------------------------------------
# map over shards: Ray tasks when Ray is up, a plain loop otherwise
# ---------------------------------------------------------------------------------------------------------------


def map_shards(fn: Callable, shards: Sequence, *args, use_ray: bool | None = None, on_done=None,
               device: str = "cpu") -> list:
    """``[fn(shard, *args) for shard in shards]``, as Ray tasks when Ray is up (large ``args`` put in the object
    store once, at most 2 tasks per CPU in flight). Results come back in shard order, so that every reduction
    adds in the same order and reruns are bit-identical. ``device`` (auto/cpu/cuda): whether each task asks for a
    share of a GPU (:func:`mlcseg_ray.raytools.task_gpus`)."""
    import ray

    if use_ray is None:
        use_ray = ray.is_initialized()
    if not use_ray:
        out = []
        for s in shards:
            out.append(fn(s, *args))
            if on_done:
                on_done()
        return out
    from .raytools import cluster_cpus, task_gpus

    remote = _remote(fn, task_gpus(device))
    refs = [ray.put(a) for a in args]
    results: dict = {}
    pending: dict = {}
    items = list(enumerate(shards))
    limit = 2 * cluster_cpus()
    pos = 0
    while pos < len(items) or pending:
        while pos < len(items) and len(pending) < limit:
            i, s = items[pos]
            pending[remote.remote(s, *refs)] = i
            pos += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
        if on_done:
            on_done()
    return [results[i] for i in range(len(items))]


_REMOTES: dict = {}


def _remote(fn, num_gpus: float = 0.0):
    import ray

    if (fn, num_gpus) not in _REMOTES:
        # max_calls=0: Ray's default for GPU tasks is a fresh worker per call (seconds each, CUDA set-up
        # included); a shard task keeps nothing on the GPU worth releasing between calls.
        _REMOTES[fn, num_gpus] = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=3, max_calls=0)(fn)
    return _REMOTES[fn, num_gpus]


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


def _sample_task(item, load, prob: float, seed: int):
    shard, index = item
    if type(shard).__name__ == "ObjectRef":  # nested in a tuple, so Ray did not resolve it for us
        import ray

        shard = ray.get(shard)
    x, groups = load(shard)
    return sample_rows(x, groups, prob, seed + index)  # a seed per shard: the sample does not depend on task order


def _size_task(shard, load):
    x, groups = load(shard)
    return np.bincount(groups, minlength=1).astype(np.int64) if len(groups) else np.zeros(1, np.int64)


def _accumulate_task(shard, load, centroids):
    x, groups = load(shard)
    return accumulate(x, groups, centroids)


def distributed_kmeans(
    shards: Sequence[Any],
    load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    k: int,
    n_groups: int = 1,
    iters: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    init_sample: int = 100_000,
    use_ray: bool | None = None,
    sizes: np.ndarray | None = None,
    device: str = "auto",
) -> KMeansResult:
    """Spherical k-means over vectors spread across ``shards``; ``load(shard)`` -> (unit vectors, group ids).

    ``device``: ``auto`` runs the shard tasks on GPU nodes (a share of a GPU each) when the cluster has GPUs,
    ``cpu`` never, ``cuda`` demands them. Inside a task the assignment uses whatever GPU it was given."""
    rng = np.random.default_rng(seed)
    if sizes is None:  # one pass to count; callers that know the counts (from metadata) pass them
        sizes = reduce_sum({"n": _pad(c, n_groups)}
                           for c in map_shards(_size_task, shards, load, use_ray=use_ray, device=device))
        sizes = sizes.get("n", np.zeros(n_groups, np.int64))
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("k-means: no vectors")
    # A deliberate sample for initialisation: about init_sample points in all, shared equally by the groups (at
    # least 20 per centroid each). A budget per group would make the driver hold G x init_sample points, which
    # grows with the number of images until every group is that large (3 GB for 20 groups of 384-d keys).
    prob = np.minimum(1.0, max(init_sample // n_groups, 20 * k) / np.maximum(sizes, 1))
    samples = map_shards(_sample_task, [(s, i) for i, s in enumerate(shards)], load, prob, seed, use_ray=use_ray,
                         device=device)
    sx, sg = _concat_releasing(samples)
    D = sx.shape[1]
    centroids = np.zeros((n_groups, k, D), np.float32)
    for g in range(n_groups):
        pts = sx if n_groups == 1 else sx[sg == g]  # one group: no copy of the sample
        if len(pts):
            centroids[g] = lloyd(pts, kmeans_pp(pts, k, rng), iters=10)
    del pts
    history, prev_inertia, acc = [], None, None
    for it in range(1, iters + 1):
        acc = reduce_sum(map_shards(_accumulate_task, shards, load, centroids, use_ray=use_ray, device=device))
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
        converged = shift < tol or (prev_inertia is not None and abs(prev_inertia - acc["inertia"]) <= tol * max(prev_inertia, EPS))
        prev_inertia = acc["inertia"]
        if converged and not empty.any():
            break
    # As faiss does: counts, sums and inertia are those of the last assignment step (no extra pass over the data).
    return KMeansResult(centroids, last["counts"], last["sums"], last["inertia"], len(history), history, len(sx))


def _concat_releasing(samples: list) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the per-shard (x, groups) samples, dropping each part once copied: the driver holds the
    sample about once, not twice."""
    n = sum(len(g) for _, g in samples)
    D = next((x.shape[1] for x, _ in samples if x.ndim == 2), 1)
    sx, sg = np.empty((n, D), np.float32), np.empty(n, np.int64)
    pos = 0
    while samples:
        x, g = samples.pop(0)
        sx[pos: pos + len(g)], sg[pos: pos + len(g)] = x, g
        pos += len(g)
    return sx, sg


def _pad(counts: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    out[: min(n, len(counts))] = counts[:n]
    return out


def kmeans_arrays(x: np.ndarray, k: int, groups: np.ndarray | None = None, n_groups: int = 1, chunk: int = 65536,
                  normalized: bool = False, **kw) -> KMeansResult:
    """The same k-means over an in-memory array (CLS tokens, region descriptors), split into chunks.
    ``normalized``: x is already unit-norm float32 (no copy is made)."""
    x = x if normalized else l2_normalize(x)
    groups = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups, np.int64)
    chunks = [(x[i: i + chunk], groups[i: i + chunk]) for i in range(0, len(x), chunk)]
    import ray

    use_ray = kw.get("use_ray")
    if use_ray or (use_ray is None and ray.is_initialized()):
        # Put each chunk in the object store once; passing the arrays themselves would copy them in again on
        # every iteration (and grow the driver's resident shared memory with them).
        chunks = [ray.put(c) for c in chunks]
    return distributed_kmeans(chunks, _identity_load, k, n_groups=n_groups, **kw)


def _identity_load(chunk):
    return chunk


# ---------------------------------------------------------------------------------------------------------------
# batched k-means: one small problem per image, vectorised
# ---------------------------------------------------------------------------------------------------------------


def batched_kmeans(x, valid, k: int, iters: int = 20, seed: int = 0, device: str = "cpu"):
    """Spherical k-means on B independent sets at once.

    x: (B, N, D) unit vectors, zero-padded; valid: (B, N) bool. Returns labels (B, N) (-1 on padding) and
    centroids (B, k, D). A set with fewer than k points gets one cluster per point. ``device``: a torch device;
    seeded per device (the same seed gives the same result on the same kind of device).
    """
    import torch

    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    valid = torch.as_tensor(valid, dtype=torch.bool, device=device)
    B, N, D = x.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    n_valid = valid.sum(1)
    # k-means++ seeding, vectorised over the batch.
    cent = torch.zeros(B, k, D, device=device)
    first = (torch.rand(B, generator=gen, device=device) * n_valid.clamp(min=1)).long()
    idx_valid = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid positions first
    ar = torch.arange(B, device=device)
    cent[:, 0] = x[ar, idx_valid[ar, first]]
    dist = (1 - torch.bmm(x, cent[:, 0, :, None])[..., 0]).clamp(min=0) * valid
    trials = 2 + int(np.log(k))  # greedy k-means++, as for the distributed k-means
    for i in range(1, k):
        total = dist.sum(1, keepdim=True)
        probs = torch.where(total > EPS, dist / total.clamp(min=EPS), valid.float() / n_valid.clamp(min=1)[:, None])
        probs = probs + (probs.sum(1, keepdim=True) <= 0).float()  # an all-padding row: any index will do
        cand = torch.multinomial(probs, trials, replacement=True, generator=gen)  # (B, trials)
        cand_x = x[ar[:, None], cand]  # (B, trials, D)
        cand_sim = torch.bmm(cand_x, x.transpose(1, 2))  # (B, trials, N)
        cand_d = torch.minimum(dist[:, None], (1 - cand_sim).clamp(min=0) * valid[:, None])
        best = cand_d.sum(-1).argmin(1)
        cent[:, i] = cand_x[ar, best]
        dist = cand_d[ar, best]
    labels = torch.zeros(B, N, dtype=torch.long, device=device)
    validf = valid.float()
    ks = torch.arange(k, device=device)[None, :, None]
    for _ in range(iters):
        sim = torch.bmm(x, cent.transpose(1, 2))  # (B, N, k)
        new_labels = sim.argmax(-1)
        onehot = (new_labels[:, None, :] == ks).float() * validf[:, None]  # (B, k, N)
        sums = torch.bmm(onehot, x)
        counts = onehot.sum(2)
        norm = sums.norm(dim=-1, keepdim=True)
        cent = torch.where(counts[..., None] > 0, sums / norm.clamp(min=EPS), cent)  # empty: keep old centroid
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
