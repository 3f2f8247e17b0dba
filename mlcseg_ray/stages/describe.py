"""Stage ``describe`` (the first half of ``mlcseg label``): object regions of every refined mask and a descriptor
for each (:mod:`mlcseg_ray.library.region_descriptors`), an actor pool with one model per actor for ``crop_cls``
like extraction, tasks for ``masked_mean`` -> ``regions/part-N.parquet``.
"""

from __future__ import annotations

from ..core.config import Config
from ..core.fingerprint import weights_identity
from ..core.stage import MapFn, Resources, Stage, StageContext, model_actor
from ..core.tables import atomic_write_table, read_table
from ..library.region_descriptors import RegionEmbedder, describe_shard
from ..models.backbones import locate_weights


class DescribeStage(Stage):
    """Label, part 1: object regions of every refined mask and a descriptor for each."""

    name = "describe"
    after = ("refine",)
    reads = ("binary", "pseudo", "image_tables", "features", "manifest")
    writes = ("region_parts",)
    per_shard_when_frozen = True  # an image's regions depends on it and the run's fit alone
    # 2: max_regions, and the joined pixels per region
    version = 3  # 3: each region's pixels (RLE) and the images described, for label (issue 40)
    config_keys = (
        "region",
        "min_region_area",
        "max_regions",
        "region_descriptor",
        "crop_size",
        "backbone",
        "weights",
        "precision",
        "max_pixels",
        "verify_images",
    )

    def resources_for(self, cfg: Config) -> Resources:
        # crop_cls runs the backbone: one model per actor, like extraction; masked_mean reads the store only
        return model_actor(cfg) if cfg.region_descriptor == "crop_cls" else Resources()

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"weights_file": weights_identity(ctx.cfg.weights)}

    def shards(self, ctx: StageContext) -> list[int]:
        return ctx.run.pseudo_shards()

    def preflight(self, ctx: StageContext) -> None:
        if ctx.cfg.region_descriptor == "crop_cls":
            locate_weights(ctx.cfg.backbone, ctx.cfg.weights)  # a clear error here, not in every actor

    def setup(self, ctx: StageContext) -> RegionEmbedder | None:
        return RegionEmbedder(ctx.cfg, ctx.device) if ctx.cfg.region_descriptor == "crop_cls" else None

    def process_shard(
        self, ctx: StageContext, shard: int, shared: object = None, worker: RegionEmbedder | None = None
    ) -> dict:
        before = worker.extractor.seconds if worker else 0.0
        table, errors = describe_shard(ctx.run, shard, ctx.cfg, worker, ctx.tick)
        atomic_write_table(ctx.run.region_part(shard), table)
        return {
            "images": len(read_table(ctx.run.pseudo_part(shard), columns=["image_id"])),
            "errors": errors,
            "regions": table.num_rows,
            "forward_seconds": round(worker.extractor.seconds - before, 4) if worker else 0.0,
        }

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        return {"regions": sum(r.get("regions", 0) for r in results.values()), "output": str(ctx.run.region_parts)}
