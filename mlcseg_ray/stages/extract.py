"""Stage ``extract``: an actor pool (one model per actor) over shards of image paths.

Only shard numbers travel to the actors, never pixels: each actor reads its shard's rows of the manifest, decodes
the images and runs them through the model (:mod:`mlcseg_ray.library.extraction`), and writes ``features/`` and
``images/`` shards atomically (the format: :mod:`mlcseg_ray.formats.feature_store`).
"""

from __future__ import annotations

from ..core.config import Config
from ..core.fingerprint import weights_identity
from ..core.stage import MapFn, Resources, Stage, StageContext, model_actor
from ..core.tables import atomic_write_table, read_table
from ..formats.feature_store import (
    FEATURE_WRITE_OPTIONS,
    read_store_metadata,
    store_metadata,
)
from ..library.extraction import extract_shard
from ..models.backbones import ForwardClock, feature_extractor, locate_weights

# what identifies an image's file: a change in any of these redoes its shard


class ExtractStage(Stage):
    name = "extract"
    after = ("ingest",)
    reads = ("manifest",)
    writes = ("features", "image_tables")
    config_keys = ("backbone", "weights", "facet", "max_side", "upscale", "max_pixels", "verify_images", "precision")
    # an image's features depend on that image and the backbone alone: adding, changing or removing images
    # redoes only the shards they are in (ingest keeps every known image in its shard)
    per_shard_inputs = True
    version = 2  # 2: markers record their shard's inputs

    def resources_for(self, cfg: Config) -> Resources:
        return model_actor(cfg)

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"weights_file": weights_identity(ctx.cfg.weights)}

    def shards(self, ctx: StageContext) -> list[int]:
        if not ctx.run.manifest.exists():
            raise FileNotFoundError(
                f"{ctx.run.manifest} not found: give the images (--images, --voc, --coco, "
                f"--manifest) to ingest them first"
            )
        return sorted(set(read_table(ctx.run.manifest, columns=["shard"]).column(0).to_pylist()))

    def preflight(self, ctx: StageContext) -> None:
        locate_weights(ctx.cfg.backbone, ctx.cfg.weights)  # a clear error here, not in every actor

    def setup(self, ctx: StageContext) -> tuple[ForwardClock, dict]:
        return feature_extractor(ctx.cfg, ctx.device)

    def process_shard(
        self, ctx: StageContext, shard: int, shared: object = None, worker: tuple[ForwardClock, dict] | None = None
    ) -> dict:
        extractor, info = worker
        before = extractor.seconds
        feats, images = extract_shard(extractor, info, ctx.run.manifest_rows(shard), ctx.cfg, ctx.device, ctx.tick)
        forward_seconds = extractor.seconds - before
        meta = store_metadata(info, ctx.cfg)
        atomic_write_table(ctx.run.feature_shard(shard), feats.replace_schema_metadata(meta), **FEATURE_WRITE_OPTIONS)
        atomic_write_table(ctx.run.image_table(shard), images.replace_schema_metadata(meta))
        errors = {
            i: f"extract: {e}"
            for i, s, e in zip(*(images.column(c).to_pylist() for c in ("image_id", "status", "error")), strict=True)
            if s != "ok"
        }
        return {"images": images.num_rows, "errors": errors, "forward_seconds": round(forward_seconds, 4)}

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        shards = ctx.run.shards_of(ctx.run.features)
        if shards:
            meta = read_store_metadata(ctx.run.feature_shard(shards[0]))
            ctx.run.update_record(backbone=meta)  # the end of the command says what it means (once: pipeline.py)
        return {"output": str(ctx.run.features)}
