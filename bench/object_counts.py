"""Objects per image in the real masks of ../shared/data: where the ``max_regions`` default comes from.

The pipeline's regions are connected components of the binary foreground at least ``min_region_area`` (256) px
large, so the same is counted here on the ground truth (touching objects are one component in both).

    python bench/object_counts.py
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def components(paths, foreground, min_area: int = 256) -> np.ndarray:
    out = []
    for p in paths:
        comp, _ = ndimage.label(foreground(np.asarray(Image.open(p))), structure=np.ones((3, 3), int))
        out.append(int((np.bincount(comp.ravel())[1:] >= min_area).sum()))
    return np.asarray(out)


def main():
    sets = {
        "VOC 2012 val (1,449 masks)": (
            sorted((DATA / "voc2012_val_masks/SegmentationClass").glob("*.png")),
            lambda a: (a > 0) & (a < 255),
        ),
        "COCO val2014 subset (66 masks)": (sorted((DATA / "coco_val2014_subset/masks").glob("*.png")), lambda a: a > 0),
    }
    print("| masks | mean | median | p90 | p95 | p99 | max | images with <= 8 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (paths, fg) in sets.items():
        if not paths:
            sys.exit(f"no masks under {DATA}")
        c = components(paths, fg)
        p = np.percentile(c, [90, 95, 99])
        print(
            f"| {name} | {c.mean():.2f} | {np.median(c):.0f} | {p[0]:.0f} | {p[1]:.0f} | {p[2]:.0f} | {c.max()} | "
            f"{(c <= 8).mean():.1%} |"
        )


if __name__ == "__main__":
    main()
