"""Stage ``cluster``: the three levels and their combination, from the feature store to patch pseudo-masks
(:mod:`mlcseg_ray.library.clustering`): the fits over the whole store in ``prepare``, then each shard labelled."""

from __future__ import annotations

from ..core.stage import MapFn, Resources, Stage, StageContext
from ..core.storage import read_json
from ..core.tables import atomic_write_table
from ..formats.feature_store import read_patches
from ..library.clustering import LevelFits, cluster_shard, fit_levels, pseudo_table
from ..library.fits import (
    FEATURE_KEYS,
    LEVEL_KEYS,
    check_config,
    check_features,
    copy_levels,
    fit_run,
    has_level_fit,
    levels_id,
    read_level_fits,
    write_level_fit,
)


class ClusterStage(Stage):
    """Levels 1-4: fits over the whole store (``prepare``), then every shard labelled and combined."""

    name = "cluster"
    after = ("extract",)
    reads = ("features", "image_tables")
    writes = ("levels", "pseudo", "ablation")  # an ablation describes one clustering: it goes with it
    per_shard_when_frozen = True  # a frozen run keeps its levels: an image's pseudo-mask depends on it alone
    config_keys = (
        "fit",
        "refit",
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
    # 5: the gap test (an image may hold nothing) and a confidence per image (issue 22)
    # 6: CLS groups fitted on a bounded sample, each image assigned in its shard's task (issue 25)
    version = 7  # 7: the fit as files another run applies: CLS group centroids, direction, drift (issue 43)

    def shards(self, ctx: StageContext) -> list[int]:
        shards = ctx.run.shards_of(ctx.run.features)
        if not shards:
            raise FileNotFoundError(f"no feature shards in {ctx.run.features}: run extract first (or bring a store)")
        return shards

    def preflight(self, ctx: StageContext) -> None:
        if ctx.cfg.fit:  # a fit of another shape is refused before anything is made
            check_config(fit_run(ctx.cfg), ctx.cfg, FEATURE_KEYS + LEVEL_KEYS)

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"levels": levels_id(fit_run(ctx.cfg))} if ctx.cfg.fit else {}

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> LevelFits:
        fitted = fit_run(ctx.cfg)
        if fitted:  # applied: the fitted run's levels label this run's images; nothing is refitted
            check_features(fitted, ctx.run)
            copy_levels(fitted, ctx.run)
            return read_level_fits(fitted, ctx.run)
        if not ctx.cfg.refit and has_level_fit(ctx.run):  # frozen: the run's own levels, kept as they are
            return read_level_fits(ctx.run, ctx.run)
        # The global levels are refitted when any shard is pending: they are cheap next to extraction and, being
        # seeded and independent of the order of the work, they come out the same.
        fits, record = fit_levels(ctx.run, ctx.cfg, map_fn)
        write_level_fit(ctx.run, ctx.cfg, fits, record)
        return fits

    def process_shard(self, ctx: StageContext, shard: int, fits: LevelFits, worker: object = None) -> dict:
        p = read_patches(ctx.run.feature_shard(shard))
        groups = fits.loader.groups(shard, p.image_ids)[p.row_image]
        rows = cluster_shard(p, groups, fits, ctx.cfg, ctx.device)
        atomic_write_table(ctx.run.pseudo_part(shard), pseudo_table(rows))
        ctx.tick(len(rows))
        return {
            "images": len(rows),
            "patches": len(p.keys),
            "far_patches": sum(r["far_patches"] for r in rows),
            "flags": {r["image_id"]: r["flag"] for r in rows if r["flag"]},
            "flagged": sum(bool(r["flag"]) for r in rows),  # what the driver keeps of the flags
            "confidence": {r["image_id"]: r["confidence"] for r in rows},
        }

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        # Passes over the feature store made by this invocation: the fit's (when any shard was pending) plus the
        # labelling pass over the pending shards (a resumed run reads only what it lacks).
        fit = read_json(ctx.run.level_fit) or {}
        passes = (fit.get("store_passes", 0) if ctx.pending else 0) + len(ctx.pending) / max(len(results), 1)
        drift = {}
        if ctx.cfg.fit:  # how far the images are from the fit: 0.05 of the patches would be, with no drift
            patches = sum(r.get("patches", 0) for r in results.values())
            far = sum(r.get("far_patches", 0) for r in results.values()) / max(patches, 1)
            drift = {"drift": {"far_patches": round(far, 4), "far_patches_expected": 0.05}}
        # what this run did with its fit, as run.json says it: fitted on its images, kept (frozen), or applied
        fit = f"applied from {ctx.cfg.fit}" if ctx.cfg.fit else "refitted" if ctx.cfg.refit else "kept (frozen)"
        return {
            **drift,
            "fit": fit,
            "flagged": sum(r.get("flagged", 0) for r in results.values()),
            "store_passes": round(passes, 3),
            "output": str(ctx.run.pseudo),
        }
