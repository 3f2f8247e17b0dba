"""Stage ``refine``: patch soft scores -> full-resolution binary masks (DESIGN §2 "Refinement").

The score grid is upsampled bilinearly onto the padded, resized canvas the model saw (patch centres), cropped to
the resized image (padding undone), resized to the original, EXIF-oriented size; then a two-label DenseCRF on the
RGB image. Masks are written as ``binary/<image_id>.png`` (0 background, 255 foreground). Ray tasks on CPUs, one
per pseudo-mask shard, resumable by shard.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq

from .config import Config
from .imageio import BadImage, load_rgb
from .store import RunDir, atomic_write_bytes, list_shards, shard_index

STAGE = "refine"


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
    d.addPairwiseBilateral(sxy=sxy, srgb=cfg.crf_bilateral_srgb, rgbim=np.ascontiguousarray(rgb),
                           compat=cfg.crf_bilateral_compat)
    q = np.asarray(d.inference(cfg.crf_iters)).reshape(2, H, W)
    return q[1] > q[0]


def refine_image(rgb: np.ndarray, score: np.ndarray, geom: dict, patch: int, cfg: Config) -> np.ndarray:
    """Binary (H, W) mask of one image from its patch soft score."""
    H, W = rgb.shape[:2]
    if (W, H) != (geom["width"], geom["height"]):
        raise BadImage(f"image is {W}x{H} now but was {geom['width']}x{geom['height']} at extraction")
    prob = upsample_score(score, (geom["grid_h"], geom["grid_w"]), patch, (geom["resized_h"], geom["resized_w"]), (H, W))
    if cfg.crf and cfg.crf_iters > 0:
        return crf_refine(rgb, prob, cfg)
    return prob > 0.5


def png_bytes(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    from PIL import Image

    img = Image.fromarray(array.astype(np.uint8), mode="L" if palette is None else "P")
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def mask_path(folder, image_id: str):
    return folder / f"{image_id}.png"


def _refine_shard(part_path, cfg_dict: dict, run_root: str, patch: int) -> dict:
    """One pseudo-mask shard: refine and write each image's mask, then the shard's marker."""
    cfg = Config(**cfg_dict)
    run = RunDir(run_root)
    n = shard_index(part_path)
    pseudo = pq.read_table(part_path, columns=["image_id", "score"]).to_pylist()
    geoms = {r["image_id"]: r for r in pq.read_table(
        run.images / f"shard-{n:05d}.parquet",
        columns=["image_id", "uri", "width", "height", "grid_h", "grid_w", "resized_h", "resized_w"]).to_pylist()}
    errors, fg_share = {}, {}
    for r in pseudo:
        g = geoms[r["image_id"]]
        try:
            rgb = load_rgb(g["uri"], cfg.max_pixels)
            mask = refine_image(rgb, np.asarray(r["score"], np.float32), g, patch, cfg)
        except BadImage as e:
            errors[r["image_id"]] = f"refine: {e}"
            continue
        except Exception as e:  # one image's failure is an error row, never a failed job
            errors[r["image_id"]] = f"refine: {type(e).__name__}: {e}"
            continue
        atomic_write_bytes(mask_path(run.binary, r["image_id"]), png_bytes(mask.astype(np.uint8) * 255))
        fg_share[r["image_id"]] = float(mask.mean())
    run.mark_done(STAGE, n, {"images": len(pseudo), "errors": errors})
    return {"images": len(pseudo), "errors": errors}


def run_refine(run: RunDir, cfg: Config) -> dict:
    from .features import read_store_metadata
    from .ingest import record_errors
    from .kmeans import map_shards
    from .progress import progress_bar

    parts = list_shards(run.pseudo, "part")
    if not parts:
        raise FileNotFoundError(f"no pseudo-masks in {run.pseudo}: run cluster first")
    patch = int(read_store_metadata(list_shards(run.features)[0])["patch_size"])
    done = run.done_shards(STAGE)
    todo = [p for p in parts if shard_index(p) not in done]
    with progress_bar("refine", total=len(todo), unit="shards") as advance:
        map_shards(_refine_shard, todo, cfg.model_dump(), str(run.root), patch, on_done=advance)
    errors = _stage_errors(run, STAGE)
    if errors and run.manifest.exists():
        record_errors(run.manifest, errors)
    images = sum(pq.read_metadata(p).num_rows for p in parts)
    return {"images": images, "errors": len(errors), "shards_done": len(todo), "shards_skipped": len(parts) - len(todo),
            "output": str(run.binary)}


def _stage_errors(run: RunDir, stage: str) -> dict:
    import json

    errors = {}
    for n in sorted(run.done_shards(stage)):
        errors.update(json.loads((run.state(stage) / f"{n:05d}").read_text()).get("errors", {}))
    return errors
