"""Stage ``cluster``: the three levels and their combination, from the feature store to patch pseudo-masks.

Plain functions over arrays first, then :class:`ClusterStage`, which reads the feature store twice (one shard per
task, never the whole store in one process): one pass draws a bounded sample, on which levels 1 and 2 are fitted in
memory (``prepare``); one pass labels every patch (``process_shard``).

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

from ..config import Config
from ..core.mapping import serial_map
from ..core.stage import MapFn, Resources, Stage, StageContext
from ..core.storage import read_table
from ..core.store import RunDir, atomic_write_json, atomic_write_table, list_shards, read_json, read_tables
from ..formats.feature_store import Patches, image_runs, list_to_numpy, read_patches, unit_keys
from ..ops.kmeans import (
    EPS,
    IMAGE_BATCH,
    assign,
    assign_groups,
    batched_kmeans,
    bottom_k,
    check_finite,
    draw_rows,
    fit_groups,
    fit_kmeans,
    id_hash,
    keep_probs,
    kmeans_arrays,
    kmeans_draws,
    row_keys,
    sample_budgets,
    to_grid,
)
from ..ops.levels import (
    combine_votes,
    confidence,
    consistent_flags,
    direction,
    fg_from_cues,
    gap_ratios,
    level_weights,
)

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
    """``load(shard) -> (unit keys, group id per patch, row keys)`` for the k-means passes; groups from an
    image -> group map, row keys from the image id and the patch's place in its image (never from the shard)."""

    def __init__(self, group_images: list[str] | None = None, group_of: np.ndarray | None = None) -> None:
        self.value_set = pa.array(group_images) if group_images is not None else None
        self.group_of = group_of

    def groups(self, image_ids: list[str] | pa.Array) -> np.ndarray:
        """Group of each of ``image_ids``."""
        if self.value_set is None:
            return np.zeros(len(image_ids), np.int64)
        ids = pa.array(image_ids, pa.string()) if isinstance(image_ids, list) else image_ids
        idx = pc.index_in(ids, value_set=self.value_set).to_numpy(zero_copy_only=False)
        return self.group_of[idx.astype(np.int64)]

    def __call__(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = read_table(path, columns=["image_id", "key"])
        image_ids, starts, row_image = image_runs(path, t.column("image_id"))
        x = unit_keys(path, t, image_ids, row_image)
        keys = row_keys(id_hash(image_ids)[row_image], np.arange(len(x)) - starts[row_image])
        return x, self.groups(image_ids)[row_image], keys


class PatchRows:
    """``load(shard) -> (unit keys, CLS group, row keys, normalised attention, border flags)`` of every patch: what
    the one sampling pass keeps for both global levels (the attention and border cues label the dataset level)."""

    def __init__(self, loader: KeyLoader) -> None:
        self.loader = loader

    def __call__(self, path: Path) -> tuple[np.ndarray, ...]:
        p = read_patches(path)
        keys = row_keys(id_hash(p.image_ids)[p.row_image], np.arange(len(p.keys)) - p.starts[p.row_image])
        return p.keys, self.loader.groups(p.image_ids)[p.row_image], keys, p.attn, p.border


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


@dataclass
class CLSGroups:
    """The images' CLS tokens grouped into ``num_categories`` groups, and how many patches each image has."""

    image_ids: list[str]
    group_of: np.ndarray  # group per image
    n_groups: int
    patches: np.ndarray  # patches per image


def _read_cls_tokens(run: RunDir) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, unit CLS tokens on the grid, patches per image) of every extracted image. The N x D tokens are
    the one thing in the driver that grows with N, so they are held once: filled shard by shard, normalised in
    place."""
    shards = list_shards(run.image_tables)
    read = [read_table(p, columns=["image_id", "status", "grid_h", "grid_w"]) for p in shards]
    oks = [pc.equal(t.column("status"), "ok") for t in read]
    tables = [t.filter(ok) for t, ok in zip(read, oks, strict=True)]
    n = sum(t.num_rows for t in tables)
    if not n:
        raise ValueError(f"{run.image_tables}: no extracted images to cluster")
    ids, x, pos = [], None, 0
    for path, t, ok in zip(shards, tables, oks, strict=True):
        if not t.num_rows:
            continue
        ids += t.column("image_id").to_pylist()
        cls = list_to_numpy(read_table(path, columns=["cls_token"]).filter(ok).column("cls_token"))
        x = np.empty((n, cls.shape[1]), np.float32) if x is None else x
        x[pos : pos + len(cls)] = cls
        pos += len(cls)
    patches = np.concatenate(
        [t.column("grid_h").to_numpy().astype(np.int64) * t.column("grid_w").to_numpy() for t in tables]
    )
    check_finite(x, "CLS tokens")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    to_grid(x)
    return ids, x, patches


def cls_groups(run: RunDir, cfg: Config) -> CLSGroups:
    """Images' CLS tokens -> ``num_categories`` groups (the same k-means, in memory: N x D is small)."""
    ids, x, patches = _read_cls_tokens(run)
    n_groups = min(cfg.num_categories, len(ids))
    if n_groups == 1:
        return CLSGroups(ids, np.zeros(len(ids), np.int64), 1, patches)
    # in-process (seconds even for COCO; Ray would add object-store copies)
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
    return CLSGroups(ids, labels, n_groups, patches)


