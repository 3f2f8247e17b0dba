"""The feature-store format: schemas, file metadata, writing a shard from numpy arrays, reading a shard's patches.

Feature store (readable with pyarrow alone, no Ray extension types):

* ``features/shard-NNNNN.parquet``, one row per patch: ``image_id`` string, ``py``/``px`` int16 (patch row/col),
  ``key`` fixed_size_binary(2*D): D little-endian float16 (last-block attention key; :func:`key_matrix` reads
  it, and the ``fixed_size_list<float16, D>`` of schema-1 stores), ``cls_attn`` float32 (CLS->patch attention,
  mean over heads). The patches of one image are contiguous, in raster order, all in one shard.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..core.config import Config
from ..core.run_dir import FEATURE_SCHEMA_VERSION, RunDir, list_shards
from ..core.tables import atomic_write_table, read_schema, read_table
from ..ops.kmeans import EPS, check_finite, unit_vectors

META_KEY = b"mlcseg"
# Dictionary encoding and statistics on 384 float16 values per patch make reading 4x slower and buy nothing:
# only the image ids are dictionary-encoded. Every pass of the clustering reads the keys again.
FEATURE_WRITE_OPTIONS = dict(use_dictionary=["image_id"], write_statistics=["image_id", "py", "px"])
# A patch's key is one fixed-size binary value, not a fixed_size_list: Parquet stores a list with a repetition and
# a definition level per float, and encoding and decoding those made writing a shard 4-30x and reading it ~15x
# slower (``bench/store_format.py``). The bytes are the float16 values, little-endian whatever the machine.
KEY_DTYPE = np.dtype("<f2")


# The image table's columns that place a patch grid on its image (what refinement and scoring upsample with).
GEOMETRY_COLUMNS = ["image_id", "uri", "width", "height", "grid_h", "grid_w", "resized_h", "resized_w"]


def feature_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("py", pa.int16()),
            ("px", pa.int16()),
            ("key", key_type(dim)),
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


def store_metadata(info: dict, cfg: Config) -> dict:
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
        "precision": info.get("precision", "fp32"),  # the forward pass's (bf16 autocast or float32)
    }
    return {META_KEY: json.dumps(meta).encode()}


def read_store_metadata(path: str | Path) -> dict:
    md = read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path}: no 'mlcseg' metadata; see README 'Feature store' for the format")
    return json.loads(md[META_KEY])


def fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), values.shape[1])


def key_type(dim: int) -> pa.DataType:
    return pa.binary(KEY_DTYPE.itemsize * dim)


def key_column(keys: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(n, D) keys -> the ``key`` column: each row's D float16 as one fixed-size binary value."""
    k = np.ascontiguousarray(keys, KEY_DTYPE)
    return pa.FixedSizeBinaryArray.from_buffers(key_type(k.shape[1]), len(k), [None, pa.py_buffer(k)])


def key_matrix(col: pa.Array | pa.ChunkedArray, dtype: type = np.float32) -> np.ndarray:
    """The ``key`` column -> (n, D) array: fixed-size binary float16 (this writer's), or a fixed_size_list (stores
    of schema 1, and stores written by other tools)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_fixed_size_binary(col.type):
        return list_to_numpy(col, dtype)
    if col.null_count:
        raise ValueError("the key column has null rows")
    dim, width = col.type.byte_width // KEY_DTYPE.itemsize, col.type.byte_width
    flat = np.frombuffer(col.buffers()[1], KEY_DTYPE, count=len(col) * dim, offset=col.offset * width)
    return flat.reshape(len(col), dim).astype(dtype)  # a copy: writable, and not tied to the Arrow buffer


def list_to_numpy(col: pa.Array | pa.ChunkedArray, dtype: type = np.float32) -> np.ndarray:
    """A fixed_size_list column (ChunkedArray or Array) -> 2-D numpy array, without Python loops."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(dtype, copy=False)


