"""Stage ``label`` (the second half of ``mlcseg label``): K classes over the region descriptors, and the outputs
other tools read (:mod:`mlcseg_ray.library.labelling`).

1. the project's sampled spherical k-means over all descriptors (``prepare``) -> ``num_classes`` centroids;
2. per shard, in parallel: class masks and a COCO fragment; ``finish`` merges the fragments into
   ``pseudo_labels.json`` and the region parts into ``regions.parquet``.
"""

from __future__ import annotations

import numpy as np

from ..core.stage import MapFn, Resources, Stage, StageContext
from ..core.tables import read_metadata
from ..library.fits import CLASS_KEYS, check_config, classes_id, fit_run, read_class_fit, region_drift, write_classes
from ..library.labelling import ClassFit, RegionLoader, merge_outputs, write_shard_labels
from ..ops.kmeans import sampled_kmeans


class LabelStage(Stage):
    """Label, part 2: the class k-means over every descriptor (``prepare``), then class masks and COCO fragments
    per shard, merged into one COCO file and one regions table."""

    name = "label"
    after = ("describe",)
    reads = ("region_parts", "pseudo", "manifest", "image_tables", "run_record")
    writes = ("masks", "coco_parts", "coco", "regions", "classes")
    per_shard_when_frozen = True  # a frozen run keeps its classes: an image's labels depend on it alone
    config_keys = (
        "fit",
        "refit",
        "num_classes",
        "min_confidence",
        "kmeans_iters",
        "kmeans_tol",
        "kmeans_sample",
        "seed",
    )
    resources = Resources(cpus=1)
    # 2: class k-means on a sample (issue 14); 3: COCO area and box from the RLE (joined parts)
    # 4: the pseudo-mask's confidence as the annotation score, min_confidence (issue 22)
    # 5: COCO fragments carry their images; the merged files are streamed (issue 25)
    # 6: file_name relative to the image root, the root in info (issue 41)
    # 7: regions and their pixels from describe's parts, never found again (issue 40)
    version = 8  # 8: the class centroids kept (classes.parquet), or a fitted run's applied (issue 43)

    def shards(self, ctx: StageContext) -> list[int]:
        return ctx.run.pseudo_shards()

    def preflight(self, ctx: StageContext) -> None:
        if ctx.cfg.fit:
            check_config(fit_run(ctx.cfg), ctx.cfg, CLASS_KEYS)

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"classes": classes_id(fit_run(ctx.cfg))} if ctx.cfg.fit else {}

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> ClassFit:
        if not ctx.cfg.fit and not ctx.cfg.refit and ctx.run.classes.exists():  # frozen: its own classes, kept
            return read_class_fit(ctx.run)
        fit = read_class_fit(fit_run(ctx.cfg)) if ctx.cfg.fit else self._fit_classes(ctx, map_fn)
        write_classes(ctx.run, fit)  # applied or fitted, the run keeps its class centroids: a fit of its own
        return fit

    def _fit_classes(self, ctx: StageContext, map_fn: MapFn) -> ClassFit:
        run, cfg = ctx.run, ctx.cfg
        parts = [run.region_part(n) for n in self.shards(ctx)]
        sizes = [read_metadata(p).num_rows for p in parts]
        n_regions = sum(sizes)
        k = max(1, min(cfg.num_classes, n_regions))
        centroids = np.zeros((1, 1), np.float32)
        if n_regions:
            km = sampled_kmeans(
                [p for p, s in zip(parts, sizes, strict=True) if s],
                RegionLoader(),
                k,
                iters=cfg.kmeans_iters,
                tol=cfg.kmeans_tol,
                seed=cfg.seed,
                sample=cfg.kmeans_sample,
                sizes=[n_regions],
                assign_all=False,
                map_fn=map_fn,
            )
            centroids = km.centroids[0]
        return ClassFit(centroids, k)

    def process_shard(self, ctx: StageContext, shard: int, fit: ClassFit, worker: object = None) -> dict:
        # a frozen run's COCO ids must not move when images are added: each from its image id, not its position
        stable_ids = not ctx.cfg.refit
        labelled = write_shard_labels(ctx.run, shard, fit, ctx.cfg.min_confidence, stable_ids)
        ctx.tick(labelled["images"])
        return {**labelled, "k": fit.k}

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        run = ctx.run
        shards = sorted(results)
        k = max([r.get("k", 1) for r in results.values()] or [1])
        merge_outputs(run, shards, k)
        classes: dict = {}
        for r in results.values():
            for c, v in r.get("classes", {}).items():
                classes[int(c)] = classes.get(int(c), 0) + v
        drift = {"drift": region_drift(fit_run(ctx.cfg), run)} if ctx.cfg.fit else {}
        return {
            **drift,
            "classes": k,
            "regions": sum(classes.values()),
            "regions_per_class": {str(c): classes[c] for c in sorted(classes)},
            "output": str(run.coco),
        }
