"""Stages ``cluster_dataset``, ``cluster_category``, ``cluster_image`` and ``combine`` (DESIGN §2 levels 1-4).

Plain functions over arrays first, then :class:`ClusterStage`, which reads the feature store twice (one shard per
task, never the whole store in one process): one pass draws a bounded sample, on which levels 1 and 2 are fitted in
memory; one pass labels every patch.

1. dataset level: spherical k-means (``k_dataset``) on a sample of ``kmeans_sample`` patches; clusters labelled
   foreground from cues (per-image-normalised CLS attention, border contact);
2. category level: the images' CLS tokens grouped into ``num_categories``; inside each group, k-means
   (``k_category``) on the group's share of a second sample; clusters labelled consistently with level 1;
3. image level: k-means (``k_image``) per image, batched over a shard's images; labelled consistently with level 2;
4. combine: ``weighted`` (default: each level votes with its weight in the image, the separation of its split
   along the dataset's foreground direction), ``vote`` (``vote`` of 3 levels), ``intersection``, ``union`` or one
   level; a soft score for the CRF. Every level's mask and weight are stored, so ``mlcseg ablate`` can score every
   rule afterwards.

Consistency rules: ``relative`` ranks a finer level's clusters along the coarser level's foreground direction (mean
of its foreground patches minus mean of its background patches over the images concerned) and calls foreground
those above the midpoint of the projections; ``majority`` calls a cluster foreground when most of its patches were
foreground one level up.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .features import list_to_numpy
from .kmeans import (EPS, IMAGE_BATCH, assign, assign_groups, batched_kmeans, bottom_k, check_finite, draw_rows,
                     fit_kmeans, id_hash, keep_probs, kmeans_arrays, kmeans_draws, row_keys, sample_budgets,
                     segment_sum, serial_map, to_grid, unit_vectors, visible_gpu)
from .stage import MapFn, Resources, Stage, StageContext
from .store import RunDir, atomic_write_json, atomic_write_table, list_shards, read_json, read_tables, shard_index

log = logging.getLogger("mlcseg_ray")
LEVELS = ("dataset", "category", "image")
# A finer level's clusters must spread along the coarser direction by at least this share of the coarser level's
# own foreground/background gap before the ranking is trusted (else: majority rule).
RELATIVE_MIN_SPREAD = 0.5

PSEUDO_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("group", pa.int32()),
        ("mask", pa.list_(pa.uint8())),
        ("score", pa.list_(pa.float32())),
        ("dataset", pa.list_(pa.uint8())),
        ("category", pa.list_(pa.uint8())),
        ("image", pa.list_(pa.uint8())),
        ("weights", pa.list_(pa.float32())),  # each level's weight in this image (its separation)
        ("attn", pa.list_(pa.float32())),  # per-image normalised CLS attention (the score's tie-break)
        ("flag", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# reading a feature shard
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Patches:
    """One shard's patches: unit keys, per-image-normalised CLS attention, border flags, image slices."""

    image_ids: list[str]
    starts: np.ndarray  # image i is rows starts[i]:starts[i+1]
    keys: np.ndarray  # (n, D) float32, unit norm, on the k-means summation grid
    attn: np.ndarray  # (n,) in [0, 1] per image
    border: np.ndarray  # (n,) bool
    grid: list[tuple[int, int]]
    row_image: np.ndarray  # (n,) index into image_ids

    def slice(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))


