"""The labelling rules of the three levels, as plain functions over arrays: which clusters are foreground (cues
at the dataset level, consistency with the coarser level below it), each level's weight in an image, and the
combination of the three votes into a mask and a soft score."""

from __future__ import annotations

import numpy as np

from .kmeans import EPS, segment_sum

LEVELS = ("dataset", "category", "image")
# A finer level's clusters must spread along the coarser direction by at least this share of the coarser level's
# own foreground/background gap before the ranking is trusted (else: majority rule).
RELATIVE_MIN_SPREAD = 0.5
# Soft-score slopes: the weighted share moves in small steps (a weight's share), the counting rules in whole votes,
# so the weighted rule needs a steeper logistic for the same confidence at one vote's margin.
WEIGHTED_SLOPE = 6.0
COUNT_SLOPE = 1.5
# CLS attention breaks ties between patches of equal vote, never enough to cross the rule's threshold.
ATTENTION_TIE_BREAK = 0.05
# The soft score stays this far on the mask's side of 0.5, so that thresholding it gives the rule's mask back.
SIDE_MARGIN = 0.001


def fg_from_cues(counts: np.ndarray, attn_sum: np.ndarray, border_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground clusters of the coarsest level: high CLS attention, little border contact.

    score = mean attention - border rate; a cluster is foreground when its score lies above the midpoint of the
    scores (the best cluster always is). Returns (fg flags, scores)."""
    counts = np.maximum(np.asarray(counts, np.float64), 1)
    score = np.asarray(attn_sum) / counts - np.asarray(border_sum) / counts
    filled = np.asarray(counts) > 0
    lo, hi = score[filled].min(), score[filled].max()
    fg = score > (lo + hi) / 2 if hi - lo > EPS else np.zeros_like(score, bool)
    fg[np.argmax(np.where(filled, score, -np.inf))] = True
    return fg, score


def relative_flags(
    means: np.ndarray, counts: np.ndarray, direction: np.ndarray, coarse_fg_frac: np.ndarray, min_spread: float = 0.0
) -> np.ndarray:
    """Clusters (rows of ``means``) ranked along ``direction``: foreground above the midpoint of the projections of
    the non-empty clusters. When the projections do not separate - spread below ``min_spread`` (a fraction of the
    coarser level's own foreground/background gap: an image that is all background, or all foreground), one
    cluster, identical features - the majority rule decides."""
    filled = counts > 0
    proj = means @ direction
    if filled.sum() < 2 or not np.isfinite(proj).all() or np.ptp(proj[filled]) <= max(min_spread, 1e-6):
        return majority_flags(coarse_fg_frac, counts)
    lo, hi = proj[filled].min(), proj[filled].max()
    return filled & (proj > (lo + hi) / 2)


def majority_flags(coarse_fg_frac: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return (counts > 0) & (np.asarray(coarse_fg_frac) > 0.5)


def direction(fg_sum: np.ndarray, fg_n: int, bg_sum: np.ndarray, bg_n: int, fallback: np.ndarray) -> np.ndarray:
    """Mean of foreground minus mean of background; ``fallback`` when a side is empty."""
    if fg_n < 1 or bg_n < 1:
        return fallback
    d = fg_sum / fg_n - bg_sum / bg_n
    return d if np.linalg.norm(d) > EPS else fallback


def separation(x64: np.ndarray, fg: np.ndarray, along: np.ndarray | None = None) -> float:
    """How well a binary split of one image's keys (float64) separates them: the Fisher ratio (gap of the projected
    means)^2 / (sum of the projected variances) of the projections ``along`` a direction (the split's own when
    none are given); 0 for a one-sided split."""
    n_fg = int(fg.sum())
    if n_fg == 0 or n_fg == len(fg):
        return 0.0
    p = along if along is not None else x64 @ (x64[fg].mean(0) - x64[~fg].mean(0))
    return float((p[fg].mean() - p[~fg].mean()) ** 2 / (p[fg].var() + p[~fg].var() + 1e-12))


def level_weights(x: np.ndarray, levels: np.ndarray, direction: np.ndarray | None = None) -> np.ndarray:
    """Each level's weight in one image (``combine=weighted``): how well the split it draws there separates the
    image's keys along the dataset's foreground direction. A level whose split follows something else in this
    image (texture, a background mode, a shift of the whole image) gets little say. The keys are projected once
    for the three levels."""
    x64 = x.astype(np.float64)
    along = x64 @ np.asarray(direction, np.float64) if direction is not None and np.any(direction) else None
    return np.array([separation(x64, lv.astype(bool), along) for lv in levels], np.float32)


def gap_ratios(x: np.ndarray, splits: np.ndarray, direction: np.ndarray | None) -> np.ndarray:
    """Each split's gap along the dataset's foreground direction ``direction`` (mean foreground minus mean
    background of the dataset's sample), in units of the dataset's own gap: the mean projection of the split's
    foreground minus that of its background, over |direction|^2, so that the dataset's foreground and background
    means lie exactly 1 apart. About 1 where a split cuts an object from its background; near 0 where it cuts one
    background mode (or texture) from another, or noise in two. A shift of the whole image moves both sides alike,
    so it does not change the gap. 0 for a one-sided split (nothing to compare)."""
    out = np.zeros(len(splits), np.float32)
    d = np.asarray(direction, np.float64) if direction is not None else None
    if d is None or not np.isfinite(d).all() or d @ d <= EPS:
        return out
    proj = x.astype(np.float64) @ d / (d @ d)
    for k, split in enumerate(splits):
        fg = np.asarray(split, bool)
        if fg.any() and not fg.all():
            out[k] = proj[fg].mean() - proj[~fg].mean()
    return out


def gated_weights(weights: np.ndarray, gaps: np.ndarray | None, min_gap: float) -> np.ndarray:
    """The weights of the levels whose split passes the gap test (its gap at least ``min_gap``); a level that
    split background from background has no say."""
    w = np.asarray(weights, np.float64)
    if gaps is None or min_gap <= 0:
        return w
    return np.where(np.asarray(gaps) >= min_gap, w, 0.0)


def nothing_separable(levels: np.ndarray) -> np.ndarray:
    """The share of the one-sided levels (all foreground or all background in this image) that call each patch
    foreground, when no level's split passes the gap test: a close-up that the coarse levels call all object stays
    full, an image they call all background (or disagree on) is empty."""
    one_sided = np.array([lv.all() or not lv.any() for lv in levels])
    if not one_sided.any():
        return np.zeros(levels.shape[1], np.float64)
    return levels[one_sided].mean(0)


def confidence(levels: np.ndarray, weights: np.ndarray, gaps: np.ndarray, min_gap: float, mask: np.ndarray) -> float:
    """How much to trust one image's pseudo-mask, in [0, 1]: how unanimous the vote is (per patch |share - 1/2|
    times 2, averaged; the share weighted by the levels that pass the gap test, the plain share when none does)
    times how far the three levels agree with the mask (the mean share of patches on which a level says what the
    mask says). 1: every level with a say called every patch the same way, and the others agree."""
    lv = np.asarray(levels, np.float64)
    w = gated_weights(weights, gaps, min_gap)
    share = weighted_share(lv, w) if w.sum() > 0 else lv.mean(0)
    unanimity = float(np.mean(np.abs(share - 0.5) * 2)) if share.size else 1.0
    agreement = float(np.mean(lv.astype(bool) == np.asarray(mask, bool)[None])) if share.size else 1.0
    return float(np.clip(unanimity * agreement, 0.0, 1.0))


def weighted_share(levels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per patch, the weighted share of the levels that call it foreground (the plain share without weights)."""
    w = np.asarray(weights if weights is not None else np.ones(len(levels)), np.float64)
    return (w[:, None] * levels).sum(0) / w.sum() if w.sum() > 0 else levels.mean(0)


def combine_votes(
    levels: np.ndarray,
    attn: np.ndarray,
    rule: str,
    vote: int = 2,
    weights: np.ndarray | None = None,
    gaps: np.ndarray | None = None,
    min_gap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """levels: (3, n) 0/1 votes of dataset, category, image; weights: the levels' weights in this image
    (``weighted``). Returns (binary mask, soft score in [0, 1]).

    ``weighted``: each level votes with its weight, foreground where the weighted share is above one half (a level
    that splits the image's keys cleanly outvotes one whose split cuts through a cloud; without any weight, the
    plain share). With ``gaps`` and ``min_gap`` (the default), a level whose split fails the gap test has no say,
    and where none passes the image is empty unless its one-sided levels call it all object. The soft score is a
    logistic of the margin to the rule's threshold, tie-broken by CLS attention, and kept on the mask's side of
    0.5: it is what the CRF refines."""
    if rule == "weighted":
        w = gated_weights(weights, gaps, min_gap) if weights is not None else None
        if w is not None and gaps is not None and min_gap > 0 and w.sum() <= 0:
            v = nothing_separable(levels).astype(np.float32)  # no level split object from background here
        else:
            v = weighted_share(levels, w).astype(np.float32)
        t, slope = 0.5, WEIGHTED_SLOPE
    elif rule in LEVELS:
        v, t, slope = levels[LEVELS.index(rule)].astype(np.float32), 0.5, COUNT_SLOPE
    else:
        t = {"vote": vote - 0.5, "intersection": 2.5, "union": 0.5}[rule]
        v, slope = levels.sum(0).astype(np.float32), COUNT_SLOPE
    mask = v > t
    score = 1.0 / (1.0 + np.exp(-slope * (v - t))) + ATTENTION_TIE_BREAK * (np.asarray(attn, np.float32) - 0.5)
    score = np.where(mask, np.maximum(score, 0.5 + SIDE_MARGIN), np.minimum(score, 0.5 - SIDE_MARGIN))
    return mask, np.clip(score, 0.0, 1.0).astype(np.float32)


def consistent_flags(
    x: np.ndarray, labels: np.ndarray, k: int, up_fg: np.ndarray, fallback: np.ndarray, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Which of a finer level's ``k`` clusters (``labels`` of the vectors ``x``) are foreground, kept consistent
    with the coarser level's foreground ``up_fg`` on the same vectors: ``relative`` ranks the clusters along the
    coarser level's foreground direction here (``fallback``, the dataset's, when the coarser level saw one side
    only, so its errors are not copied down); ``majority`` follows most of each cluster's patches.
    Returns (flags, counts)."""
    counts = np.bincount(labels, minlength=k)
    frac = np.bincount(labels, weights=up_fg.astype(np.float64), minlength=k) / np.maximum(counts, 1)
    if rule != "relative":
        return majority_flags(frac, counts), counts
    d = direction(
        x[up_fg].sum(0, dtype=np.float64),
        int(up_fg.sum()),
        x[~up_fg].sum(0, dtype=np.float64),
        int((~up_fg).sum()),
        fallback,
    )
    means = segment_sum(labels, x, k) / np.maximum(counts, 1)[:, None]
    return relative_flags(means, counts, d, frac, min_spread=RELATIVE_MIN_SPREAD * float(d @ d)), counts
