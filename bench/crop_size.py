"""What the region crop size costs and changes: describe-stage seconds per image, and how well the class k-means
agrees with the 224 px result (regions matched one to one, classes matched by the Hungarian algorithm), on the VOC
photos, all in one run.

    python bench/crop_size.py [--n 59] [--sizes 224 160 112] [--max-regions 8]

The pipeline runs once up to refine; then describe and label run again for each crop size on the same masks (the
regions are the same; only their descriptors change).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

from mlcseg_ray.backends.ray_runtime import init_ray
from mlcseg_ray.core.config import Config
from mlcseg_ray.pipeline import Pipeline


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of regions whose class agrees after the best one-to-one matching of class ids."""
    from scipy.optimize import linear_sum_assignment

    k = int(max(a.max(), b.max())) + 1
    m = np.zeros((k, k))
    np.add.at(m, (a, b), 1)
    r, c = linear_sum_assignment(-m)
    return float(m[r, c].sum() / len(a))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=59)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 112])
    ap.add_argument("--backbone", default="random-vit-s8")
    ap.add_argument("--max-regions", type=int, default=Config().max_regions)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-crops-"))
    init_ray(num_cpus=torch.get_num_threads())
    base = Config(backbone=args.backbone, max_regions=args.max_regions)
    run = work / "run"
    Pipeline(run, base, voc=str(VOC_IMAGES.parent), limit=args.n).run(["ingest", "extract", "cluster", "refine"])
    print(f"machine: {machine()}")
    print(f"{args.n} VOC photos, {args.backbone}, max_side {base.max_side}, max_regions {args.max_regions}")
    print("| crop px | describe s/image | regions | class agreement with the first size |")
    print("|---|---|---|---|")
    first = None
    for size in args.sizes:
        Pipeline(run, base.model_copy(update={"crop_size": size})).run(["describe", "label"])
        stages = json.loads((run / "run.json").read_text())["stages"]
        regions = pq.read_table(run / "regions.parquet").sort_by([("image_id", "ascending"), ("region", "ascending")])
        classes = regions.column("class_id").to_numpy()
        first = classes if first is None else first
        agree = agreement(first, classes) if len(classes) == len(first) else float("nan")
        print(f"| {size} | {stages['describe']['seconds'] / args.n:.3f} | {len(classes)} | {agree:.1%} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
