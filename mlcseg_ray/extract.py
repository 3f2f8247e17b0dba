"""Stage ``extract``: an actor pool (one model per actor) over shards of image paths (DESIGN §1).

Only shard numbers travel to the actors, never pixels: each actor reads its shard's rows of the manifest, decodes
the images, runs :func:`features.extract_shard` and writes ``features/`` and ``images/`` shards atomically.
"""
from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq

from .stage import Resources, Stage, StageContext
from .store import atomic_write_table

log = logging.getLogger("mlcseg_ray")


def weights_identity(path: str | None) -> dict | None:
    """What a weights file is, cheaply: its resolved path, size and modification time (a changed file, a changed
    fingerprint)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}  # the loader reports a missing file clearly
    return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class ExtractStage(Stage):
    name = "extract"
    after = ("ingest",)
    reads = ("manifest",)
    writes = ("features", "image_tables")
    config_keys = ("backbone", "weights", "facet", "max_side", "upscale", "max_pixels")
    resources = Resources(cpus=0.5, gpus="one", actor=True)

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"weights_file": weights_identity(ctx.cfg.weights)}

    def shards(self, ctx: StageContext) -> list[int]:
        if not ctx.run.manifest.exists():
            raise FileNotFoundError(f"{ctx.run.manifest} not found: give the images (--images, --voc, --coco, "
                                    f"--manifest) to ingest them first")
        return sorted(set(pq.read_table(ctx.run.manifest, columns=["shard"]).column(0).to_pylist()))

    def preflight(self, ctx: StageContext) -> None:
        from .backbones import locate_weights

        locate_weights(ctx.cfg.backbone, ctx.cfg.weights)  # a clear error here, not in every actor

    def setup(self, ctx: StageContext):
        from .backbones import FeatureExtractor, build_backbone

        model, info = build_backbone(ctx.cfg.backbone, ctx.cfg.weights)
        return FeatureExtractor(model.to(ctx.device)), info.to_dict()

    def process_shard(self, ctx: StageContext, shard: int, shared=None, worker=None) -> dict:
        from .features import FEATURE_WRITE_OPTIONS, extract_shard, store_metadata

        extractor, info = worker
        feats, images = extract_shard(extractor, info, ctx.run.manifest_rows(shard), ctx.cfg, ctx.device)
        meta = store_metadata(info, ctx.cfg)
        atomic_write_table(ctx.run.feature_shard(shard), feats.replace_schema_metadata(meta), **FEATURE_WRITE_OPTIONS)
        atomic_write_table(ctx.run.image_table(shard), images.replace_schema_metadata(meta))
        errors = {i: f"extract: {e}" for i, s, e in zip(*(images.column(c).to_pylist()
                                                          for c in ("image_id", "status", "error"))) if s != "ok"}
        return {"images": images.num_rows, "errors": errors}

    def finish(self, ctx: StageContext, results: dict, map_fn) -> dict:
        from .features import read_store_metadata
        from .store import list_shards

        shards = list_shards(ctx.run.features)
        if shards:
            meta = read_store_metadata(shards[0])
            ctx.run.update_record(backbone=meta)
            if meta.get("random_weights"):
                from .backbones import RANDOM_WEIGHTS_WARNING

                log.warning(RANDOM_WEIGHTS_WARNING)
        return {"output": str(ctx.run.features)}