@dataclass
class DatasetLevel:
    centroids: np.ndarray  # (k, D)
    fg: np.ndarray  # (k,) bool
    counts: np.ndarray  # sample points per cluster
    cue_score: np.ndarray
    direction: np.ndarray  # (D,) mean of foreground minus mean of background
    iterations: int


def fit_dataset_level(
    x: np.ndarray, attn: np.ndarray, border: np.ndarray, cfg: Config, rng: np.random.Generator
) -> DatasetLevel:
    """Level 1 on the store-wide sample: clusters, then foreground from attention and border cues."""
    k = cfg.k_dataset
    centroids, iters = fit_kmeans(x, k, rng, iters=cfg.kmeans_iters, tol=cfg.kmeans_tol)
    labels, _ = assign(x, centroids)
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
    return DatasetLevel(centroids, fg, counts, cue_score, d, iters)


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
    sizes = np.bincount(groups.group_of, weights=groups.patches, minlength=groups.n_groups).astype(np.int64)
    total = int(sizes.sum())
    d_budget = min(cfg.kmeans_sample, total)
    g_budgets = sample_budgets(sizes, cfg.kmeans_sample, cfg.k_category)
    prob = np.maximum(keep_probs([total], [d_budget])[0], keep_probs(sizes, g_budgets))
    rows = draw_rows(list_shards(run.features), PatchRows(loader), prob, cfg.seed, map_fn)
    x, g, keys, u = rows[:4]
    return rows, bottom_k(u, np.zeros(len(u), np.int64), keys, np.array([d_budget])), bottom_k(u, g, keys, g_budgets)


def fit_levels(run: RunDir, cfg: Config, map_fn: MapFn = serial_map) -> LevelFits:
    """The global parts of levels 1 and 2, from one pass over the store.

    Both k-means, the dataset level's cues and the consistency statistics of the category level are computed on a
    bounded sample in memory (:func:`_sample_rows`); the whole store is read again only to label it
    (:meth:`ClusterStage.process_shard`). Writes ``levels/`` and returns what every shard task needs."""
    if not list_shards(run.features):
        raise FileNotFoundError(f"no feature shards in {run.features}: run extract first (or bring a store)")
    t0 = time.perf_counter()
    groups = cls_groups(run, cfg)  # the image tables: N x D, not the store
    loader = KeyLoader(groups.image_ids, groups.group_of)  # image -> CLS group, for the sample and every shard
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
    _write_levels(run, dataset, cat_centroids, cat_fg, cat_counts, groups)
    atomic_write_json(
        run.level_fit,
        {
            "store_passes": 1,
            "patches": int(groups.patches.sum()),
            "dataset_sample": int(len(d)),
            "category_sample": int(len(c)),
            "dataset_iterations": dataset.iterations,
            "category_iterations": c_iters,
            "groups": groups.n_groups,
        },
    )
    return LevelFits(dataset.centroids[None], dataset.fg, cat_centroids, cat_fg, dataset.direction, loader)