def _image_runs(path, ids: pa.ChunkedArray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, first row of each image, image index per row): the patches of an image are contiguous rows."""
    enc = ids.combine_chunks().dictionary_encode()
    row_image = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    image_ids = enc.dictionary.to_pylist()
    if not len(row_image):  # a shard whose images all failed to decode
        return [], np.zeros(1, np.int64), row_image
    change = np.flatnonzero(np.diff(row_image)) + 1
    starts = np.concatenate([[0], change, [len(row_image)]]).astype(np.int64)
    if len(image_ids) != len(starts) - 1:
        raise ValueError(f"{path}: the patches of an image must be contiguous rows")
    return image_ids, starts, row_image


def _unit_keys(path, t: pa.Table, image_ids: list[str], row_image: np.ndarray) -> np.ndarray:
    keys = list_to_numpy(t.column("key"))
    if not np.isfinite(keys).all():
        bad = image_ids[row_image[np.flatnonzero(~np.isfinite(keys).all(1))[0]]]
        raise ValueError(f"{path}: image {bad!r} has NaN or Inf in its features")
    return unit_vectors(keys)


def read_patches(path) -> Patches:
    t = pq.read_table(path, columns=["image_id", "py", "px", "key", "cls_attn"])
    image_ids, starts, row_image = _image_runs(path, t.column("image_id"))
    keys = _unit_keys(path, t, image_ids, row_image)
    attn = t.column("cls_attn").to_numpy().astype(np.float32)
    check_finite(attn, f"{path}: cls_attn")
    py, px = t.column("py").to_numpy().astype(np.int32), t.column("px").to_numpy().astype(np.int32)
    border = np.zeros(len(py), bool)
    grid = []
    for i in range(len(image_ids)):
        s = slice(int(starts[i]), int(starts[i + 1]))
        gh, gw = int(py[s].max()) + 1, int(px[s].max()) + 1
        grid.append((gh, gw))
        border[s] = (py[s] == 0) | (px[s] == 0) | (py[s] == gh - 1) | (px[s] == gw - 1)
        a = attn[s]
        lo, hi = a.min(), a.max()
        attn[s] = (a - lo) / (hi - lo) if hi - lo > EPS else 0.5
    return Patches(image_ids, starts, keys, attn, border, grid, row_image)


class KeyLoader:
    """``load(shard) -> (unit keys, group id per patch, row keys)`` for the k-means passes; groups from an
    image -> group map, row keys from the image id and the patch's place in its image (never from the shard)."""

    def __init__(self, group_images: list[str] | None = None, group_of: np.ndarray | None = None):
        self.value_set = pa.array(group_images) if group_images is not None else None
        self.group_of = group_of

    def groups(self, image_ids) -> np.ndarray:
        """Group of each of ``image_ids``."""
        if self.value_set is None:
            return np.zeros(len(image_ids), np.int64)
        idx = pc.index_in(pa.array(image_ids, pa.string()) if isinstance(image_ids, list) else image_ids,
                          value_set=self.value_set).to_numpy(zero_copy_only=False)
        return self.group_of[idx.astype(np.int64)]

    def __call__(self, path):
        t = pq.read_table(path, columns=["image_id", "key"])
        image_ids, starts, row_image = _image_runs(path, t.column("image_id"))
        x = _unit_keys(path, t, image_ids, row_image)
        keys = row_keys(id_hash(image_ids)[row_image], np.arange(len(x)) - starts[row_image])
        return x, self.groups(image_ids)[row_image], keys


# ---------------------------------------------------------------------------------------------------------------
# labelling rules (plain functions)
# ---------------------------------------------------------------------------------------------------------------


def fg_from_cues(counts, attn_sum, border_sum) -> tuple[np.ndarray, np.ndarray]:
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


def relative_flags(means: np.ndarray, counts: np.ndarray, direction: np.ndarray, coarse_fg_frac: np.ndarray,
                   min_spread: float = 0.0):
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


def direction(fg_sum, fg_n, bg_sum, bg_n, fallback):
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


