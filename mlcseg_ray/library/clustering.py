"""The three levels and their combination, from the feature store to patch pseudo-masks (the cluster stage, and
what ``mlcseg ablate`` and the benchmarks read of it).

The store is read twice (one shard per task, never the whole store in one process): one pass draws a bounded
sample, on which levels 1 and 2 are fitted in memory (:func:`fit_levels`); one pass labels every patch
(:func:`cluster_shard`).

1. dataset level: spherical k-means (``k_dataset``) on a sample of ``kmeans_sample`` patches; clusters labelled
   foreground from cues (per-image-normalised CLS attention, border contact);
2. category level: the images' CLS tokens grouped into ``num_categories``; inside each group, k-means
   (``k_category``) on the group's share of a second sample; clusters labelled consistently with level 1;
3. image level: k-means (``k_image``) per image, batched over a shard's images; labelled consistently with level 2;
4. combine: ``weighted`` (default: each level votes with its weight in the image, the separation of its split
   along the dataset's foreground direction), ``vote`` (``vote`` of 3 levels), ``intersection``, ``union`` or one
   level; a soft score for the CRF. Every level's mask and weight are stored, so ``mlcseg ablate`` can score every
   rule afterwards.

The labelling rules themselves (cues, consistency, weights, combination) are in :mod:`mlcseg_ray.ops.levels`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.config import Config
from ..core.fanout import serial_map
from ..core.run_dir import RunDir, list_shards, shard_index
from ..core.stage import MapFn
from ..core.tables import read_metadata, read_table, read_tables
from ..formats.feature_store import Patches, image_runs, list_to_numpy, read_patches, unit_keys
from ..ops.batched_kmeans import IMAGE_BATCH, batched_kmeans, kmeans_draws
from ..ops.kmeans import EPS, assign, assign_groups, check_finite, fit_groups, fit_kmeans, kmeans_arrays, to_grid
from ..ops.levels import (
    combine_votes,
    confidence,
    consistent_flags,
    direction,
    fg_from_cues,
    gap_ratios,
    level_weights,
)
from ..ops.sampling import bottom_k, draw_rows, id_hash, keep_probs, row_keys, sample_budgets, uniforms

log = logging.getLogger("mlcseg_ray")

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
        ("gaps", pa.list_(pa.float32())),  # each level's split's gap along the dataset's fg direction (the gap test)
        ("attn", pa.list_(pa.float32())),  # per-image normalised CLS attention (the score's tie-break)
        ("flag", pa.string()),
        ("confidence", pa.float32()),  # how much to trust the mask, in [0, 1] (ops.levels.confidence)
    ]
)
ARRAY_COLUMNS = ("mask", "score", "dataset", "category", "image", "weights", "gaps", "attn")


class KeyLoader:
    """``load(shard) -> (unit keys, group id per patch, row keys)`` for the k-means passes; each image's CLS group
    assigned here, in the task, from its shard's image table and the groups' centroids (nothing per image travels
    from the driver); row keys from the image id and the patch's place in its image (never from the shard)."""

    def __init__(self, run: RunDir | None = None, centroids: np.ndarray | None = None) -> None:
        self.run, self.centroids = run, centroids

    def groups(self, shard: int, image_ids: list[str] | pa.Array) -> np.ndarray:
        """CLS group of each of ``image_ids`` (images of feature shard ``shard``)."""
        ids = image_ids.to_pylist() if isinstance(image_ids, pa.Array) else list(image_ids)
        if self.centroids is None or not ids:  # one group, or a shard whose every image failed
            return np.zeros(len(ids), np.int64)
        own, x, _ = shard_cls_tokens(self.run.image_table(shard))
        labels, _ = assign(x, self.centroids)
        group_of = dict(zip(own, labels.tolist(), strict=True))
        return np.asarray([group_of[i] for i in ids], np.int64)

    def __call__(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = read_table(path, columns=["image_id", "key"])
        image_ids, starts, row_image = image_runs(path, t.column("image_id"))
        x = unit_keys(path, t, image_ids, row_image)
        keys = row_keys(id_hash(image_ids)[row_image], np.arange(len(x)) - starts[row_image])
        return x, self.groups(shard_index(path), image_ids)[row_image], keys


class PatchRows:
    """``load(shard) -> (unit keys, CLS group, row keys, normalised attention, border flags)`` of every patch: what
    the one sampling pass keeps for both global levels (the attention and border cues label the dataset level)."""

    def __init__(self, loader: KeyLoader) -> None:
        self.loader = loader

    def __call__(self, path: Path) -> tuple[np.ndarray, ...]:
        p = read_patches(path)
        keys = row_keys(id_hash(p.image_ids)[p.row_image], np.arange(len(p.keys)) - p.starts[p.row_image])
        return p.keys, self.loader.groups(shard_index(path), p.image_ids)[p.row_image], keys, p.attn, p.border


@dataclass
class LevelFits:
    """Levels 1 and 2 fitted over the whole store: what each shard needs to label its images."""

    dataset_centroids: np.ndarray  # (1, k_dataset, D)
    dataset_fg: np.ndarray  # (k_dataset,) bool
    cat_centroids: np.ndarray  # (G, k_category, D)
    cat_fg: np.ndarray  # (G, k_category) bool
    global_dir: np.ndarray  # (D,) the dataset level's foreground direction
    loader: KeyLoader  # image -> CLS group
    # a patch is far from the fit below this similarity to its nearest dataset centroid (95% of the sample reach it)
    far_below: float | None = None


@dataclass
class LevelRecord:
    """What a level fit records beside :class:`LevelFits`: the dataset level in full, the category level's sample
    counts, the CLS groups' centroids (None: one group) and the sample's sizes."""

    dataset: DatasetLevel
    cat_counts: np.ndarray  # (G, k_category)
    group_centroids: np.ndarray | None
    stats: dict


@dataclass
class CLSGroups:
    """The ``num_categories`` CLS groups: their centroids, fitted on a bounded sample of the images' CLS tokens,
    and the store's size as the one pass over the image tables saw it."""

    centroids: np.ndarray | None  # (G, D); None: one group
    n_groups: int
    images: int  # extracted images
    patches: int  # their patches
    group_patches: np.ndarray  # (G,) patches per group: exact where the sample holds every image, else estimated


def shard_cls_tokens(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, unit CLS tokens on the grid, patches per image) of one image table's extracted images."""
    t = read_table(path, columns=["image_id", "status", "grid_h", "grid_w", "cls_token"])
    t = t.filter(pc.equal(t.column("status"), "ok"))
    if not t.num_rows:
        return [], np.zeros((0, 1), np.float32), np.zeros(0, np.int64)
    x = np.array(list_to_numpy(t.column("cls_token")), np.float32)
    check_finite(x, f"{path}: CLS tokens")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    patches = t.column("grid_h").to_numpy().astype(np.int64) * t.column("grid_w").to_numpy()
    return t.column("image_id").to_pylist(), to_grid(x), patches


def _draw_cls_task(path: Path, prob: float, seed: int) -> tuple:
    """One image table's CLS tokens kept by their images' uniform numbers, and what the table holds in all."""
    ids, x, patches = shard_cls_tokens(path)
    keys = id_hash(ids)
    u = uniforms(keys, seed)
    keep = u < prob
    return x[keep], patches[keep], keys[keep], u[keep], len(ids), int(patches.sum())


def cls_groups(run: RunDir, cfg: Config, map_fn: MapFn = serial_map) -> CLSGroups:
    """Images' CLS tokens -> ``num_categories`` groups, fitted on at most ``kmeans_sample`` images' tokens drawn
    in one pass over the image tables (a task per table); each image is assigned to its group later, inside the
    shard tasks (:class:`KeyLoader`). The sample keeps the tables' order, so a store that fits in the sample gives
    the k-means over every token."""
    tables = list_shards(run.image_tables)
    rows = sum(read_metadata(p).num_rows for p in tables)
    prob = float(keep_probs([rows], [min(cfg.kmeans_sample, rows)])[0])
    parts = map_fn(_draw_cls_task, tables, prob, cfg.seed)
    images, patches = sum(p[4] for p in parts), sum(p[5] for p in parts)
    if not images:
        raise ValueError(f"{run.image_tables}: no extracted images to cluster")
    x, sizes, keys, u = (np.concatenate([p[j] for p in parts if len(p[2])]) for j in range(4))
    pick = np.sort(bottom_k(u, np.zeros(len(u), np.int64), keys, np.array([cfg.kmeans_sample])))
    x, sizes = x[pick], sizes[pick]
    n_groups = min(cfg.num_categories, images)
    if n_groups == 1:
        return CLSGroups(None, 1, images, patches, np.array([patches], np.int64))
    # in-process: the sample is bounded (seconds); Ray would add object-store copies
    res = kmeans_arrays(
        x,
        n_groups,
        iters=cfg.kmeans_iters,
        tol=cfg.kmeans_tol,
        seed=cfg.seed,
        sample=cfg.kmeans_sample,
        assign_all=False,
        normalized=True,
        map_fn=serial_map,
    )
    labels, _ = assign(x, res.centroids[0])
    share = np.bincount(labels, weights=sizes, minlength=n_groups) * (patches / max(int(sizes.sum()), 1))
    return CLSGroups(res.centroids[0], n_groups, images, patches, np.rint(share).astype(np.int64))


@dataclass
class DatasetLevel:
    centroids: np.ndarray  # (k, D)
    fg: np.ndarray  # (k,) bool
    counts: np.ndarray  # sample points per cluster
    cue_score: np.ndarray
    direction: np.ndarray  # (D,) mean of foreground minus mean of background
    iterations: int
    far_below: float  # the 5th percentile of the sample's similarity to its nearest centroid


def fit_dataset_level(
    x: np.ndarray, attn: np.ndarray, border: np.ndarray, cfg: Config, rng: np.random.Generator
) -> DatasetLevel:
    """Level 1 on the store-wide sample: clusters, then foreground from attention and border cues."""
    k = cfg.k_dataset
    centroids, iters = fit_kmeans(x, k, rng, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol)
    labels, sims = assign(x, centroids)
    counts = np.bincount(labels, minlength=k)
    fg, cue_score = fg_from_cues(
        counts,
        np.bincount(labels, weights=attn, minlength=k),
        np.bincount(labels, weights=border.astype(np.float64), minlength=k),
    )
    on = fg[labels]
    d = direction(
        x[on].sum(0, dtype=np.float64), on.sum(), x[~on].sum(0, dtype=np.float64), (~on).sum(), np.zeros(x.shape[1])
    )
    return DatasetLevel(centroids, fg, counts, cue_score, d, iters, float(np.quantile(sims, 0.05)))


def fit_category_level(
    x: np.ndarray, groups: np.ndarray, n_groups: int, dataset: DatasetLevel, cfg: Config, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Level 2 on each group's sample (``x`` ordered by group), labelled consistently with level 1.
    Returns (centroids (G, k, D), fg flags (G, k), sample counts (G, k), iterations)."""
    kc = cfg.k_category
    centroids, iters = fit_groups(x, groups, kc, n_groups, rng, cfg.kmeans_iters, cfg.kmeans_tol)
    fg = np.zeros((n_groups, kc), bool)
    counts = np.zeros((n_groups, kc), np.int64)
    starts = np.searchsorted(groups, np.arange(n_groups + 1))
    for g in range(n_groups):
        xg = x[starts[g] : starts[g + 1]]
        if not len(xg):
            continue
        labels, _ = assign(xg, centroids[g])
        up_fg = dataset.fg[assign(xg, dataset.centroids)[0]]
        fg[g], counts[g] = consistent_flags(xg, labels, kc, up_fg, dataset.direction, cfg.consistency)
    return centroids, fg, counts, iters


def _sample_rows(
    run: RunDir, cfg: Config, groups: CLSGroups, loader: KeyLoader, map_fn: MapFn
) -> tuple[list, np.ndarray, np.ndarray]:
    """One pass over the store: the rows of both samples, and the two samples' indices into them (dataset level:
    the ``kmeans_sample`` patches with the smallest hash; category level: as many again shared by the groups, at
    least 50 per centroid in each)."""
    sizes = groups.group_patches
    total = int(sizes.sum())
    d_budget = min(cfg.kmeans_sample, total)
    g_budgets = sample_budgets(sizes, cfg.kmeans_sample, cfg.k_category)
    prob = np.maximum(keep_probs([total], [d_budget])[0], keep_probs(sizes, g_budgets))
    rows = draw_rows(list_shards(run.features), PatchRows(loader), prob, cfg.seed, map_fn)
    x, g, keys, u = rows[:4]
    return rows, bottom_k(u, np.zeros(len(u), np.int64), keys, np.array([d_budget])), bottom_k(u, g, keys, g_budgets)


def fit_levels(run: RunDir, cfg: Config, map_fn: MapFn = serial_map) -> tuple[LevelFits, LevelRecord]:
    """The global parts of levels 1 and 2, from one pass over the store.

    Both k-means, the dataset level's cues and the consistency statistics of the category level are computed on a
    bounded sample in memory (:func:`_sample_rows`); the whole store is read again only to label it
    (:meth:`ClusterStage.process_shard`). Returns what every shard task needs, and what the fit's files record
    (written by :func:`mlcseg_ray.library.fits.write_level_fit`)."""
    if not list_shards(run.features):
        raise FileNotFoundError(f"no feature shards in {run.features}: run extract first (or bring a store)")
    t0 = time.perf_counter()
    groups = cls_groups(run, cfg, map_fn)  # a pass over the image tables, not the store
    loader = KeyLoader(run, groups.centroids)  # each image's CLS group, assigned in the sample's and every shard's task
    rows, d, c = _sample_rows(run, cfg, groups, loader, map_fn)
    x, g, _, _, attn, border = rows
    rng = np.random.default_rng(cfg.seed)
    dataset = fit_dataset_level(x[d], attn[d], border[d], cfg, rng)
    log.info(
        "dataset level: %d-patch sample, %d iterations, fg clusters %s (%.1fs)",
        len(d),
        dataset.iterations,
        np.flatnonzero(dataset.fg).tolist(),
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    cat_centroids, cat_fg, cat_counts, c_iters = fit_category_level(x[c], g[c], groups.n_groups, dataset, cfg, rng)
    log.info(
        "category level: %d groups, %d-patch sample, %d iterations (%.1fs)",
        groups.n_groups,
        len(c),
        c_iters,
        time.perf_counter() - t0,
    )
    stats = {
        "store_passes": 1,
        "patches": groups.patches,
        "cls_sample": int(min(cfg.kmeans_sample, groups.images)),
        "dataset_sample": int(len(d)),
        "category_sample": int(len(c)),
        "dataset_iterations": dataset.iterations,
        "category_iterations": c_iters,
        "groups": groups.n_groups,
    }
    fits = LevelFits(
        dataset.centroids[None], dataset.fg, cat_centroids, cat_fg, dataset.direction, loader, dataset.far_below
    )
    return fits, LevelRecord(dataset, cat_counts, groups.centroids, stats)


def image_level(p: Patches, up_fg: np.ndarray, fits: LevelFits, cfg: Config, device: str = "cpu") -> np.ndarray:
    """Level 3: k-means per image, batched over :data:`IMAGE_BATCH` images, each image's clusters labelled
    consistently with ``up_fg`` (the category level's foreground)."""
    lvl_i = np.zeros(len(p.keys), bool)
    n_img = len(p.image_ids)
    for start in range(0, n_img, IMAGE_BATCH):
        idx = list(range(start, min(n_img, start + IMAGE_BATCH)))
        sizes = [p.starts[i + 1] - p.starts[i] for i in idx]
        xb = np.zeros((len(idx), max(sizes), p.keys.shape[1]), np.float32)
        valid = np.zeros((len(idx), max(sizes)), bool)
        for j, i in enumerate(idx):
            xb[j, : sizes[j]] = p.keys[p.slice(i)]
            valid[j, : sizes[j]] = True
        draws = kmeans_draws([p.image_ids[i] for i in idx], cfg.k_image, cfg.seed)
        labels, _ = batched_kmeans(xb, valid, cfg.k_image, iters=cfg.kmeans_iters, device=device, draws=draws)
        for j, i in enumerate(idx):
            s = p.slice(i)
            lab = labels[j, : sizes[j]]
            flags, _ = consistent_flags(p.keys[s], lab, cfg.k_image, up_fg[s], fits.global_dir, cfg.consistency)
            lvl_i[s] = flags[lab]
    return lvl_i


def cluster_shard(p: Patches, groups: np.ndarray, fits: LevelFits, cfg: Config, device: str = "cpu") -> list[dict]:
    """All three levels and the combination for every image of one shard (plain function; no I/O)."""
    d_labels, d_sims = assign(p.keys, fits.dataset_centroids[0])
    lvl_d = fits.dataset_fg[d_labels]
    c_labels, _ = assign_groups(p.keys, groups, fits.cat_centroids)
    lvl_c = fits.cat_fg[groups, c_labels]
    lvl_i = image_level(p, lvl_c, fits, cfg, device)
    rows = []
    for i, image_id in enumerate(p.image_ids):
        s = p.slice(i)
        levels = np.stack([lvl_d[s], lvl_c[s], lvl_i[s]]).astype(np.uint8)
        weights = level_weights(p.keys[s], levels, fits.global_dir)
        gaps = gap_ratios(p.keys[s], levels, fits.global_dir)
        mask, score = combine_votes(levels, p.attn[s], cfg.combine, cfg.vote, weights, gaps, cfg.min_gap)
        conf = confidence(levels, weights, gaps, cfg.min_gap, mask)
        flag = "empty" if not mask.any() else "full" if mask.all() else None
        gh, gw = p.grid[i]
        rows.append(
            {
                "image_id": image_id,
                "grid_h": gh,
                "grid_w": gw,
                "group": int(groups[s][0]),
                "mask": mask.astype(np.uint8),
                "score": score,
                "dataset": levels[0],
                "category": levels[1],
                "image": levels[2],
                "weights": weights,
                "gaps": gaps,
                "attn": p.attn[s],
                "flag": flag,
                "confidence": round(conf, 4),
                "far_patches": 0 if fits.far_below is None else int((d_sims[s] < fits.far_below).sum()),
            }
        )
    return rows


def pseudo_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, **{k: r[k].tolist() for k in ARRAY_COLUMNS}} for r in rows], schema=PSEUDO_SCHEMA
    )


def read_pseudo(run: RunDir, columns: list[str] | None = None) -> pa.Table:
    return read_tables(list_shards(run.pseudo, "part"), columns=columns)
