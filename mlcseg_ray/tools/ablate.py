"""``mlcseg ablate RUN GT``: which clustering level and which combine rule work on a labelled subset.

One cluster run already holds, per image, the three level masks, each level's weight and the CLS attention
(``pseudo/``), so every rule is recomputed from them: nothing is extracted or clustered again. Each rule's soft
score goes through the refine stage's own upsampling (its foreground IoU "at patch resolution" is what the run
would give with ``crf=false``); the best ``refine_top`` rules are also refined with the run's CRF. Foreground
is every labelled class (> 0) of the ground truth; its ignore value is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.config import Config
from ..core.run_dir import RunDir, list_shards, shard_index
from ..core.storage import atomic_write_json
from ..core.tables import read_schema, read_table
from ..formats.datasets import GroundTruth
from ..formats.feature_store import GEOMETRY_COLUMNS, first_store_metadata
from ..formats.images import load_rgb
from ..ops.crf import CrfParams, refine_image, upsample_score
from ..ops.levels import LEVELS, combine_votes, weighted_share

log = logging.getLogger("mlcseg_ray")

# rule name -> (combine rule, vote threshold or weighted-share threshold, whether the gap test applies)
RULES: dict[str, tuple[str, float, bool]] = {
    "dataset": ("dataset", 0, False),
    "category": ("category", 0, False),
    "image": ("image", 0, False),
    "union": ("union", 0, False),
    "vote 2 of 3": ("vote", 2, False),
    "intersection": ("intersection", 0, False),
    "weighted": ("weighted", 0.5, True),
    "weighted, no gap test": ("weighted", 0.5, False),
    "weighted share > 0.3": ("weighted", 0.3, False),
    "weighted share > 0.7": ("weighted", 0.7, False),
}
SINGLE_LEVELS = LEVELS
CLEAN_SHARE = 0.05  # an empty scene is kept clean when at most this share of it is called foreground
GOOD_IOU = 0.5  # an image's pseudo-mask is good when its foreground IoU is at least this (or, empty, it is clean)


def rule_score(row: dict, rule: str, min_gap: float = Config().min_gap) -> np.ndarray:
    """One image's soft score under ``rule`` (above 0.5 exactly where the rule says foreground)."""
    combine, t, gap_test = RULES[rule]
    levels = np.stack([np.asarray(row[k], np.uint8) for k in SINGLE_LEVELS])
    attn = np.asarray(row["attn"], np.float32)
    weights = np.asarray(row["weights"], np.float32)
    if combine == "weighted" and t != 0.5:  # another threshold on the weighted share: shift it to one half
        return np.where(weighted_share(levels, weights) > t, 0.75, 0.25).astype(np.float32)
    gaps = np.asarray(row["gaps"], np.float32) if gap_test else None
    return combine_votes(levels, attn, combine, int(t) or 2, weights, gaps, min_gap if gap_test else 0.0)[1]


def _foreground(gt: GroundTruth, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, counted) pixel maps of one ground-truth image."""
    a = gt.read(image_id)
    counted = a != gt.ignore
    return (a > 0) & counted, counted


def _upsample(score: np.ndarray, g: dict, patch: int) -> np.ndarray:
    """A patch score upsampled as the refine stage does (before the CRF)."""
    return upsample_score(
        score, (g["grid_h"], g["grid_w"]), patch, (g["resized_h"], g["resized_w"]), (g["height"], g["width"])
    )


def _rule_prob(row: dict, g: dict, rule: str, patch: int, min_gap: float) -> np.ndarray:
    """One image's soft score under ``rule``, upsampled as the refine stage does (before the CRF)."""
    return _upsample(rule_score(row, rule, min_gap), g, patch)


@dataclass
class Scores:
    """What one pass over the run's labelled images gathers."""

    images: list[tuple[dict, dict]] = field(default_factory=list)  # (pseudo row, geometry) of each scored image
    skipped: list[str] = field(default_factory=list)
    inter: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    union: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    empty: int = 0  # images whose ground truth has no foreground
    clean: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))  # empty ones each rule kept clean
    confidence: list[tuple[float, bool]] = field(default_factory=list)  # (the run's confidence, its mask good)


