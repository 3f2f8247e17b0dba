"""The CPU work per image of each stage on a GPU node, in core-seconds at ``max_side`` 512: what stays on the CPUs
when the network runs on a GPU (deploy/README.md's GPU-node arithmetic is made from these figures).

On the 59 VOC photos, one thread, in this process, each part through the plain functions the stages call:
extract's decode and preprocessing, and its feature shard written (keys of the real shape: a GPU hands them back
and the CPU writes them); refine's decode, the torch refiner and the PNG; describe's regions and crops (decode,
components, crop resizing; the crops' forward is GPU work). The cluster stage's labelling pass is
``bench/cluster_labelling.py``; label's class k-means and writes are small (``bench/e2e_bench.py``: 0.016 s/image).

    python bench/cpu_per_image.py [--n 59]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.feature_store import FEATURE_WRITE_OPTIONS, feature_table
from mlcseg_ray.formats.images import load_rgb
from mlcseg_ray.formats.masks import png_bytes
from mlcseg_ray.library.extraction import prepare_images
from mlcseg_ray.ops.crf import CrfParams, refine_image
from mlcseg_ray.ops.regions import crop_batch, find_regions

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INFO = {"patch_size": 8, "mean": MEAN, "std": STD, "embed_dim": 384}


class Clock:
    """CPU seconds per named part."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def time(self, part: str, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        self.parts[part] = self.parts.get(part, 0.0) + time.process_time() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=59)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cfg = Config()
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]
    rows = [{"image_id": p.stem, "uri": str(p)} for p in paths]
    clock, rng = Clock(), np.random.default_rng(0)
    prepared, _ = clock.time("extract: decode + preprocess", prepare_images, rows, INFO, cfg)
    per_image = [
        (
            i,
            rng.standard_normal((g.grid_h * g.grid_w, 384)).astype(np.float32),
            rng.random(g.grid_h * g.grid_w),
            g.grid_w,
        )
        for i, g, _ in prepared
    ]
    with tempfile.TemporaryDirectory() as tmp:
        # twice: an actor writes shard after shard, into memory it has used before; the first write also pays for
        # fresh pages, which on this VM cost more than the work (BENCHMARKS.md, issue 23)
        for part in ("extract: feature shard written (first shard)", "extract: feature shard written"):
            clock.time(
                part,
                lambda: pq.write_table(feature_table(per_image, 384), f"{tmp}/f.parquet", **FEATURE_WRITE_OPTIONS),
            )
    path_of = {p.stem: p for p in paths}
    for image_id, g, _ in prepared:
        path = path_of[image_id]
        yy, xx = np.mgrid[: g.grid_h, : g.grid_w]
        blob = ((yy - g.grid_h / 2) / g.grid_h) ** 2 + ((xx - g.grid_w / 2) / g.grid_w) ** 2 < 0.08
        score = np.where(blob, 0.95, 0.05).astype(np.float32).ravel()
        rgb = clock.time("refine: decode", load_rgb, str(path), cfg.max_pixels)
        mask = clock.time("refine: torch refiner", refine_image, rgb, score, g.__dict__, 8, CrfParams.of(cfg))
        clock.time("refine: PNG", png_bytes, mask.astype(np.uint8) * 255)
        rgb = clock.time("describe: decode", load_rgb, str(path), cfg.max_pixels)
        _, regions = clock.time(
            "describe: regions", find_regions, mask, cfg.region, cfg.min_region_area, cfg.max_regions
        )
        if regions:
            clock.time("describe: crops", crop_batch, rgb, regions, cfg.crop_size, MEAN, STD)
    n = len(paths)
    print(f"# {machine()}; {n} VOC photos, max_side {cfg.max_side}, one thread")
    print("| part | core-s/image |\n|---|---|")
    for part, seconds in clock.parts.items():
        print(f"| {part} | {seconds / n:.4f} |")
    for stage in ("extract", "refine", "describe"):
        total = sum(s for p, s in clock.parts.items() if p.startswith(stage) and "first" not in p)
        print(f"| **{stage}, CPU side** | **{total / n:.4f}** |")


if __name__ == "__main__":
    main()
