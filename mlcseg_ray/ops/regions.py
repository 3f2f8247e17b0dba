"""Object regions of a binary mask and what describes them: connected components (bounded in number), their box
crops for the backbone, or the mean of the feature-store keys under them."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def find_regions(mask: np.ndarray, mode: str, min_area: int, max_regions: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Component map (0 = none, 1..R = regions kept) and each region's box, area and joined pixels.

    Components smaller than ``min_area`` become background. With ``max_regions`` > 0, only the largest that many
    components are regions of their own (each one descriptor: the work per image is bounded whatever the mask's
    fragmentation); every other component joins the kept region nearest to it, taking its class. A region's box
    and area are those of its own component (what its descriptor sees); ``joined`` counts the pixels it took in."""
    if mode == "image":
        comp = mask.astype(np.int32)
        n = int(mask.any())
    else:
        comp, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    regions, keep = [], np.zeros(n + 1, np.int32)
    if not n:
        return keep[comp], regions
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(comp)
    big = [r for r in range(1, n + 1) if areas[r] >= min_area and boxes[r - 1] is not None]
    kept = big
    if max_regions and len(big) > max_regions:
        kept = sorted(sorted(big, key=lambda r: (-areas[r], r))[:max_regions])  # the largest, in scan order
    for r in kept:
        keep[r] = len(regions) + 1
        ys, xs = boxes[r - 1]
        regions.append(
            {
                "region": len(regions) + 1,
                "x0": xs.start,
                "y0": ys.start,
                "x1": xs.stop,
                "y1": ys.stop,
                "area": int(areas[r]),
                "joined": 0,
            }
        )
    out = keep[comp]
    dropped = [r for r in big if not keep[r]]
    if dropped:
        # each dropped component's pixels take the label of the nearest kept pixel
        _, (iy, ix) = ndimage.distance_transform_edt(out == 0, return_indices=True)
        joining = np.isin(comp, dropped)
        out[joining] = out[iy[joining], ix[joining]]
        joined = np.bincount(out[joining], minlength=len(regions) + 1)
        for reg in regions:
            reg["joined"] = int(joined[reg["region"]])
    return out, regions


def crop_batch(rgb: np.ndarray, regions: list[dict], size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """The regions' box crops, resized to ``size`` square and normalised: (R, 3, size, size) float32."""
    out = []
    img = Image.fromarray(rgb)
    for r in regions:
        crop = img.crop((r["x0"], r["y0"], r["x1"], r["y1"])).resize((size, size), Image.BICUBIC)
        a = (np.asarray(crop, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(a.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, 3, size, size), np.float32)


def masked_mean_descriptors(
    comp: np.ndarray, regions: list[dict], keys: np.ndarray, grid: tuple[int, int], geom: dict, patch: int
) -> np.ndarray:
    """Mean key of the patches whose centres fall inside each region (the nearest patch when none does)."""
    gh, gw = grid
    H, W = comp.shape
    scale = geom["scale"]
    cy = np.clip(((np.arange(gh) + 0.5) * patch / scale).astype(int), 0, H - 1)
    cx = np.clip(((np.arange(gw) + 0.5) * patch / scale).astype(int), 0, W - 1)
    at_centres = comp[np.ix_(cy, cx)].ravel()
    out = []
    for r in regions:
        sel = at_centres == r["region"]
        if not sel.any():
            py = min(gh - 1, int((r["y0"] + r["y1"]) / 2 * scale / patch))
            px = min(gw - 1, int((r["x0"] + r["x1"]) / 2 * scale / patch))
            sel = np.zeros(gh * gw, bool)
            sel[py * gw + px] = True
        out.append(keys[sel].mean(0))
    return np.asarray(out, np.float32).reshape(len(regions), keys.shape[1])
