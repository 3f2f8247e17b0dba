"""k-means benchmarks, side by side in one run.

1. the dataset-level k-means as the cluster stage runs it (Ray tasks over Parquet shards of float16 keys: one
   pass draws a bounded sample, the fit runs in memory on it, one pass assigns every vector) vs
   ``faiss.Kmeans(spherical=True)`` in memory on all the same N x D vectors, same k and iterations: final
   inertia sum(1 - cos) over every vector, and wall time.
2. batched image-level k-means (torch, vectorised over images) vs a scikit-learn ``KMeans`` loop, per image:
   wall time and partition agreement up to label permutation.

    python bench/kmeans_bench.py [--n 2000000] [--dim 384] [--k 20] [--iters 10] [--sample 100000] [--images 1000]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine

from mlcseg_ray.backends.ray import ray_map
from mlcseg_ray.backends.ray_runtime import init_ray
from mlcseg_ray.core.run_dir import list_shards
from mlcseg_ray.formats.feature_store import brought_store_metadata, write_store_shard
from mlcseg_ray.library.clustering import KeyLoader
from mlcseg_ray.ops.batched_kmeans import IMAGE_BATCH, batched_kmeans
from mlcseg_ray.ops.kmeans import assign, l2_normalize, sampled_kmeans, unit_vectors


def mixture(n, dim, k, rng):
    centers = l2_normalize(rng.normal(size=(k, dim)))
    return centers[rng.integers(0, k, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)


def _warm(shard):
    return shard


def bench_distributed(args, work):
    rng = np.random.default_rng(0)
    meta = brought_store_metadata(args.dim, 8)
    per_image, per_shard = 784, 64
    n_images = args.n // per_image
    shard = 0
    for s in range(0, n_images, per_shard):
        recs = [
            {
                "image_id": f"i{j:07d}",
                "keys": mixture(per_image, args.dim, args.k, rng),
                "grid_h": 28,
                "grid_w": 28,
                "cls_attn": np.zeros(per_image),
                "cls_token": np.zeros(args.dim),
            }
            for j in range(s, min(n_images, s + per_shard))
        ]
        write_store_shard(work, shard, recs, args.dim, meta)
        shard += 1
    shards = list_shards(work / "features")
    load = KeyLoader()
    x = np.concatenate([load(p)[0] for p in shards])  # the same (float16-rounded, normalised) vectors for faiss
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(args.dim, args.k, niter=args.iters, spherical=True, seed=0, max_points_per_centroid=10**9)
    km.train(x)
    faiss_s = time.perf_counter() - t0
    _, sims = assign(x, l2_normalize(km.centroids))
    faiss_inertia = float(np.sum(1 - sims))
    del x
    ray_map(_warm, [shards[0]] * 2)  # Ray's worker processes started before the clock, as faiss's threads are
    t0 = time.perf_counter()
    res = sampled_kmeans(
        shards,
        load,
        args.k,
        iters=args.iters,
        tol=0.0,
        seed=0,
        sample=args.sample,
        sizes=[n_images * per_image],
        map_fn=ray_map,
    )
    ours_s = time.perf_counter() - t0
    print(f"vectors {len(shards)} shards, {n_images * per_image:,} x {args.dim}, k={args.k}, {args.iters} iterations")
    print(f"faiss.Kmeans in memory : {faiss_s:8.1f}s  inertia {faiss_inertia:,.1f}")
    print(
        f"sampled (Ray)          : {ours_s:8.1f}s  inertia {res.inertia:,.1f}  ({res.sample_size:,}-vector "
        f"sample, {res.passes} passes over the shards)"
    )
    print(f"ratios ours/faiss: time {ours_s / faiss_s:.2f}x, inertia {res.inertia / faiss_inertia:.4f}x")


def bench_batched(args):
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    n, dim = 784, args.dim
    # unit vectors on the summation grid, as the cluster stage hands them over
    xs = np.stack([unit_vectors(mixture(n, dim, 3, rng)) for _ in range(args.images)]).astype(np.float32)
    valid = np.ones(xs.shape[:2], bool)
    # ours first: OpenMP worker threads left spinning by scikit-learn would slow torch down (and vice versa)
    batched_kmeans(xs[:IMAGE_BATCH], valid[:IMAGE_BATCH], 3, seed=0)  # torch's first call (thread pool) untimed
    t0 = time.perf_counter()
    labels = np.concatenate(
        [
            batched_kmeans(xs[i : i + IMAGE_BATCH], valid[i : i + IMAGE_BATCH], 3, seed=0)[0]
            for i in range(0, len(xs), IMAGE_BATCH)
        ]
    )  # as cluster_shard batches them
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [KMeans(3, n_init=1, random_state=0).fit_predict(x) for x in xs]
    sk_s = time.perf_counter() - t0
    agree = 0
    for r, lab in zip(ref, labels, strict=True):
        m = np.zeros((3, 3))
        np.add.at(m, (r, lab), 1)
        a, b = linear_sum_assignment(-m)
        agree += m[a, b].sum()
    print(f"image level, {args.images} images x {n} patches x {dim}, k=3")
    print(f"sklearn KMeans loop : {sk_s:7.2f}s")
    print(f"batched (torch, {IMAGE_BATCH} images per call): {ours_s:7.2f}s")
    print(f"speed-up {sk_s / ours_s:.1f}x, same partition on {agree / labels.size * 100:.2f}% of patches")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sample", type=int, default=100_000, help="the sample the fit sees (kmeans_sample)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--skip-distributed", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    bench_batched(args)
    if not args.skip_distributed:
        init_ray()
        work = Path(tempfile.mkdtemp(prefix="mlcseg-kmeans-"))
        try:
            bench_distributed(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