def _scored_images(
    run: RunDir, gt: GroundTruth, patch: int, min_gap: float, on_image: Callable[[], None] | None
) -> Scores:
    """Every run image with ground truth, scored under every rule at patch resolution."""
    wanted = set(gt.image_ids)
    sc = Scores()
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
                sc.skipped.append(
                    f"{row['image_id']}: ground truth is {fg.shape[1]}x{fg.shape[0]}, the image "
                    f"{g['width']}x{g['height']}"
                )
                continue
            empty = not fg.any()
            sc.empty += empty
            for rule in RULES:
                pred = _rule_prob(row, g, rule, patch, min_gap) > 0.5
                sc.inter[rule] += int((pred & fg).sum())
                sc.union[rule] += int(((pred | fg) & counted).sum())
                if empty:
                    sc.clean[rule] += int((pred & counted).sum() <= CLEAN_SHARE * max(int(counted.sum()), 1))
            sc.confidence.append((float(row["confidence"]), _good(row, g, patch, fg, counted)))
            sc.images.append((row, g))
            if on_image:
                on_image()
    return sc


def _good(row: dict, g: dict, patch: int, fg: np.ndarray, counted: np.ndarray) -> bool:
    """Whether the run's own pseudo-mask of one image is good: foreground IoU at least ``GOOD_IOU``, or for an
    empty scene, kept clean."""
    pred = _upsample(np.asarray(row["score"], np.float32), g, patch) > 0.5
    if not fg.any():
        return bool((pred & counted).sum() <= CLEAN_SHARE * max(int(counted.sum()), 1))
    return bool((pred & fg).sum() >= GOOD_IOU * ((pred | fg) & counted).sum())


def confidence_curve(pairs: list[tuple[float, bool]], thresholds: int = 10) -> list[dict]:
    """Precision and recall of "confidence >= t" as a test of a good pseudo-mask, for t = 0, 0.1, ... 0.9."""
    conf = np.array([c for c, _ in pairs], np.float64)
    good = np.array([g for _, g in pairs], bool)
    out = []
    for t in np.arange(thresholds) / thresholds:
        kept = conf >= t - 1e-9
        out.append(
            {
                "threshold": round(float(t), 2),
                "kept": int(kept.sum()),
                "precision": round(float(good[kept].mean()), 4) if kept.any() else None,
                "recall": round(float((good & kept).sum() / good.sum()), 4) if good.any() else None,
            }
        )
    return out


def _refined_iou(
    images: list[tuple[dict, dict]],
    gt: GroundTruth,
    rule: str,
    patch: int,
    cfg: Config,
    on_image: Callable[[], None] | None,
) -> float:
    """Foreground IoU of ``rule`` after the run's refinement (as the refine stage does it), over ``images``."""
    i = u = 0
    crf = CrfParams.of(cfg)
    for row, g in images:
        pred = refine_image(load_rgb(g["uri"], cfg.max_pixels), rule_score(row, rule, cfg.min_gap), g, patch, crf)
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
    ``refine_top`` also after the run's CRF. Writes ``RUN/ablation.json`` and returns the same dict."""
    parts = list_shards(run.pseudo, "part")
    if not parts:
        raise FileNotFoundError(f"no pseudo-masks in {run.pseudo}: run cluster first")
    patch = int(first_store_metadata(run)["patch_size"])
    if "gaps" not in read_schema(parts[0]).names:
        raise ValueError(
            f"{run.pseudo} was written before the level weights and gaps were stored: run "
            f"'mlcseg cluster --out {run.root}' again (it recomputes only the clustering)"
        )
    sc = _scored_images(run, gt, patch, cfg.min_gap, on_image)
    if not sc.images and sc.skipped:
        raise ValueError(
            f"no image could be scored: {sc.skipped[0]}"
            + (f" (and {len(sc.skipped) - 1} more)" if len(sc.skipped) > 1 else "")
        )
    if not sc.images:
        raise ValueError(
            f"none of the run's images has ground truth ({len(set(gt.image_ids))} ground-truth images; "
            f"are the file names the same?)"
        )
    patch_iou = {r: sc.inter[r] / sc.union[r] if sc.union[r] else 1.0 for r in RULES}
    ranked = sorted(RULES, key=lambda r: -patch_iou[r])
    refined = {}
    if cfg.crf and cfg.crf_iters > 0:
        refined = {rule: _refined_iou(sc.images, gt, rule, patch, cfg, on_image) for rule in ranked[:refine_top]}
    rec = run.read_record()
    result = {
        "images": len(sc.images),
        "skipped": sc.skipped,
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
                "empty_kept_clean": round(sc.clean[r] / sc.empty, 4) if sc.empty else None,
            }
            for r in RULES
        ],
        "empty_images": sc.empty,
        "confidence_curve": confidence_curve(sc.confidence),
        "best": ranked[0],
        "best_single_level": max(SINGLE_LEVELS, key=lambda r: patch_iou[r]),
    }
    atomic_write_json(run.ablation, result)
    return result
