"""Stage ``cluster``: the three levels and their combination, from the feature store to patch pseudo-masks
(:mod:`mlcseg_ray.library.clustering`): the fits over the whole store in ``prepare``, then each shard labelled."""

from __future__ import annotations

from ..core.stage import MapFn, Resources, Stage, StageContext
from ..core.storage import read_json
from ..core.tables import atomic_write_table
from ..formats.feature_store import read_patches
from ..library.clustering import LevelFits, cluster_shard, fit_levels, pseudo_table


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
    # 5: the gap test (an image may hold nothing) and a confidence per image (issue 22)
    version = 6  # 6: CLS groups fitted on a bounded sample, each image assigned in its shard's task (issue 25)

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
        groups = fits.loader.groups(shard, p.image_ids)[p.row_image]
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