def feature_table(images: list[tuple[str, np.ndarray, np.ndarray, int]], dim: int) -> pa.Table:
    """The features table of one shard from ``(image_id, keys (n, D), cls_attn (n,), grid_w)`` per image, in the
    order given: an image's patches contiguous, in raster order."""
    if not images:
        return feature_schema(dim).empty_table()
    ids, pys, pxs = [], [], []
    keys = np.empty((sum(len(k) for _, k, _, _ in images), dim), KEY_DTYPE)
    pos = 0
    for image_id, k, _, grid_w in images:
        yy, xx = np.divmod(np.arange(len(k)), grid_w)
        ids.append(np.full(len(k), image_id, dtype=object))
        pys.append(yy.astype(np.int16))
        pxs.append(xx.astype(np.int16))
        if k.dtype == KEY_DTYPE:  # what extraction hands over: already rounded (by torch, where the model ran)
            keys[pos : pos + len(k)] = k
        elif k.dtype == np.float32:  # on torch, ~50x faster, numpy's rounding bit for bit
            torch.from_numpy(keys[pos : pos + len(k)]).copy_(torch.from_numpy(np.ascontiguousarray(k)))
        else:  # a brought store's float64 rounds once, straight to float16, as before
            keys[pos : pos + len(k)] = np.asarray(k).astype(KEY_DTYPE)
        pos += len(k)
    return pa.Table.from_arrays(
        [
            pa.array(np.concatenate(ids), pa.string()),
            pa.array(np.concatenate(pys)),
            pa.array(np.concatenate(pxs)),
            key_column(keys),
            pa.array(np.concatenate([np.asarray(a, np.float32) for _, _, a, _ in images])),
        ],
        schema=feature_schema(dim),
    )


def tables_from_records(records: list[dict], dim: int, meta: dict) -> tuple[pa.Table, pa.Table]:
    """Feature and image tables from per-image records - how features computed elsewhere enter a store.

    A record: ``image_id``, ``keys`` (grid_h*grid_w, D) in raster order, ``cls_attn`` (grid_h*grid_w,),
    ``cls_token`` (D,), ``grid_h``, ``grid_w``; optional ``uri``, ``width``, ``height``, ``scale`` (default 1 patch
    = ``patch_size`` pixels, no padding).
    """
    records = sorted(records, key=lambda r: r["image_id"])
    patch = int(meta.get("patch_size", 1))
    per_image, rows = [], []
    for r in records:
        gh, gw = int(r["grid_h"]), int(r["grid_w"])
        k = np.asarray(r["keys"])
        if k.shape != (gh * gw, dim):
            raise ValueError(f"{r['image_id']}: keys shape {k.shape} != ({gh * gw}, {dim})")
        per_image.append((r["image_id"], k, np.asarray(r["cls_attn"], np.float32), gw))
        h, w = r.get("height", gh * patch), r.get("width", gw * patch)
        rows.append(
            {
                "image_id": r["image_id"],
                "uri": r.get("uri", ""),
                "width": w,
                "height": h,
                "grid_h": gh,
                "grid_w": gw,
                "scale": r.get("scale", 1.0),
                "resized_h": gh * patch,
                "resized_w": gw * patch,
                "pad_h": 0,
                "pad_w": 0,
                "cls_token": np.asarray(r["cls_token"], np.float32).tolist(),
                "status": "ok",
                "error": None,
            }
        )
    md = {META_KEY: json.dumps(meta).encode()}
    feats = feature_table(per_image, dim).replace_schema_metadata(md)
    images = pa.Table.from_pylist(rows, schema=image_schema(dim)).replace_schema_metadata(md)
    return feats, images


def write_store_shard(run_root: str | Path, shard: int, records: list[dict], dim: int, meta: dict) -> None:
    """Write one shard of a feature store (features/ + images/) atomically."""
    run = RunDir(run_root)
    feats, images = tables_from_records(records, dim, meta)
    atomic_write_table(run.feature_shard(shard), feats, **FEATURE_WRITE_OPTIONS)
    atomic_write_table(run.image_table(shard), images)


