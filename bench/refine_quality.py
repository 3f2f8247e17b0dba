"""Refinement measured on real edges: each refiner's foreground IoU, boundary F-score and CPU time per image.

The VOC and COCO photos' true masks (``../shared/data``) are brought down to the patch grid of a ViT-S/8 at
``max_side`` 512 (each patch's foreground share) and made into soft scores the way the cluster stage makes them
(three levels' votes, combine_votes's logistic of their share), after blur, noise and flipped votes along the
boundary of three strengths (``tests/helpers/edges.py``). Each refiner then brings the score back to the
photo through the same ``refine_image`` the refine stage calls. No pretrained weights are needed: this measures
refinement itself. CPU time is this process's with torch on one thread (core-seconds per image).

    python bench/refine_quality.py [--n 0] [--strengths clean mild strong] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the real-edge helpers (tests/helpers/edges.py)
from common import machine  # noqa: E402

from helpers.edges import PATCH, STRENGTHS, boundary_f, patch_score, photos, truth  # noqa: E402
from mlcseg_ray.core.config import Config  # noqa: E402
from mlcseg_ray.formats.images import load_rgb  # noqa: E402
from mlcseg_ray.ops.crf import CrfParams, refine_image  # noqa: E402

REFINERS = {
    "bilinear (no CRF)": {"crf": False},
    "densecrf, full resolution": {"crf_backend": "densecrf", "crf_max_side": 0},
    "densecrf, crf_max_side 384": {"crf_backend": "densecrf"},
    "torch, crf_max_side 384 (default)": {"crf_backend": "torch"},
    "torch, full resolution": {"crf_backend": "torch", "crf_max_side": 0},
}


def measure(items, cfg: Config) -> dict:
    """Dataset-wide foreground IoU (intersections and unions summed), mean boundary F, CPU s per image."""
    inter = union = 0
    bf, cpu = [], 0.0
    for rgb, score, g, fg, scored in items:
        t0 = time.process_time()
        pred = refine_image(rgb, score, g, PATCH, CrfParams.of(cfg))
        cpu += time.process_time() - t0
        inter += int((pred & fg & scored).sum())
        union += int(((pred | fg) & scored).sum())
        bf.append(boundary_f(pred, fg, max(2, round(0.008 * np.hypot(*fg.shape)))))
    return {"iou": inter / max(union, 1), "boundary_f": float(np.mean(bf)), "cpu_s_per_image": cpu / len(items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=0, help="photos of each dataset (0: all 59 VOC and 66 COCO)")
    ap.add_argument("--strengths", nargs="+", default=list(STRENGTHS), choices=list(STRENGTHS))
    ap.add_argument("--refiners", nargs="+", default=list(REFINERS), choices=list(REFINERS))
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # core-seconds: one thread, as a refine task on one CPU runs
    data = [(ds, load_rgb(str(p), Config().max_pixels), truth(m)) for ds, p, m in photos(args.n)]
    out = {"machine": machine(), "images": {ds: sum(d == ds for d, *_ in data) for ds in ("voc", "coco")}, "rows": []}
    print(f"# {out['machine']}; {out['images']}", file=sys.stderr)
    for strength in args.strengths:
        rng = np.random.default_rng(0)
        made = [(ds, rgb, *patch_score(fg, STRENGTHS[strength], rng), fg, scored) for ds, rgb, (fg, scored) in data]
        for name in args.refiners:
            cfg = Config(**REFINERS[name])
            for ds in ("voc", "coco"):
                r = measure([m[1:] for m in made if m[0] == ds], cfg)
                out["rows"].append({"strength": strength, "refiner": name, "dataset": ds, **r})
                if not args.json:
                    print(
                        f"{strength:7s} {ds:5s} {name:34s} IoU {100 * r['iou']:6.2f}  boundary F "
                        f"{100 * r['boundary_f']:6.2f}  {r['cpu_s_per_image']:.3f} core-s/image",
                        flush=True,
                    )
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