def weighted_share(levels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per patch, the weighted share of the levels that call it foreground (the plain share without weights)."""
    w = np.asarray(weights if weights is not None else np.ones(len(levels)), np.float64)
    return (w[:, None] * levels).sum(0) / w.sum() if w.sum() > 0 else levels.mean(0)


def combine_votes(levels: np.ndarray, attn: np.ndarray, rule: str, vote: int = 2,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """levels: (3, n) 0/1 votes of dataset, category, image; weights: the levels' weights in this image
    (``weighted``). Returns (binary mask, soft score in [0, 1]).

    ``weighted``: each level votes with its weight, foreground where the weighted share is above one half (a level
    that splits the image's keys cleanly outvotes one whose split cuts through a cloud; without any weight, the
    plain share). The soft score is a logistic of the margin to the rule's threshold, tie-broken by CLS attention,
    and kept on the mask's side of 0.5: it is what the CRF refines."""
    if rule == "weighted":
        v, t, slope = weighted_share(levels, weights).astype(np.float32), 0.5, 6.0
    elif rule in LEVELS:
        v, t, slope = levels[LEVELS.index(rule)].astype(np.float32), 0.5, 1.5
    else:
        t = {"vote": vote - 0.5, "intersection": 2.5, "union": 0.5}[rule]
        v, slope = levels.sum(0).astype(np.float32), 1.5
    mask = v > t
    score = 1.0 / (1.0 + np.exp(-slope * (v - t))) + 0.05 * (np.asarray(attn, np.float32) - 0.5)
    score = np.where(mask, np.maximum(score, 0.501), np.minimum(score, 0.499))
    return mask, np.clip(score, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# the global fits (levels 1 and 2) and what every shard task needs of them
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LevelFits:
    """Levels 1 and 2 fitted over the whole store: what each shard needs to label its images."""

    dataset_centroids: np.ndarray  # (1, k_dataset, D)
    dataset_fg: np.ndarray  # (k_dataset,) bool
    cat_centroids: np.ndarray  # (G, k_category, D)
    cat_fg: np.ndarray  # (G, k_category) bool
    global_dir: np.ndarray  # (D,) the dataset level's foreground direction
    loader: KeyLoader  # image -> CLS group


def cluster_shard(p: Patches, groups: np.ndarray, fits: LevelFits, cfg: Config, device: str = "cpu") -> list[dict]:
    """All three levels and the combination for every image of one shard (plain function; no I/O)."""
    d_labels, _ = assign(p.keys, fits.dataset_centroids[0])
    lvl_d = fits.dataset_fg[d_labels]
    c_labels, _ = assign_groups(p.keys, groups, fits.cat_centroids)
    lvl_c = fits.cat_fg[groups, c_labels]
    lvl_i = np.zeros(len(p.keys), bool)

    n_img = len(p.image_ids)
    for start in range(0, n_img, IMAGE_BATCH):
        idx = list(range(start, min(n_img, start + IMAGE_BATCH)))
        sizes = [p.starts[i + 1] - p.starts[i] for i in idx]
        N = max(sizes)
        xb = np.zeros((len(idx), N, p.keys.shape[1]), np.float32)
        valid = np.zeros((len(idx), N), bool)
        for j, i in enumerate(idx):
            xb[j, : sizes[j]] = p.keys[p.slice(i)]
            valid[j, : sizes[j]] = True
        draws = kmeans_draws([p.image_ids[i] for i in idx], cfg.k_image, cfg.seed)
        labels, _ = batched_kmeans(xb, valid, cfg.k_image, iters=cfg.kmeans_iters, device=device, draws=draws)
        for j, i in enumerate(idx):
            s = p.slice(i)
            lab = labels[j, : sizes[j]]
            x, up_fg = p.keys[s], lvl_c[s]  # the level above: category-level foreground
            k = cfg.k_image
            counts = np.bincount(lab, minlength=k)
            means = segment_sum(lab, x, k)
            frac = np.bincount(lab, weights=up_fg.astype(np.float64), minlength=k) / np.maximum(counts, 1)
            means /= np.maximum(counts, 1)[:, None]
            if cfg.consistency == "relative":
                # The image's own foreground direction at the level above; the dataset's when the level above
                # saw only one side in this image (its errors are then not copied down).
                d = direction(x[up_fg].sum(0), up_fg.sum(), x[~up_fg].sum(0), (~up_fg).sum(), fits.global_dir)
                flags = relative_flags(means, counts, d, frac, min_spread=RELATIVE_MIN_SPREAD * float(d @ d))
            else:
                flags = majority_flags(frac, counts)
            lvl_i[s] = flags[lab]

    rows = []
    for i, image_id in enumerate(p.image_ids):
        s = p.slice(i)
        levels = np.stack([lvl_d[s], lvl_c[s], lvl_i[s]]).astype(np.uint8)
        weights = level_weights(p.keys[s], levels, fits.global_dir)
        mask, score = combine_votes(levels, p.attn[s], cfg.combine, cfg.vote, weights)
        flag = "empty" if not mask.any() else "full" if mask.all() else None
        gh, gw = p.grid[i]
        rows.append({
            "image_id": image_id, "grid_h": gh, "grid_w": gw, "group": int(groups[s][0]),
            "mask": mask.astype(np.uint8), "score": score,
            "dataset": levels[0], "category": levels[1], "image": levels[2], "weights": weights,
            "attn": p.attn[s], "flag": flag,
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------------


def _cls_groups(run: RunDir, cfg: Config) -> tuple[list[str], np.ndarray, int, np.ndarray]:
    """Images' CLS tokens -> ``num_categories`` groups (the same k-means, in memory: N x D is small, but it is the
    one thing in the driver that grows with N, so it is held once: filled shard by shard, normalised in place).
    Returns (image ids, group per image, number of groups, patches per image)."""
    shards = list_shards(run.image_tables)
    read = [pq.read_table(p, columns=["image_id", "status", "grid_h", "grid_w"]) for p in shards]
    oks = [pc.equal(t.column("status"), "ok") for t in read]
    tables = [t.filter(ok) for t, ok in zip(read, oks)]
    n = sum(t.num_rows for t in tables)
    if not n:
        raise ValueError(f"{run.image_tables}: no extracted images to cluster")
    ids, x, pos = [], None, 0
    for path, t, ok in zip(shards, tables, oks):
        if not t.num_rows:
            continue
        ids += t.column("image_id").to_pylist()
        cls = list_to_numpy(pq.read_table(path, columns=["cls_token"]).filter(ok).column("cls_token"))
        x = np.empty((n, cls.shape[1]), np.float32) if x is None else x
        x[pos: pos + len(cls)] = cls
        pos += len(cls)
    patches = np.concatenate([t.column("grid_h").to_numpy().astype(np.int64) * t.column("grid_w").to_numpy()
                              for t in tables])
    check_finite(x, "CLS tokens")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    to_grid(x)
    n_groups = min(cfg.num_categories, len(ids))
    if n_groups == 1:
        return ids, np.zeros(len(ids), np.int64), 1, patches
    # in-process (seconds even for COCO; Ray would add object-store copies)
    res = kmeans_arrays(x, n_groups, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, seed=cfg.seed,
                        sample=cfg.kmeans_sample, assign_all=False, normalized=True, map_fn=serial_map)
    labels, _ = assign(x, res.centroids[0])
    return ids, labels, n_groups, patches


class PatchRows:
    """``load(shard) -> (unit keys, CLS group, row keys, normalised attention, border flags)`` of every patch: what
    the one sampling pass keeps for both global levels (the attention and border cues label the dataset level)."""

    def __init__(self, loader: KeyLoader):
        self.loader = loader

    def __call__(self, path):
        p = read_patches(path)
        keys = row_keys(id_hash(p.image_ids)[p.row_image], np.arange(len(p.keys)) - p.starts[p.row_image])
        return p.keys, self.loader.groups(p.image_ids)[p.row_image], keys, p.attn, p.border


def fit_levels(run: RunDir, cfg: Config, map_fn: MapFn = serial_map) -> LevelFits:
    """The global parts of levels 1 and 2, from one pass over the store (issue 14).

    The pass draws a bounded sample, by each patch's own hash: the ``kmeans_sample`` patches of the whole store
    with the smallest hash (dataset level), and as many again shared by the CLS groups (category level, at least
    50 per centroid in each group). Both k-means, the dataset level's cues and the consistency statistics of the
    category level are computed on it in memory; the whole store is read again only to label it
    (:meth:`ClusterStage.process_shard`). Writes ``levels/`` and returns what every shard task needs."""
    shards = list_shards(run.features)
    if not shards:
        raise FileNotFoundError(f"no feature shards in {run.features}: run extract first (or bring a store)")
    t0 = time.perf_counter()
    ids, group_of, n_groups, patches = _cls_groups(run, cfg)  # the image tables: N x D, not the store
    loader = KeyLoader(ids, group_of)
    sizes = np.bincount(group_of, weights=patches, minlength=n_groups).astype(np.int64)
    total = int(sizes.sum())
    d_budget = min(cfg.kmeans_sample, total)
    g_budgets = sample_budgets(sizes, cfg.kmeans_sample, cfg.k_category)
    prob = np.maximum(keep_probs([total], [d_budget])[0], keep_probs(sizes, g_budgets))
    x, groups, keys, u, attn, border = draw_rows(shards, PatchRows(loader), prob, cfg.seed, map_fn)
    rng = np.random.default_rng(cfg.seed)
    kw = dict(iters=cfg.kmeans_iters, tol=cfg.kmeans_tol)

    # Level 1 on the store-wide sample: clusters, then foreground from attention and border cues.
    d = bottom_k(u, np.zeros(len(u), np.int64), keys, np.array([d_budget]))
    xd = x[d]
    d_cent, d_iters = fit_kmeans(xd, cfg.k_dataset, rng, **kw)
    d_labels, _ = assign(xd, d_cent)
    k = cfg.k_dataset
    counts = np.bincount(d_labels, minlength=k)
    dataset_fg, cue_score = fg_from_cues(counts, np.bincount(d_labels, weights=attn[d], minlength=k),
                                         np.bincount(d_labels, weights=border[d].astype(np.float64), minlength=k))
    dfg = dataset_fg[d_labels]
    global_dir = direction(xd[dfg].sum(0, dtype=np.float64), dfg.sum(), xd[~dfg].sum(0, dtype=np.float64),
                           (~dfg).sum(), np.zeros(x.shape[1]))
    del xd
    log.info("dataset level: %d-patch sample, %d iterations, fg clusters %s (%.1fs)", len(d), d_iters,
             np.flatnonzero(dataset_fg).tolist(), time.perf_counter() - t0)

    # Level 2 on each group's sample, labelled consistently with level 1.
    t0 = time.perf_counter()
    c = bottom_k(u, groups, keys, g_budgets)
    del u, keys, attn, border
    kc = cfg.k_category
    cat_centroids = np.zeros((n_groups, kc, x.shape[1]), np.float32)
    cat_fg = np.zeros((n_groups, kc), bool)
    cat_counts = np.zeros((n_groups, kc), np.int64)
    c_iters = 0
    starts = np.searchsorted(groups[c], np.arange(n_groups + 1))
    for g in range(n_groups):
        xg = x[c[starts[g]: starts[g + 1]]]
        if not len(xg):
            continue
        cat_centroids[g], it = fit_kmeans(xg, kc, rng, **kw)
        c_iters = max(c_iters, it)
        labels, _ = assign(xg, cat_centroids[g])
        up_fg = dataset_fg[assign(xg, d_cent)[0]]
        cat_counts[g] = np.bincount(labels, minlength=kc)
        frac = np.bincount(labels, weights=up_fg.astype(np.float64), minlength=kc) / np.maximum(cat_counts[g], 1)
        if cfg.consistency == "relative":
            dg = direction(xg[up_fg].sum(0, dtype=np.float64), up_fg.sum(), xg[~up_fg].sum(0, dtype=np.float64),
                           (~up_fg).sum(), global_dir)
            means = segment_sum(labels, xg, kc) / np.maximum(cat_counts[g], 1)[:, None]
            cat_fg[g] = relative_flags(means, cat_counts[g], dg, frac, min_spread=RELATIVE_MIN_SPREAD * float(dg @ dg))
        else:
            cat_fg[g] = majority_flags(frac, cat_counts[g])
    log.info("category level: %d groups, %d-patch sample, %d iterations (%.1fs)", n_groups, len(c), c_iters,
             time.perf_counter() - t0)

    # Level files, for inspection and for the report; counts are the sample's.
    D = x.shape[1]
    atomic_write_table(run.levels / "dataset.parquet", pa.table({
        "cluster": np.arange(k), "fg": dataset_fg, "sample_count": counts, "cue_score": cue_score,
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(d_cent.ravel()), D),
    }))
    atomic_write_table(run.levels / "categories.parquet", pa.table({
        "group": np.repeat(np.arange(n_groups), kc), "cluster": np.tile(np.arange(kc), n_groups),
        "fg": cat_fg.ravel(), "sample_count": cat_counts.ravel(),
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(cat_centroids.ravel()), D),
    }))
    atomic_write_table(run.levels / "groups.parquet", pa.table({"image_id": ids, "group": group_of}))
    atomic_write_json(run.level_fit, {
        "store_passes": 1, "patches": total, "dataset_sample": int(len(d)), "category_sample": int(len(c)),
        "dataset_iterations": d_iters, "category_iterations": c_iters, "groups": n_groups})
    return LevelFits(d_cent[None], dataset_fg, cat_centroids, cat_fg, global_dir, loader)


def pseudo_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, **{k: r[k].tolist() for k in ("mask", "score", "dataset", "category", "image", "weights", "attn")}}
         for r in rows],
        schema=PSEUDO_SCHEMA,
    )


