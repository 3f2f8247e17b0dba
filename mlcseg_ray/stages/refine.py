"""Stage ``refine``: patch soft scores -> full-resolution binary masks.

The score grid is upsampled bilinearly onto the padded, resized canvas the model saw (patch centres), cropped to
the resized image (padding undone), resized to the original, EXIF-oriented size (at most ``crf_max_side``); then a
two-label CRF on the RGB image (``crf_backend``: the torch refiner, batched over the shard's images on a GPU, or
pydensecrf's DenseCRF). Masks are written as ``binary/<image_id>.png`` (0 background, 255 foreground); one task
per pseudo-mask shard (with a share of a GPU where the run has them).
"""

from __future__ import annotations

import numpy as np

from ..core import storage
from ..core.run_dir import id_problem
from ..core.stage import MapFn, Resources, Stage, StageContext, for_each_image
from ..core.storage import atomic_write_many
from ..core.tables import read_table
from ..formats.feature_store import GEOMETRY_COLUMNS, first_store_metadata
from ..formats.images import load_rgb
from ..formats.manifest import expected_files
from ..formats.masks import png_bytes
from ..ops.crf import CrfParams, crf_inputs, refine_masks


class RefineStage(Stage):
    name = "refine"
    after = ("cluster",)
    reads = ("pseudo", "image_tables", "manifest", "features")
    writes = ("binary",)
    per_shard_when_frozen = True  # an image's mask depends on it and the run's fit alone
    config_keys = (
        "crf",
        "crf_backend",
        "crf_iters",
        "crf_gauss_sxy",
        "crf_gauss_compat",
        "crf_bilateral_sxy",
        "crf_bilateral_srgb",
        "crf_bilateral_compat",
        "crf_local_srgb",
        "crf_local_compat",
        "crf_max_side",
        "max_pixels",
        "verify_images",
    )
    resources = Resources(cpus=1, gpus="share")

    def shards(self, ctx: StageContext) -> list[int]:
        return ctx.run.pseudo_shards()

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> int:
        return int(first_store_metadata(ctx.run)["patch_size"])

    def process_shard(self, ctx: StageContext, shard: int, patch: int, worker: object = None) -> dict:
        """Refine and write each image's mask of one pseudo-mask shard."""
        run, cfg = ctx.run, ctx.cfg
        crf = CrfParams.of(cfg)
        pseudo = read_table(run.pseudo_part(shard), columns=["image_id", "score"]).to_pylist()
        geoms = {r["image_id"]: r for r in read_table(run.image_table(shard), columns=GEOMETRY_COLUMNS).to_pylist()}
        expect = expected_files(run, shard, cfg)

        def prepare(r: dict) -> tuple:
            run.binary_mask(r["image_id"])  # an id that cannot name a file is this image's error row
            g = geoms[r["image_id"]]
            rgb = load_rgb(g["uri"], cfg.max_pixels, expect=expect.get(r["image_id"]))
            return crf_inputs(rgb, np.asarray(r["score"], np.float32), g, patch, crf), rgb.shape[:2]

        prepared, errors = for_each_image(self.name, [(r["image_id"], r) for r in pseudo], prepare)
        ids = list(prepared)
        ctx.tick(len(errors))  # failed before the CRF: done as far as the progress bar goes
        fg = refine_masks([prepared[i][0] for i in ids], [prepared[i][1] for i in ids], crf, ctx.device, ctx.tick)
        masks = [(run.binary_mask(i), png_bytes(m.astype(np.uint8) * 255)) for i, m in zip(ids, fg, strict=True)]
        atomic_write_many(masks)  # the shard's masks together: to a bucket, concurrently
        for image_id in errors:  # no mask of an earlier attempt stands beside an error row
            if id_problem(image_id) is None:
                storage.remove(run.binary_mask(image_id))
        return {"images": len(pseudo), "errors": errors}

    def finish(self, ctx: StageContext, results: dict, map_fn: MapFn) -> dict:
        return {"output": str(ctx.run.binary)}
