"""Feature extraction: images decoded and resized to the backbone's patch grid, forwarded in batches, and one shard's
feature table and image table built (the format: :mod:`mlcseg_ray.formats.feature_store`). Used by the extract
stage's actors and by the benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ..core.config import Config
from ..core.stage import image_error
from ..formats.feature_store import (
    feature_table,
    image_schema,
)
from ..formats.images import load_rgb_sized
from ..formats.manifest import expected_file
from ..models.backbones import (
    FeatureExtractor,
)


@dataclass
class Geometry:
    width: int
    height: int
    scale: float
    resized_h: int
    resized_w: int
    grid_h: int
    grid_w: int
    pad_h: int
    pad_w: int


def geometry(width: int, height: int, patch: int, max_side: int, upscale: bool) -> Geometry:
    scale = max_side / max(width, height)
    if scale > 1 and not upscale:
        scale = 1.0
    rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
    gh, gw = math.ceil(rh / patch), math.ceil(rw / patch)
    return Geometry(width, height, scale, rh, rw, gh, gw, gh * patch - rh, gw * patch - rw)


def resized_size(width: int, height: int, patch: int, cfg: Config) -> tuple[int, int]:
    """The (w, h) an image of ``width`` x ``height`` is brought to before the network sees it."""
    g = geometry(width, height, patch, cfg.max_side, cfg.upscale)
    return g.resized_w, g.resized_h


def preprocess(rgb: np.ndarray, g: Geometry, mean: list[float], std: list[float]) -> np.ndarray:
    """HxWx3 uint8 -> normalised CxH'xW' float32, resized then zero-padded (zero = the mean colour) bottom/right."""
    img = Image.fromarray(rgb)
    if (g.resized_w, g.resized_h) != img.size:
        img = img.resize((g.resized_w, g.resized_h), Image.BICUBIC)
    a = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    a = np.pad(a, ((0, g.pad_h), (0, g.pad_w), (0, 0)))
    return np.ascontiguousarray(a.transpose(2, 0, 1))


Prepared = tuple[str, Geometry, np.ndarray]  # image id, its geometry, the network's input (C, H', W')


def prepare_images(rows: list[dict], info: dict, cfg: Config) -> tuple[list[Prepared], dict[str, dict]]:
    """Decode and preprocess one shard's images. Returns the prepared images and every image's row of the image
    table so far (geometry, or ``status=error`` with the reason)."""
    patch = info["patch_size"]
    prepared, image_rows = [], {}
    for row in rows:
        base = {"image_id": row["image_id"], "uri": row["uri"], "status": "ok", "error": None}
        if row.get("status", "ok") != "ok":
            image_rows[row["image_id"]] = {**base, "status": "error", "error": row.get("error") or "failed at ingest"}
            continue
        try:
            rgb, (w, h) = load_rgb_sized(
                row["uri"], cfg.max_pixels, lambda w, h: resized_size(w, h, patch, cfg), patch, expected_file(row, cfg)
            )
            g = geometry(w, h, patch, cfg.max_side, cfg.upscale)
            prepared.append((row["image_id"], g, preprocess(rgb, g, info["mean"], info["std"])))
        except Exception as e:  # one image's failure is an error row, never a failed job
            image_rows[row["image_id"]] = {**base, "status": "error", "error": image_error(e)}
            continue
        image_rows[row["image_id"]] = {**base, **g.__dict__}
    return prepared, image_rows


def forward_images(
    extractor: FeatureExtractor, prepared: list[Prepared], batch_size: int, device: str
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{image_id: (keys, cls_attn, cls)}``: the model over the prepared images, images of equal padded size
    batched together (padding inside a batch would change the attention)."""
    outputs = {}
    by_size: dict[tuple, list] = {}
    for item in prepared:
        by_size.setdefault(item[2].shape, []).append(item)
    for items in by_size.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            out = extractor(torch.from_numpy(np.stack([c[2] for c in chunk])).to(device))
            for j, (image_id, _, _) in enumerate(chunk):
                outputs[image_id] = (
                    out["keys"][j].float().cpu().numpy(),
                    out["cls_attn"][j].float().cpu().numpy(),
                    out["cls"][j].float().cpu().numpy(),
                )
    return outputs


def extract_shard(
    extractor: FeatureExtractor, info: dict, rows: list[dict], cfg: Config, device: str = "cpu"
) -> tuple[pa.Table, pa.Table]:
    """Decode, preprocess and run the model over one shard's images. Returns (features table, images table).
    Images that fail to decode become rows with ``status=error``."""
    prepared, image_rows = prepare_images(rows, info, cfg)
    outputs = forward_images(extractor, prepared, cfg.batch_size, device)
    per_image = []
    for image_id, g, _ in sorted(prepared, key=lambda t: t[0]):
        k, a, c = outputs[image_id]
        if k.shape[0] != g.grid_h * g.grid_w:
            raise RuntimeError(f"{image_id}: the model gave {k.shape[0]} patches for a {g.grid_h}x{g.grid_w} grid")
        # the attention at the keys' precision: the last float32 bits of a forward pass depend on which images
        # share its batch, and a run's outputs should not depend on how its images were cut into shards
        per_image.append((image_id, k, a.astype(np.float16).astype(np.float32), g.grid_w))
        image_rows[image_id]["cls_token"] = c.tolist()
    images = pa.Table.from_pylist([image_rows[k] for k in sorted(image_rows)], schema=image_schema(info["embed_dim"]))
    return feature_table(per_image, info["embed_dim"]), images
