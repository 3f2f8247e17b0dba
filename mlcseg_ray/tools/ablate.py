"""``mlcseg ablate RUN GT``: which clustering level and which combine rule work on a labelled subset.

One cluster run already holds, per image, the three level masks, each level's weight and the CLS attention
(``pseudo/``), so every rule is recomputed from them: nothing is extracted or clustered again. Each rule's soft
score goes through the refine stage's own upsampling (its foreground IoU "at patch resolution" is what the run
would give with ``crf=false``); the best ``refine_top`` rules are also refined with the run's DenseCRF. Foreground
is every labelled class (> 0) of the ground truth; its ignore value is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..config import Config
from ..core.storage import read_schema, read_table
from ..core.store import RunDir, atomic_write_json, list_shards, shard_index
from ..formats.datasets import GroundTruth
from ..formats.feature_store import GEOMETRY_COLUMNS, first_store_metadata
from ..formats.images import load_rgb
from ..ops.crf import crf_refine, upsample_score
from ..ops.levels import LEVELS, combine_votes, weighted_share

log = logging.getLogger("mlcseg_ray")

# rule name -> (combine rule, vote threshold or weighted-share threshold)
RULES: dict[str, tuple[str, float]] = {
    "dataset": ("dataset", 0),
    "category": ("category", 0),
    "image": ("image", 0),
    "union": ("union", 0),
    "vote 2 of 3": ("vote", 2),
    "intersection": ("intersection", 0),
    "weighted": ("weighted", 0.5),
    "weighted share > 0.3": ("weighted", 0.3),
    "weighted share > 0.7": ("weighted", 0.7),
}
SINGLE_LEVELS = LEVELS


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


def _rule_prob(row: dict, g: dict, rule: str, patch: int) -> np.ndarray:
    """One image's soft score under ``rule``, upsampled as the refine stage does (before the CRF)."""
    return upsample_score(
        rule_score(row, rule),
        (g["grid_h"], g["grid_w"]),
        patch,
        (g["resized_h"], g["resized_w"]),
        (g["height"], g["width"]),
    )


def _scored_images(
    run: RunDir, gt: GroundTruth, patch: int, on_image: Callable[[], None] | None
) -> tuple[list[tuple[dict, dict]], list[str], dict[str, int], dict[str, int]]:
    """Every run image with ground truth, scored under every rule at patch resolution: (images, skipped,
    intersections, unions)."""
    wanted = set(gt.image_ids)
    inter = dict.fromkeys(RULES, 0)
    union = dict.fromkeys(RULES, 0)
    images, skipped = [], []
    for part in list_shards(run.pseudo, "part"):
        rows = [r for r in read_table(part).to_pylist() if r["image_id"] in wanted]
        if not rows:
            continue
        geoms = {
            g["image_id"]: g
            for g in read_table(run.image_table(shard_index(part)), columns=GEOMETRY_COLUMNS).to_pylist()
        }
        for row in rows:
            g = geoms[row["image_id"]]
            fg, counted = _foreground(gt, row["image_id"])
            if fg.shape != (g["height"], g["width"]):
                skipped.append(
                    f"{row['image_id']}: ground truth is {fg.shape[1]}x{fg.shape[0]}, the image "
                    f"{g['width']}x{g['height']}"
                )
                continue
            for rule in RULES:
                pred = _rule_prob(row, g, rule, patch) > 0.5
                inter[rule] += int((pred & fg).sum())
                union[rule] += int(((pred | fg) & counted).sum())
            images.append((row, g))
            if on_image:
                on_image()
    return images, skipped, inter, union


def _refined_iou(
    images: list[tuple[dict, dict]],
    gt: GroundTruth,
    rule: str,
    patch: int,
    cfg: Config,
    on_image: Callable[[], None] | None,
) -> float:
    """Foreground IoU of ``rule`` after the run's DenseCRF, over ``images``."""
    i = u = 0
    for row, g in images:
        pred = crf_refine(load_rgb(g["uri"], cfg.max_pixels), _rule_prob(row, g, rule, patch), cfg)
        fg, counted = _foreground(gt, row["image_id"])
        i += int((pred & fg).sum())
        u += int(((pred | fg) & counted).sum())
        if on_image:
            on_image()
    return i / u if u else 1.0


def ablate(
    run: RunDir, gt: GroundTruth, cfg: Config, refine_top: int = 2, on_image: Callable[[], None] | None = None
) -> dict:
    """Foreground IoU of every rule (``RULES``) over the run's images that have ground truth; the best
    ``refine_top`` also after the DenseCRF. Writes ``RUN/ablation.json`` and returns the same dict."""
    parts = list_shards(run.pseudo, "part")
    if not parts:
        raise FileNotFoundError(f"no pseudo-masks in {run.pseudo}: run cluster first")
    patch = int(first_store_metadata(run)["patch_size"])
    if "weights" not in read_schema(parts[0]).names:
        raise ValueError(
            f"{run.pseudo} was written before the level weights were stored: run "
            f"'mlcseg cluster --out {run.root}' again (it recomputes only the clustering)"
        )
    images, skipped, inter, union = _scored_images(run, gt, patch, on_image)
    if not images and skipped:
        raise ValueError(
            f"no image could be scored: {skipped[0]}" + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
        )
    if not images:
        raise ValueError(
            f"none of the run's images has ground truth ({len(set(gt.image_ids))} ground-truth images; "
            f"are the file names the same?)"
        )
    patch_iou = {r: inter[r] / union[r] if union[r] else 1.0 for r in RULES}
    ranked = sorted(RULES, key=lambda r: -patch_iou[r])
    refined = {}
    if cfg.crf and cfg.crf_iters > 0:
        refined = {rule: _refined_iou(images, gt, rule, patch, cfg, on_image) for rule in ranked[:refine_top]}
    rec = run.read_record()
    result = {
        "images": len(images),
        "skipped": skipped,
        "ground_truth_images": len(set(gt.image_ids)),
        "notes": list(gt.notes),
        "configured": f"vote {cfg.vote} of 3" if cfg.combine == "vote" else cfg.combine,
        "consistency": cfg.consistency,
        "random_weights": bool(rec.get("backbone", {}).get("random_weights")),
        "rules": [
            {
                "rule": r,
                "patch_iou": round(patch_iou[r], 4),
                "refined_iou": None if r not in refined else round(refined[r], 4),
            }
            for r in RULES
        ],
        "best": ranked[0],
        "best_single_level": max(SINGLE_LEVELS, key=lambda r: patch_iou[r]),
    }
    atomic_write_json(run.ablation, result)
    return result
