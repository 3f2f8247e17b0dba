"""Real edges for the refiners: the VOC and COCO photos' true masks, and patch soft scores made from them the way
the cluster stage makes them (bench/refine_quality.py and tests/ops/test_crf.py)."""

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from helpers import COCO_SUBSET, VOC_SUBSET
from mlcseg_ray.library.extraction import geometry
from mlcseg_ray.ops.levels import SIDE_MARGIN, WEIGHTED_SLOPE

PATCH, MAX_SIDE = 8, 512  # a ViT-S/8 at the default max_side
# name: (blur sigma in patches, noise on each level's view of a patch's foreground share, share of the patches
# along the boundary whose vote flips)
STRENGTHS = {"clean": (0.0, 0.0, 0.0), "mild": (0.7, 0.15, 0.1), "strong": (1.2, 0.3, 0.25)}


def photos(n: int = 0) -> list[tuple[str, Path, Path]]:
    """(dataset, photo, class mask) of the VOC and COCO photos, the first n of each (0: all 59 and 66)."""
    voc = [
        ("voc", p, VOC_SUBSET / "SegmentationClass" / f"{p.stem}.png")
        for p in sorted((VOC_SUBSET / "JPEGImages").glob("*.jpg"))
    ]
    coco = [
        ("coco", p, COCO_SUBSET / "masks" / f"{p.stem}.png") for p in sorted((COCO_SUBSET / "images").glob("*.jpg"))
    ]
    return [x for group in (voc, coco) for x in (group[:n] if n else group)]


def truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, scored pixels) of a class mask: VOC's 255 border band is not scored, and for the boundary it
    goes to its nearest labelled pixel, so that the true boundary runs through the band's middle."""
    m = np.asarray(Image.open(path))
    scored = m != 255
    fg = (m > 0) & scored
    if not scored.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~scored, return_indices=True)
        fg = fg[iy, ix]
    return fg, scored


def patch_score(fg: np.ndarray, strength: tuple, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(soft score on the patch grid, geometry) of a true mask: each patch's foreground share, blurred (attention
    spreads past an object's edge); three levels vote on it, each through its own noise, with some votes along the
    boundary flipped (clustering errors sit where patches are mixed); the score is combine_votes's logistic of the
    vote share, kept on the vote's side of 0.5."""
    H, W = fg.shape
    g = geometry(W, H, PATCH, MAX_SIDE, False).__dict__
    small = np.asarray(Image.fromarray(fg.astype(np.float32)).resize((g["resized_w"], g["resized_h"]), Image.BOX))
    small = np.pad(small, ((0, g["pad_h"]), (0, g["pad_w"])))
    share = small.reshape(g["grid_h"], PATCH, g["grid_w"], PATCH).mean((1, 3))
    blur, noise, flips = strength
    if blur:
        share = ndimage.gaussian_filter(share, blur)
    edge = ndimage.binary_dilation(share > 0.5) & ~ndimage.binary_erosion(share > 0.5)
    votes = [
        (share + rng.normal(0, noise, share.shape) > 0.5) ^ (edge & (rng.random(share.shape) < flips)) for _ in range(3)
    ]
    v = np.mean(votes, 0)
    score = 1 / (1 + np.exp(-WEIGHTED_SLOPE * (v - 0.5)))
    score = np.where(v > 0.5, np.maximum(score, 0.5 + SIDE_MARGIN), np.minimum(score, 0.5 - SIDE_MARGIN))
    return score.astype(np.float32).ravel(), g


def boundary_f(pred: np.ndarray, fg: np.ndarray, tol: int) -> float:
    """Boundary F-score: the share of each mask's boundary pixels within ``tol`` px of the other's (DAVIS)."""

    def boundary(m: np.ndarray) -> np.ndarray:
        return m ^ ndimage.binary_erosion(m, border_value=1)

    bp, bt = boundary(pred), boundary(fg)
    if not bp.any() or not bt.any():
        return float(bp.any() == bt.any())
    precision = (bp & ndimage.binary_dilation(bt, iterations=tol)).sum() / bp.sum()
    recall = (bt & ndimage.binary_dilation(bp, iterations=tol)).sum() / bt.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
