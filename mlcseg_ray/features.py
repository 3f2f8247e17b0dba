"""Preprocessing, the feature-store format, and extraction of one shard as a plain function (DESIGN §1 ``extract``).

Feature store (readable with pyarrow alone, no Ray extension types):

* ``features/shard-NNNNN.parquet``, one row per patch: ``image_id`` string, ``py``/``px`` int16 (patch row/col),
  ``key`` fixed_size_list<float16, D> (last-block attention key), ``cls_attn`` float32 (CLS->patch attention, mean
  over heads). The patches of one image are contiguous, in raster order, all in one shard.
* ``images/shard-NNNNN.parquet``, one row per image (errors included): ``image_id``, ``uri``, ``width``/``height``
  (original, EXIF-oriented), ``grid_h``/``grid_w``, ``scale`` (resized = round(original * scale)), ``resized_h``/
  ``resized_w``, ``pad_h``/``pad_w`` (zero padding bottom/right, resized pixels), ``cls_token`` fixed_size_list
  <float32, D>, ``status`` and ``error``.
* file metadata ``mlcseg`` (JSON): backbone, weights, random_weights, patch_size, embed_dim, facet, max_side,
  upscale, mean, std, schema version.

Patch (py, px) covers resized pixels [py*p, (py+1)*p) x [px*p, (px+1)*p); divide by ``scale`` for original pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from .imageio import BadImage, load_rgb
from .store import FEATURE_SCHEMA_VERSION

META_KEY = b"mlcseg"
# Dictionary encoding and statistics on 384 float16 values per patch make reading 4x slower and buy nothing:
# only the image ids are dictionary-encoded. Every pass of the clustering reads the keys again.
FEATURE_WRITE_OPTIONS = dict(use_dictionary=["image_id"], write_statistics=["image_id", "py", "px"])


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


def preprocess(rgb: np.ndarray, g: Geometry, mean, std) -> np.ndarray:
    """HxWx3 uint8 -> normalised CxH'xW' float32, resized then zero-padded (zero = the mean colour) bottom/right."""
    img = Image.fromarray(rgb)
    if (g.resized_w, g.resized_h) != img.size:
        img = img.resize((g.resized_w, g.resized_h), Image.BICUBIC)
    a = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    a = np.pad(a, ((0, g.pad_h), (0, g.pad_w), (0, 0)))
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("py", pa.int16()),
            ("px", pa.int16()),
            ("key", pa.list_(pa.float16(), dim)),
            ("cls_attn", pa.float32()),
        ]
    )


def image_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("grid_h", pa.int32()),
            ("grid_w", pa.int32()),
            ("scale", pa.float64()),
            ("resized_h", pa.int32()),
            ("resized_w", pa.int32()),
            ("pad_h", pa.int32()),
            ("pad_w", pa.int32()),
            ("cls_token", pa.list_(pa.float32(), dim)),
            ("status", pa.string()),
            ("error", pa.string()),
        ]
    )


def store_metadata(info: dict, cfg) -> dict:
    meta = {
        "schema_version": FEATURE_SCHEMA_VERSION,
        "backbone": info["name"],
        "weights": info["weights"],
        "random_weights": info["random_weights"],
        "patch_size": info["patch_size"],
        "embed_dim": info["embed_dim"],
        "num_prefix_tokens": info["num_prefix_tokens"],
        "facet": cfg.facet,
        "max_side": cfg.max_side,
        "upscale": cfg.upscale,
        "mean": list(info["mean"]),
        "std": list(info["std"]),
    }
    return {META_KEY: json.dumps(meta).encode()}


def read_store_metadata(path) -> dict:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path}: no 'mlcseg' metadata; see README 'Feature store' for the format")
    return json.loads(md[META_KEY])


def fixed_list(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), values.shape[1])


def list_to_numpy(col, dtype=np.float32) -> np.ndarray:
    """A fixed_size_list column (ChunkedArray or Array) -> 2-D numpy array, without Python loops."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(dtype, copy=False)


