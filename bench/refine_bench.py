"""Refinement (upsampling + DenseCRF) milliseconds per megapixel, and its speed-up from 1 to 2 Ray workers.

Real VOC photos with a synthetic patch score (a centred ellipse, as a pseudo-mask looks), measured through the
same plain function the refine stage calls, as Ray tasks on a Ray started with 1 CPU and then with 2.

    python bench/refine_bench.py [--n 32]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine  # noqa: E402

from mlcseg_ray.config import Config  # noqa: E402
from mlcseg_ray.features import geometry  # noqa: E402
from mlcseg_ray.imageio import load_rgb  # noqa: E402
from mlcseg_ray.executor import ray_map  # noqa: E402
from mlcseg_ray.refine import refine_image  # noqa: E402


def refine_chunk(paths, cfg_dict):
    cfg = Config(**cfg_dict)
    px = 0
    for p in paths:
        rgb = load_rgb(p, cfg.max_pixels)
        g = geometry(rgb.shape[1], rgb.shape[0], 8, 512, False).__dict__
        yy, xx = np.mgrid[: g["grid_h"], : g["grid_w"]]
        dy, dx = (yy - g["grid_h"] / 2) / (g["grid_h"] / 3), (xx - g["grid_w"] / 2) / (g["grid_w"] / 3)
        score = np.exp(-(dy ** 2 + dx ** 2))
        refine_image(rgb, score.ravel().astype(np.float32), g, 8, cfg)
        px += rgb.shape[0] * rgb.shape[1]
    return px


def run(paths, cpus, chunk=4):
    import ray

    ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    ray_map(refine_chunk, chunks[:1], Config().model_dump())  # warm the workers
    t0 = time.perf_counter()
    px = sum(ray_map(refine_chunk, chunks, Config().model_dump()))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds, px


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    paths = [str(p) for p in sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]]
    t1, px = run(paths, 1)
    t2, _ = run(paths, 2)
    print(f"machine: {machine()}")
    print(f"{len(paths)} VOC photos, {px / 1e6:.1f} MP, CRF 10 iterations")
    print(f"1 worker : {t1:.1f}s = {t1 * 1000 / (px / 1e6):.0f} ms/MP")
    print(f"2 workers: {t2:.1f}s = {t2 * 1000 / (px / 1e6):.0f} ms/MP")
    print(f"speed-up 1 -> 2 workers: {t1 / t2:.2f}x")


if __name__ == "__main__":
    main()
