"""``mlcseg ablate RUN GT``: which clustering level and which combine rule work on a labelled subset.

One cluster run already holds, per image, the three level masks, each level's weight and the CLS attention
(``pseudo/``), so every rule is recomputed from them: nothing is extracted or clustered again. Each rule's soft
score goes through the refine stage's own upsampling (its foreground IoU "at patch resolution" is what the run
would give with ``crf=false``); the best ``refine_top`` rules are also refined with the run's DenseCRF. Foreground
is every labelled class (> 0) of the ground truth; its ignore value is left out.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from .cluster import combine_votes, weighted_share
from .config import Config
from .evaluate import GroundTruth
from .store import RunDir, atomic_write_json, list_shards, shard_index

log = logging.getLogger("mlcseg_ray")

# rule name -> (combine rule, vote threshold or weighted-share threshold)
RULES: dict[str, tuple[str, float]] = {
    "dataset": ("dataset", 0), "category": ("category", 0), "image": ("image", 0),
    "union": ("union", 0), "vote 2 of 3": ("vote", 2), "intersection": ("intersection", 0),
    "weighted": ("weighted", 0.5), "weighted share > 0.3": ("weighted", 0.3),
    "weighted share > 0.7": ("weighted", 0.7),
}
SINGLE_LEVELS = ("dataset", "category", "image")


def rule_score(row: dict, rule: str) -> np.ndarray:
    """One image's soft score under ``rule`` (above 0.5 exactly where the rule says foreground)."""
    combine, t = RULES[rule]
    levels = np.stack([np.asarray(row[k], np.uint8) for k in SINGLE_LEVELS])
    attn = np.asarray(row["attn"], np.float32)
    weights = np.asarray(row["weights"], np.float32)
    if combine == "weighted" and t != 0.5:  # another threshold on the weighted share: shift it to one half
        return np.where(weighted_share(levels, weights) > t, 0.75, 0.25).astype(np.float32)
    return combine_votes(levels, attn, combine, int(t) or 2, weights)[1]


def _foreground(gt: GroundTruth, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, counted) pixel maps of one ground-truth image."""
    a = gt.read(image_id)
    counted = a != gt.ignore
    return (a > 0) & counted, counted


def ablate(run: RunDir, gt: GroundTruth, cfg: Config, refine_top: int = 2,
           on_image: Callable[[], None] | None = None) -> dict:
    """Foreground IoU of every rule (``RULES``) over the run's images that have ground truth; the best
    ``refine_top`` also after the DenseCRF. Writes ``RUN/ablation.json`` and returns the same dict."""
    from .features import read_store_metadata
    from .imageio import load_rgb
    from .refine import crf_refine, upsample_score

    parts = list_shards(run.pseudo, "part")
    if not parts:
        raise FileNotFoundError(f"no pseudo-masks in {run.pseudo}: run cluster first")
    patch = int(read_store_metadata(list_shards(run.features)[0])["patch_size"])
    if "weights" not in pq.read_schema(parts[0]).names:
        raise ValueError(f"{run.pseudo} was written before the level weights were stored: run "
                         f"'mlcseg cluster --out {run.root}' again (it recomputes only the clustering)")
    wanted = set(gt.image_ids)
    inter = {r: 0 for r in RULES}
    union = {r: 0 for r in RULES}
    images, skipped = [], []
    for part in parts:
        rows = [r for r in pq.read_table(part).to_pylist() if r["image_id"] in wanted]
        if not rows:
            continue
        geoms = {g["image_id"]: g for g in pq.read_table(
            run.image_table(shard_index(part)),
            columns=["image_id", "uri", "width", "height", "grid_h", "grid_w", "resized_h", "resized_w"]).to_pylist()}
        for row in rows:
            g = geoms[row["image_id"]]
            fg, counted = _foreground(gt, row["image_id"])
            if fg.shape != (g["height"], g["width"]):
                skipped.append(f"{row['image_id']}: ground truth is {fg.shape[1]}x{fg.shape[0]}, the image "
                               f"{g['width']}x{g['height']}")
                continue
            for rule in RULES:
                prob = upsample_score(rule_score(row, rule), (g["grid_h"], g["grid_w"]), patch,
                                      (g["resized_h"], g["resized_w"]), (g["height"], g["width"]))
                pred = prob > 0.5
                inter[rule] += int((pred & fg).sum())
                union[rule] += int(((pred | fg) & counted).sum())
            images.append((row, g))
            if on_image:
                on_image()
    if not images:
        raise ValueError(f"none of the run's images has ground truth ({len(wanted)} ground-truth images; "
                         f"are the file names the same?)")
    patch_iou = {r: inter[r] / union[r] if union[r] else 1.0 for r in RULES}
    ranked = sorted(RULES, key=lambda r: -patch_iou[r])
    refined = {}
    if cfg.crf and cfg.crf_iters > 0:
        for rule in ranked[:refine_top]:
            i = u = 0
            for row, g in images:
                rgb = load_rgb(g["uri"], cfg.max_pixels)
                prob = upsample_score(rule_score(row, rule), (g["grid_h"], g["grid_w"]), patch,
                                      (g["resized_h"], g["resized_w"]), (g["height"], g["width"]))
                pred = crf_refine(rgb, prob, cfg)
                fg, counted = _foreground(gt, row["image_id"])
                i += int((pred & fg).sum())
                u += int(((pred | fg) & counted).sum())
                if on_image:
                    on_image()
            refined[rule] = i / u if u else 1.0
    rec = run.read_record()
    result = {
        "images": len(images), "skipped": skipped, "ground_truth_images": len(wanted),
        "notes": list(gt.notes), "configured": f"vote {cfg.vote} of 3" if cfg.combine == "vote" else cfg.combine,
        "consistency": cfg.consistency,
        "random_weights": bool(rec.get("backbone", {}).get("random_weights")),
        "rules": [{"rule": r, "patch_iou": round(patch_iou[r], 4),
                   "refined_iou": None if r not in refined else round(refined[r], 4)} for r in RULES],
        "best": ranked[0],
        "best_single_level": max(SINGLE_LEVELS, key=lambda r: patch_iou[r]),
    }
    atomic_write_json(run.ablation, result)
    return result