class ClusterStage(Stage):
    """Levels 1-4: fits over the whole store (``prepare``), then every shard labelled and combined."""

    name = "cluster"
    after = ("extract",)
    reads = ("features", "image_tables")
    writes = ("levels", "pseudo", "ablation")  # an ablation describes one clustering: it goes with it
    config_keys = ("k_dataset", "num_categories", "k_category", "k_image", "consistency", "combine", "vote",
                   "kmeans_iters", "kmeans_tol", "kmeans_sample", "seed")
    resources = Resources(cpus=1, gpus="share")
    # 2: sampling keyed by image and patch, exact sums (results independent of shard_size)
    # 3: global levels fitted on a sample drawn in one pass; the store is read twice in all (issue 14)
    version = 4  # 4: per-image level weights and the weighted combine (issue 13)

    def shards(self, ctx: StageContext) -> list[int]:
        shards = [shard_index(p) for p in list_shards(ctx.run.features)]
        if not shards:
            raise FileNotFoundError(f"no feature shards in {ctx.run.features}: run extract first (or bring a store)")
        return shards

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> LevelFits:
        # The global levels are refitted when any shard is pending: they are cheap next to extraction and, being
        # seeded and independent of the order of the work, they come out the same.
        return fit_levels(ctx.run, ctx.cfg, map_fn)

    def process_shard(self, ctx: StageContext, shard: int, fits: LevelFits, worker=None) -> dict:
        p = read_patches(ctx.run.feature_shard(shard))
        groups = fits.loader.groups(p.image_ids)[p.row_image]
        device = "cuda" if ctx.cfg.device != "cpu" and visible_gpu() else "cpu"
        rows = cluster_shard(p, groups, fits, ctx.cfg, device)
        atomic_write_table(ctx.run.pseudo_part(shard), pseudo_table(rows))
        return {"images": len(rows), "flags": {r["image_id"]: r["flag"] for r in rows if r["flag"]}}

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        # Passes over the feature store made by this invocation: the fit's (when any shard was pending) plus the
        # labelling pass over the pending shards (a resumed run reads only what it lacks).
        fit = read_json(ctx.run.level_fit) or {}
        passes = (fit.get("store_passes", 0) if ctx.pending else 0) + len(ctx.pending) / max(len(results), 1)
        return {"flagged": sum(len(r.get("flags", {})) for r in results.values()), "store_passes": round(passes, 3),
                "output": str(ctx.run.pseudo)}


def read_pseudo(run: RunDir, columns=None) -> pa.Table:
    return read_tables(list_shards(run.pseudo, "part"), columns=columns)
