"""Many small spherical k-means problems (one per image) vectorised over a padded batch with torch: no Python loop
per image. Each image's k-means++ draws come from its own id, and its centroid sums are exact, so its result does
not depend on the other images of its batch or shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .kmeans import EPS
from .sampling import id_hash, row_keys, uniforms


def _coarse_bmm(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``onehot -> onehot @ round(x * 2^10)`` (the sums in units of a coarse grid, exactly, as float64).

    The Lloyd updates of :func:`batched_kmeans` sum the vectors on a coarse grid (multiples of 2^-10, 1e-3 of a
    unit vector's length, far below what moves a cluster): in units of that grid they are integers small enough
    that float32 sums of up to 2^14 of them are exact in any order, so a set's centroids do not depend on the
    padding of its batch, and no float64 copy of the batch is read on every step. Only the direction of a sum is
    used, so the grid's scale is never divided out."""
    units = torch.mul(x, 1024).round_()
    if x.shape[1] > 1 << 14:  # more rows than float32 sums exactly
        units = units.double()
        return lambda onehot: torch.bmm(onehot.double(), units)
    return lambda onehot: torch.bmm(onehot, units).double()


def kmeans_draws(image_ids: Sequence[str], k: int, seed: int) -> np.ndarray:
    """The uniform numbers :func:`batched_kmeans` seeds each image with, from the image's own id: an image's
    clustering does not depend on the other images of its batch or shard."""
    n = 1 + (k - 1) * (2 + int(np.log(k)))
    base = np.repeat(id_hash(image_ids), n)
    return uniforms(row_keys(base, np.tile(np.arange(n), len(image_ids))), seed).reshape(len(image_ids), n)


IMAGE_BATCH = 4  # images per batched_kmeans call: 4 x 784 x 384 floats stay in cache (16 or more did not)


def batched_kmeans(
    x: np.ndarray,
    valid: np.ndarray,
    k: int,
    iters: int = 20,
    seed: int = 0,
    device: str = "cpu",
    draws: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on B independent sets at once.

    x: (B, N, D) unit vectors on the grid, zero-padded; valid: (B, N) bool. Returns labels (B, N) (-1 on padding)
    and centroids (B, k, D). A set with fewer than k points gets one cluster per point. ``draws`` (B, 1 + (k-1) *
    trials) uniform numbers for the k-means++ seeding of each set (:func:`kmeans_draws`); without them they come
    from a generator seeded with ``seed``. Centroid sums are exact (:func:`_coarse_bmm`), so a set's result does
    not depend on the padding its batch needs. Batches of a few images (:data:`IMAGE_BATCH`) stay in cache.
    """
    with torch.inference_mode():  # no autograd bookkeeping: a call is a few dozen small tensor operations
        return _batched_kmeans(x, valid, k, iters, seed, device, draws)


def _batched_kmeans(
    x: np.ndarray, valid: np.ndarray, k: int, iters: int, seed: int, device: str, draws: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
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
    seed_sims = [torch.bmm(x, cent[:, 0, :, None])[..., 0]]  # each seed's similarity to every point: (B, N)
    dist = (1 - seed_sims[0]).clamp(min=0) * valid
    for i in range(1, k):
        weights = dist.double()
        flat = weights.sum(1, keepdim=True) <= EPS  # all points on the centres: any valid point will do
        weights = torch.where(flat, valid.double(), weights)
        weights = weights + (weights.sum(1, keepdim=True) <= 0).double()  # an all-padding row: any index
        cdf = torch.cumsum(weights, dim=1)
        u = draws[:, 1 + (i - 1) * trials : 1 + i * trials] * cdf[:, -1:]
        cand = torch.searchsorted(cdf, u, right=True).clamp(max=N - 1)  # (B, trials)
        cand_x = x[ar[:, None], cand]  # (B, trials, D)
        cand_sim = torch.bmm(cand_x, x.transpose(1, 2))  # (B, trials, N)
        cand_d = torch.minimum(dist[:, None], (1 - cand_sim).clamp(min=0) * valid[:, None])
        best = cand_d.double().sum(-1).argmin(1)
        cent[:, i] = cand_x[ar, best]
        dist = cand_d[ar, best]
        seed_sims.append(cand_sim[ar, best])
    sim = torch.stack(seed_sims, -1)  # the first assignment, from the seeding's own products
    labels = None
    validf = valid.float()
    ks = torch.arange(k, device=device)[None, :, None]
    coarse_sum = _coarse_bmm(x)
    for _ in range(iters):
        new_labels = (sim if labels is None else torch.bmm(x, cent.transpose(1, 2))).argmax(-1)  # (B, N)
        if labels is not None and torch.equal(new_labels, labels):
            break  # converged: the centroids are already this partition's
        labels = new_labels
        onehot = (labels[:, None, :] == ks).float() * validf[:, None]  # (B, k, N)
        sums = coarse_sum(onehot)
        counts = onehot.sum(2)
        norm = sums.norm(dim=-1, keepdim=True)
        cent = torch.where(counts[..., None] > 0, (sums / norm.clamp(min=EPS)).float(), cent)  # empty: keep old
    else:
        labels = torch.bmm(x, cent.transpose(1, 2)).argmax(-1)  # the partition of the last centroids
    # Fewer points than clusters: each point is its own cluster.
    small = n_valid < k
    if small.any():
        labels[small] = torch.arange(N, device=device).clamp(max=k - 1)[None].expand(int(small.sum()), N)
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return labels.cpu().numpy(), cent.cpu().numpy()