def extract_shard(extractor, info: dict, rows: list[dict], cfg, device="cpu") -> tuple[pa.Table, pa.Table]:
    """Decode, preprocess and run the model over one shard's images. Returns (features table, images table).

    Images that fail to decode become rows with ``status=error``; images of the same padded size share a batch.
    """
    import torch

    from .ingest import expected_file

    patch, dim = info["patch_size"], info["embed_dim"]
    prepared, image_rows = [], {}
    for row in rows:
        base = {"image_id": row["image_id"], "uri": row["uri"], "status": "ok", "error": None}
        if row.get("status", "ok") != "ok":
            image_rows[row["image_id"]] = {**base, "status": "error", "error": row.get("error") or "failed at ingest"}
            continue
        try:
            rgb = load_rgb(row["uri"], cfg.max_pixels, min_side=patch, expect=expected_file(row, cfg))
            g = geometry(rgb.shape[1], rgb.shape[0], patch, cfg.max_side, cfg.upscale)
            prepared.append((row["image_id"], g, preprocess(rgb, g, info["mean"], info["std"])))
        except BadImage as e:
            image_rows[row["image_id"]] = {**base, "status": "error", "error": str(e)}
            continue
        except Exception as e:  # one image's failure is an error row, never a failed job
            image_rows[row["image_id"]] = {**base, "status": "error", "error": f"{type(e).__name__}: {e}"}
            continue
        image_rows[row["image_id"]] = {**base, **g.__dict__}

    # Batch images of equal padded size together: padding inside a batch would change the attention.
    outputs = {}
    by_size: dict[tuple, list] = {}
    for item in prepared:
        by_size.setdefault(item[2].shape, []).append(item)
    for items in by_size.values():
        for i in range(0, len(items), cfg.batch_size):
            chunk = items[i: i + cfg.batch_size]
            x = torch.from_numpy(np.stack([c[2] for c in chunk])).to(device)
            out = extractor(x)
            for j, (image_id, g, _) in enumerate(chunk):
                outputs[image_id] = (
                    out["keys"][j].float().cpu().numpy(),
                    out["cls_attn"][j].float().cpu().numpy(),
                    out["cls"][j].float().cpu().numpy(),
                )

    ids, pys, pxs, keys, attns = [], [], [], [], []
    for image_id, g, _ in sorted(prepared, key=lambda t: t[0]):
        k, a, c = outputs[image_id]
        n = g.grid_h * g.grid_w
        assert k.shape[0] == n, (k.shape, g)
        ids.append(np.full(n, image_id, dtype=object))
        yy, xx = np.divmod(np.arange(n), g.grid_w)
        pys.append(yy.astype(np.int16))
        pxs.append(xx.astype(np.int16))
        keys.append(k.astype(np.float16))
        # at the keys' precision: the last float32 bits of a forward pass depend on which images share its batch,
        # and a run's outputs should not depend on how its images were cut into shards
        attns.append(a.astype(np.float16).astype(np.float32))
        image_rows[image_id]["cls_token"] = c
    if keys:
        feats = pa.Table.from_arrays(
            [
                pa.array(np.concatenate(ids), pa.string()),
                pa.array(np.concatenate(pys)),
                pa.array(np.concatenate(pxs)),
                fixed_list(np.concatenate(keys), pa.float16()),
                pa.array(np.concatenate(attns)),
            ],
            schema=feature_schema(dim),
        )
    else:
        feats = feature_schema(dim).empty_table()
    img_rows = [image_rows[k] for k in sorted(image_rows)]
    for r in img_rows:
        if "cls_token" in r:
            r["cls_token"] = r["cls_token"].tolist()
    images = pa.Table.from_pylist(img_rows, schema=image_schema(dim))
    return feats, images


def tables_from_records(records: list[dict], dim: int, meta: dict) -> tuple[pa.Table, pa.Table]:
    """Feature and image tables from per-image records - how features computed elsewhere enter a store.

    A record: ``image_id``, ``keys`` (grid_h*grid_w, D) in raster order, ``cls_attn`` (grid_h*grid_w,),
    ``cls_token`` (D,), ``grid_h``, ``grid_w``; optional ``uri``, ``width``, ``height``, ``scale`` (default 1 patch
    = ``patch_size`` pixels, no padding).
    """
    records = sorted(records, key=lambda r: r["image_id"])
    patch = int(meta.get("patch_size", 1))
    ids, pys, pxs, keys, attns, rows = [], [], [], [], [], []
    for r in records:
        gh, gw = int(r["grid_h"]), int(r["grid_w"])
        n = gh * gw
        k = np.asarray(r["keys"])
        if k.shape != (n, dim):
            raise ValueError(f"{r['image_id']}: keys shape {k.shape} != ({n}, {dim})")
        yy, xx = np.divmod(np.arange(n), gw)
        ids.append(np.full(n, r["image_id"], dtype=object))
        pys.append(yy.astype(np.int16))
        pxs.append(xx.astype(np.int16))
        keys.append(k.astype(np.float16))
        attns.append(np.asarray(r["cls_attn"], np.float32))
        h, w = r.get("height", gh * patch), r.get("width", gw * patch)
        rows.append({"image_id": r["image_id"], "uri": r.get("uri", ""), "width": w, "height": h,
                     "grid_h": gh, "grid_w": gw, "scale": r.get("scale", 1.0), "resized_h": gh * patch,
                     "resized_w": gw * patch, "pad_h": 0, "pad_w": 0,
                     "cls_token": np.asarray(r["cls_token"], np.float32).tolist(), "status": "ok", "error": None})
    md = {META_KEY: json.dumps(meta).encode()}
    feats = pa.Table.from_arrays(
        [pa.array(np.concatenate(ids), pa.string()), pa.array(np.concatenate(pys)), pa.array(np.concatenate(pxs)),
         fixed_list(np.concatenate(keys), pa.float16()), pa.array(np.concatenate(attns))],
        schema=feature_schema(dim)).replace_schema_metadata(md)
    images = pa.Table.from_pylist(rows, schema=image_schema(dim)).replace_schema_metadata(md)
    return feats, images


def write_store_shard(run_root, shard: int, records: list[dict], dim: int, meta: dict) -> None:
    """Write one shard of a feature store (features/ + images/) atomically."""
    from .store import RunDir, atomic_write_table

    run = RunDir(run_root)
    feats, images = tables_from_records(records, dim, meta)
    atomic_write_table(run.feature_shard(shard), feats, **FEATURE_WRITE_OPTIONS)
    atomic_write_table(run.image_table(shard), images)


def brought_store_metadata(dim: int, patch_size: int, backbone: str = "external", random_weights: bool = False,
                           **extra) -> dict:
    return {"schema_version": FEATURE_SCHEMA_VERSION, "backbone": backbone, "weights": extra.pop("weights", "external"),
            "random_weights": random_weights, "patch_size": patch_size, "embed_dim": dim, "num_prefix_tokens": 1,
            "facet": "key", "max_side": 0, "upscale": False, "mean": [0, 0, 0], "std": [1, 1, 1], **extra}
