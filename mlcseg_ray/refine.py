"""Stage ``refine``: patch soft scores -> full-resolution binary masks (DESIGN §2 "Refinement").

The score grid is upsampled bilinearly onto the padded, resized canvas the model saw (patch centres), cropped to
the resized image (padding undone), resized to the original, EXIF-oriented size; then a two-label DenseCRF on the
RGB image. Masks are written as ``binary/<image_id>.png`` (0 background, 255 foreground); one CPU task per
pseudo-mask shard.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq

from .config import Config
from .imageio import BadImage, load_rgb
from .stage import Resources, Stage, StageContext, for_each_image
from .store import RunDir, atomic_write_bytes, list_shards, shard_index


def upsample_score(score: np.ndarray, grid: tuple[int, int], patch: int, resized: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """Soft score (grid_h*grid_w,) -> probability map (H, W) in original image coordinates."""
    import torch
    import torch.nn.functional as F

    gh, gw = grid
    t = torch.as_tensor(np.asarray(score, np.float32).reshape(1, 1, gh, gw))
    canvas = F.interpolate(t, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)
    rh, rw = resized
    canvas = canvas[..., :rh, :rw]  # drop the bottom/right padding
    H, W = size
    if (rh, rw) != (H, W):
        canvas = F.interpolate(canvas, size=(H, W), mode="bilinear", align_corners=False)
    return canvas[0, 0].numpy().clip(0, 1)


def crf_refine(rgb: np.ndarray, prob: np.ndarray, cfg: Config) -> np.ndarray:
    """Two-label DenseCRF (pydensecrf). Bilateral sxy is given at a 500 px image and scaled with the image."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    H, W = prob.shape
    p = np.clip(prob, 1e-4, 1 - 1e-4)
    d = dcrf.DenseCRF2D(W, H, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]).astype(np.float32))))
    d.addPairwiseGaussian(sxy=cfg.crf_gauss_sxy, compat=cfg.crf_gauss_compat)
    sxy = cfg.crf_bilateral_sxy * max(H, W) / 500.0
    d.addPairwiseBilateral(sxy=sxy, srgb=cfg.crf_bilateral_srgb, rgbim=np.require(rgb, np.uint8, ["C", "W"]),
                           compat=cfg.crf_bilateral_compat)
    q = np.asarray(d.inference(cfg.crf_iters)).reshape(2, H, W)
    return q[1] > q[0]


def crf_size(H: int, W: int, max_side: int) -> tuple[int, int]:
    """The (h, w) the CRF runs at: the image's, or its longer side brought down to ``max_side``."""
    if not max_side or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def refine_image(rgb: np.ndarray, score: np.ndarray, geom: dict, patch: int, cfg: Config) -> np.ndarray:
    """Binary (H, W) mask of one image from its patch soft score. The CRF runs at most at ``crf_max_side`` (its
    cost grows with the pixels; the score it refines is 8-16 px coarse anyway), the mask brought back to full size."""
    from PIL import Image

    H, W = rgb.shape[:2]
    if (W, H) != (geom["width"], geom["height"]):
        raise BadImage(f"image is {W}x{H} now but was {geom['width']}x{geom['height']} at extraction")
    crf = cfg.crf and cfg.crf_iters > 0
    h, w = crf_size(H, W, cfg.crf_max_side) if crf else (H, W)
    prob = upsample_score(score, (geom["grid_h"], geom["grid_w"]), patch, (geom["resized_h"], geom["resized_w"]),
                          (h, w))
    if not crf:
        return prob > 0.5
    if (h, w) == (H, W):
        return crf_refine(rgb, prob, cfg)
    mask = crf_refine(np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)), prob, cfg)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((W, H), Image.BILINEAR)) > 127


def png_bytes(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    from PIL import Image

    img = Image.fromarray(array.astype(np.uint8), mode="L" if palette is None else "P")
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def expected_files(run: RunDir, shard: int, cfg: Config) -> dict[str, dict]:
    """Per image of a shard, what its file must still be (from the manifest; none for a brought-in store)."""
    from .ingest import expected_file

    if not run.manifest.exists():
        return {}
    return {r["image_id"]: expected_file(r, cfg) for r in run.manifest_rows(shard)}


class RefineStage(Stage):
    name = "refine"
    after = ("cluster",)
    reads = ("pseudo", "image_tables", "manifest")
    writes = ("binary",)
    config_keys = ("crf", "crf_iters", "crf_gauss_sxy", "crf_gauss_compat", "crf_bilateral_sxy",
                   "crf_bilateral_srgb", "crf_bilateral_compat", "crf_max_side", "max_pixels")
    resources = Resources(cpus=1)

    def shards(self, ctx: StageContext) -> list[int]:
        parts = list_shards(ctx.run.pseudo, "part")
        if not parts:
            raise FileNotFoundError(f"no pseudo-masks in {ctx.run.pseudo}: run cluster first")
        return [shard_index(p) for p in parts]

    def prepare(self, ctx: StageContext, map_fn) -> int:
        from .features import read_store_metadata

        return int(read_store_metadata(list_shards(ctx.run.features)[0])["patch_size"])

    def process_shard(self, ctx: StageContext, shard: int, patch: int, worker=None) -> dict:
        """Refine and write each image's mask of one pseudo-mask shard."""
        run, cfg = ctx.run, ctx.cfg
        pseudo = pq.read_table(run.pseudo_part(shard), columns=["image_id", "score"]).to_pylist()
        geoms = {r["image_id"]: r for r in pq.read_table(
            run.image_table(shard),
            columns=["image_id", "uri", "width", "height", "grid_h", "grid_w", "resized_h", "resized_w"]).to_pylist()}
        expect = expected_files(run, shard, cfg)

        def refine_one(r):
            g = geoms[r["image_id"]]
            rgb = load_rgb(g["uri"], cfg.max_pixels, expect=expect.get(r["image_id"]))
            mask = refine_image(rgb, np.asarray(r["score"], np.float32), g, patch, cfg)
            atomic_write_bytes(run.binary_mask(r["image_id"]), png_bytes(mask.astype(np.uint8) * 255))

        _, errors = for_each_image(self.name, [(r["image_id"], r) for r in pseudo], refine_one)
        for image_id in errors:  # no mask of an earlier attempt stands beside an error row
            run.binary_mask(image_id).unlink(missing_ok=True)
        return {"images": len(pseudo), "errors": errors}

    def finish(self, ctx: StageContext, results: dict, map_fn) -> dict:
        return {"output": str(ctx.run.binary)}
