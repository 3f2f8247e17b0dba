"""The cluster stage's labelling pass in core-seconds per image at ``max_side`` 512: one shard task's work (read
the shard's keys, the dataset and category levels' assignment, the per-image k-means, weights, gap test,
combination, the pseudo table written), on one thread, on a planted store of ViT-S/8 geometry (384-d keys, the VOC
masks at 8 px a patch: about 2,900 patches an image) with the levels fitted first (not timed).

    python bench/cluster_labelling.py [--images 128] [--shard-size 64] [--tol 1e-4]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the planted-store generator (tests/helpers)
from common import machine  # noqa: E402

from helpers import VOC_MASKS  # noqa: E402
from helpers.planted import PlantedSpec, generate  # noqa: E402
from mlcseg_ray.core.config import Config  # noqa: E402
from mlcseg_ray.core.stage import StageContext  # noqa: E402
from mlcseg_ray.library.clustering import fit_levels  # noqa: E402
from mlcseg_ray.pipeline import STAGES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4, help="kmeans_tol (0: every k-means runs all its iterations)")
    args = ap.parse_args()
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # core-seconds: one thread, as a shard task on one CPU runs
    work = Path(tempfile.mkdtemp(prefix="mlcseg-label-"))
    spec = PlantedSpec(dim=384, cell=8, n_images=args.images, shard_size=args.shard_size)
    run = generate(work / "store", spec, mask_dir=VOC_MASKS / "SegmentationClass")
    cfg = Config(num_categories=8, kmeans_tol=args.tol)
    ctx = StageContext(run=run, cfg=cfg)
    fits, _ = fit_levels(run, cfg)
    stage = next(s for s in STAGES if s.name == "cluster")
    shards = stage.shards(ctx)
    t0, w0 = time.process_time(), time.perf_counter()
    images = sum(stage.process_shard(ctx, s, fits)["images"] for s in shards)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    print(f"# {machine()}")
    print(
        f"labelling pass: {images} images in {len(shards)} shards of {args.shard_size}, kmeans_tol {args.tol:g}: "
        f"{cpu / images:.3f} core-s/image ({wall / images:.3f} s/image wall, one thread)"
    )


if __name__ == "__main__":
    main()