def _write_levels(
    run: RunDir,
    dataset: DatasetLevel,
    cat_centroids: np.ndarray,
    cat_fg: np.ndarray,
    cat_counts: np.ndarray,
    groups: CLSGroups,
) -> None:
    """Level files, for inspection and for the report; counts are the sample's."""
    k, D = dataset.centroids.shape
    n_groups, kc = cat_fg.shape
    atomic_write_table(
        run.level_dataset,
        pa.table(
            {
                "cluster": np.arange(k),
                "fg": dataset.fg,
                "sample_count": dataset.counts,
                "cue_score": dataset.cue_score,
                "centroid": pa.FixedSizeListArray.from_arrays(pa.array(dataset.centroids.ravel()), D),
            }
        ),
    )
    atomic_write_table(
        run.level_categories,
        pa.table(
            {
                "group": np.repeat(np.arange(n_groups), kc),
                "cluster": np.tile(np.arange(kc), n_groups),
                "fg": cat_fg.ravel(),
                "sample_count": cat_counts.ravel(),
                "centroid": pa.FixedSizeListArray.from_arrays(pa.array(cat_centroids.ravel()), D),
            }
        ),
    )
    atomic_write_table(run.level_groups, pa.table({"image_id": groups.image_ids, "group": groups.group_of}))


# ---------------------------------------------------------------------------------------------------------------
# labelling one shard
# ---------------------------------------------------------------------------------------------------------------


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
    d_labels, _ = assign(p.keys, fits.dataset_centroids[0])
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
            }
        )
    return rows


def pseudo_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, **{k: r[k].tolist() for k in ARRAY_COLUMNS}} for r in rows], schema=PSEUDO_SCHEMA
    )


class ClusterStage(Stage):
    """Levels 1-4: fits over the whole store (``prepare``), then every shard labelled and combined."""

    name = "cluster"
    after = ("extract",)
    reads = ("features", "image_tables")
    writes = ("levels", "pseudo", "ablation")  # an ablation describes one clustering: it goes with it
    config_keys = (
        "k_dataset",
        "num_categories",
        "k_category",
        "k_image",
        "consistency",
        "combine",
        "vote",
        "min_gap",
        "kmeans_iters",
        "kmeans_tol",
        "kmeans_sample",
        "seed",
    )
    resources = Resources(cpus=1, gpus="share")
    # 2: sampling keyed by image and patch, exact sums (results independent of shard_size)
    # 3: global levels fitted on a sample drawn in one pass; the store is read twice in all (issue 14)
    # 4: per-image level weights and the weighted combine (issue 13)
    version = 5  # 5: the gap test (an image may hold nothing) and a confidence per image (issue 22)

    def shards(self, ctx: StageContext) -> list[int]:
        shards = ctx.run.shards_of(ctx.run.features)
        if not shards:
            raise FileNotFoundError(f"no feature shards in {ctx.run.features}: run extract first (or bring a store)")
        return shards

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> LevelFits:
        # The global levels are refitted when any shard is pending: they are cheap next to extraction and, being
        # seeded and independent of the order of the work, they come out the same.
        return fit_levels(ctx.run, ctx.cfg, map_fn)

    def process_shard(self, ctx: StageContext, shard: int, fits: LevelFits, worker: object = None) -> dict:
        p = read_patches(ctx.run.feature_shard(shard))
        groups = fits.loader.groups(p.image_ids)[p.row_image]
        rows = cluster_shard(p, groups, fits, ctx.cfg, ctx.device)
        atomic_write_table(ctx.run.pseudo_part(shard), pseudo_table(rows))
        return {
            "images": len(rows),
            "flags": {r["image_id"]: r["flag"] for r in rows if r["flag"]},
            "confidence": {r["image_id"]: r["confidence"] for r in rows},
        }

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        # Passes over the feature store made by this invocation: the fit's (when any shard was pending) plus the
        # labelling pass over the pending shards (a resumed run reads only what it lacks).
        fit = read_json(ctx.run.level_fit) or {}
        passes = (fit.get("store_passes", 0) if ctx.pending else 0) + len(ctx.pending) / max(len(results), 1)
        return {
            "flagged": sum(len(r.get("flags", {})) for r in results.values()),
            "store_passes": round(passes, 3),
            "output": str(ctx.run.pseudo),
        }


def read_pseudo(run: RunDir, columns: list[str] | None = None) -> pa.Table:
    return read_tables(list_shards(run.pseudo, "part"), columns=columns)
