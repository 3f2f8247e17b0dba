"""Refinement (upsampling + the CRF of ``--backend``: pydensecrf's DenseCRF by default, as this bench has always
measured; ``bench/refine_quality.py`` compares the refiners) milliseconds per megapixel, its speed-up from 1 to 2
Ray workers, and what the CRF's bounded resolution (``crf_max_side``) saves and changes.

Real VOC and COCO photos with a synthetic patch score (a centred ellipse, as a pseudo-mask looks), measured
through the same plain function the refine stage calls: as Ray tasks on a Ray started with 1 CPU and then with 2;
then in this process at full resolution and at each ``crf_max_side``, counting the pixels whose label differs.

    python bench/refine_bench.py [--n 32] [--sides 512 384] [--backend densecrf|torch]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHARED, VOC_IMAGES, machine

from mlcseg_ray.backends.ray import ray_map
from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.images import load_rgb
from mlcseg_ray.library.extraction import geometry
from mlcseg_ray.ops.crf import CrfParams, refine_image


def ellipse_score(rgb):
    """A pseudo-mask's soft score: a centred ellipse on the patch grid of a ViT-S/8 at max_side 512."""
    g = geometry(rgb.shape[1], rgb.shape[0], 8, 512, False).__dict__
    yy, xx = np.mgrid[: g["grid_h"], : g["grid_w"]]
    dy, dx = (yy - g["grid_h"] / 2) / (g["grid_h"] / 3), (xx - g["grid_w"] / 2) / (g["grid_w"] / 3)
    return np.exp(-(dy**2 + dx**2)).ravel().astype(np.float32), g


def refine_chunk(paths, cfg_dict):
    cfg = Config(**cfg_dict)
    px = 0
    for p in paths:
        rgb = load_rgb(p, cfg.max_pixels)
        score, g = ellipse_score(rgb)
        refine_image(rgb, score, g, 8, CrfParams.of(cfg))
        px += rgb.shape[0] * rgb.shape[1]
    return px


def bounded(paths, sides, backend):
    """Seconds and the share of pixels that change, full resolution vs each crf_max_side, in this process."""
    images = [(rgb, *ellipse_score(rgb)) for rgb in (load_rgb(p, Config().max_pixels) for p in paths)]
    out = {}
    masks = {}
    for side in [0, *sides]:
        cfg = Config(crf_max_side=side, crf_backend=backend)
        t0 = time.perf_counter()
        masks[side] = [refine_image(rgb, score, g, 8, CrfParams.of(cfg)) for rgb, score, g in images]
        seconds = time.perf_counter() - t0
        changed = sum(int((a != b).sum()) for a, b in zip(masks[0], masks[side], strict=True))
        out[side] = (seconds, changed / sum(m.size for m in masks[0]))
    return out


def run(paths, cpus, backend, chunk=4):
    import ray

    ray.init(
        address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR"
    )
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    cfg = Config(crf_backend=backend).model_dump()
    ray_map(refine_chunk, [paths[:1]] * cpus, cfg)  # one task per CPU at once: every worker warm
    t0 = time.perf_counter()
    px = sum(ray_map(refine_chunk, chunks, cfg))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds, px


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 384])
    ap.add_argument("--backend", choices=["densecrf", "torch"], default="densecrf")
    args = ap.parse_args()
    paths = [str(p) for p in sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]]
    t1, px = run(paths, 1, args.backend)
    t2, _ = run(paths, 2, args.backend)
    print(f"machine: {machine()}")
    print(f"{len(paths)} VOC photos, {px / 1e6:.1f} MP, {args.backend} CRF, 10 iterations")
    print(f"1 worker : {t1:.1f}s = {t1 * 1000 / (px / 1e6):.0f} ms/MP")
    print(f"2 workers: {t2:.1f}s = {t2 * 1000 / (px / 1e6):.0f} ms/MP")
    print(f"speed-up 1 -> 2 workers: {t1 / t2:.2f}x")
    coco = [str(p) for p in sorted((SHARED / "coco_val2014_subset" / "images").glob("*.jpg"))[: args.n]]
    print("| photos | crf_max_side | seconds | speed-up | pixels changed vs full resolution |")
    print("|---|---|---|---|---|")
    for name, group in (("VOC", paths), ("COCO", coco)):
        res = bounded(group, args.sides, args.backend)
        for side, (seconds, changed) in res.items():
            print(
                f"| {name} ({len(group)}) | {side or 'full'} | {seconds:.1f} | {res[0][0] / seconds:.2f}x | "
                f"{changed:.2%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