def brought_store_metadata(
    dim: int, patch_size: int, backbone: str = "external", random_weights: bool = False, **extra: object
) -> dict:
    return {
        "schema_version": FEATURE_SCHEMA_VERSION,
        "backbone": backbone,
        "weights": extra.pop("weights", "external"),
        "random_weights": random_weights,
        "patch_size": patch_size,
        "embed_dim": dim,
        "num_prefix_tokens": 1,
        "facet": "key",
        "max_side": 0,
        "upscale": False,
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# reading a feature shard
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Patches:
    """One shard's patches: unit keys, per-image-normalised CLS attention, border flags, image slices."""

    image_ids: list[str]
    starts: np.ndarray  # image i is rows starts[i]:starts[i+1]
    keys: np.ndarray  # (n, D) float32, unit norm, on the k-means summation grid
    attn: np.ndarray  # (n,) in [0, 1] per image
    border: np.ndarray  # (n,) bool
    grid: list[tuple[int, int]]
    row_image: np.ndarray  # (n,) index into image_ids

    def slice(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))


def image_runs(path: str | Path, ids: pa.ChunkedArray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, first row of each image, image index per row): the patches of an image are contiguous rows."""
    enc = ids.combine_chunks().dictionary_encode()
    row_image = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    image_ids = enc.dictionary.to_pylist()
    if not len(row_image):  # a shard whose images all failed to decode
        return [], np.zeros(1, np.int64), row_image
    change = np.flatnonzero(np.diff(row_image)) + 1
    starts = np.concatenate([[0], change, [len(row_image)]]).astype(np.int64)
    if len(image_ids) != len(starts) - 1:
        raise ValueError(f"{path}: the patches of an image must be contiguous rows")
    return image_ids, starts, row_image


def unit_keys(path: str | Path, t: pa.Table, image_ids: list[str], row_image: np.ndarray) -> np.ndarray:
    """The ``key`` column as unit vectors on the k-means grid; NaN or Inf named by image."""
    keys = key_matrix(t.column("key"))
    if not np.isfinite(keys).all():
        bad = image_ids[row_image[np.flatnonzero(~np.isfinite(keys).all(1))[0]]]
        raise ValueError(f"{path}: image {bad!r} has NaN or Inf in its features")
    return unit_vectors(keys, in_place=True)  # key_matrix's copy is ours


def read_patches(path: str | Path) -> Patches:
    t = read_table(path, columns=["image_id", "py", "px", "key", "cls_attn"])
    image_ids, starts, row_image = image_runs(path, t.column("image_id"))
    keys = unit_keys(path, t, image_ids, row_image)
    attn = t.column("cls_attn").to_numpy().astype(np.float32)
    check_finite(attn, f"{path}: cls_attn")
    py, px = t.column("py").to_numpy().astype(np.int32), t.column("px").to_numpy().astype(np.int32)
    border = np.zeros(len(py), bool)
    grid = []
    for i in range(len(image_ids)):
        s = slice(int(starts[i]), int(starts[i + 1]))
        gh, gw = int(py[s].max()) + 1, int(px[s].max()) + 1
        grid.append((gh, gw))
        border[s] = (py[s] == 0) | (px[s] == 0) | (py[s] == gh - 1) | (px[s] == gw - 1)
        a = attn[s]
        lo, hi = a.min(), a.max()
        attn[s] = (a - lo) / (hi - lo) if hi - lo > EPS else 0.5
    return Patches(image_ids, starts, keys, attn, border, grid, row_image)


def first_store_metadata(run: RunDir) -> dict:
    """The store's metadata (backbone, patch size, ...), from its first shard."""
    shards = list_shards(run.features)
    if not shards:
        raise FileNotFoundError(f"no feature shards in {run.features}: run extract first (or bring a store)")
    return read_store_metadata(shards[0])
