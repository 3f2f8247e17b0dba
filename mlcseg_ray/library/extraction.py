"""Feature extraction: images decoded and resized to the backbone's patch grid, forwarded in batches, and one shard's
feature table and image table built (the format: :mod:`mlcseg_ray.formats.feature_store`). Used by the extract
stage's actors and by the benchmarks."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ..core.config import Config
from ..core.prefetch import ahead_of_use
from ..core.stage import image_error
from ..formats.feature_store import (
    feature_table,
    image_schema,
)
from ..formats.images import load_rgb_sized
from ..formats.manifest import expected_file
from ..models.backbones import Extractor, ForwardClock


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


def prepare_image(row: dict, info: dict, cfg: Config) -> tuple[Prepared | None, dict]:
    """Decode and preprocess one image of a shard. Returns it prepared (None where it failed) and its row of the
    image table so far (geometry, or ``status=error`` with the reason)."""
    patch = info["patch_size"]
    base = {"image_id": row["image_id"], "uri": row["uri"], "status": "ok", "error": None}
    if row.get("status", "ok") != "ok":
        return None, {**base, "status": "error", "error": row.get("error") or "failed at ingest"}
    try:
        rgb, (w, h) = load_rgb_sized(
            row["uri"], cfg.max_pixels, lambda w, h: resized_size(w, h, patch, cfg), patch, expected_file(row, cfg)
        )
        g = geometry(w, h, patch, cfg.max_side, cfg.upscale)
        prepared = (row["image_id"], g, preprocess(rgb, g, info["mean"], info["std"]))
    except Exception as e:  # one image's failure is an error row, never a failed job
        return None, {**base, "status": "error", "error": image_error(e)}
    return prepared, {**base, **g.__dict__}


def prepare_images(rows: list[dict], info: dict, cfg: Config) -> tuple[list[Prepared], dict[str, dict]]:
    """:func:`prepare_image` over a shard's rows, one after the other (the benchmarks' measure of the CPU side)."""
    prepared, image_rows = [], {}
    for row in rows:
        p, image_rows[row["image_id"]] = prepare_image(row, info, cfg)
        if p is not None:
            prepared.append(p)
    return prepared, image_rows


Outputs = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # image id -> (keys, cls_attn, cls)
Tick = Callable[[int], None] | None  # told how many more of a shard's images are done (the progress bar's count)


def decode_and_forward(
    extractor: Extractor, info: dict, rows: list[dict], cfg: Config, device: str, tick: Tick = None
) -> tuple[list[tuple[str, Geometry]], dict[str, dict], Outputs]:
    """The model over a shard's images: (id, geometry) of each image it saw, every image's row of the image table so
    far, and the model's outputs by image id.

    The model never waits for the CPU: ``cfg.decode_threads`` threads decode the next images while it runs (at
    most four batches ahead), and one more brings each batch's outputs to the host while the next batch runs. A
    batch is the next ``batch_size`` images of one padded size, forwarded as soon as it is full, the part-filled
    ones at the end: the same batches whatever the threads, so the same bytes. ``tick(n)``: n more images through
    the model (or failed before it)."""
    tick = tick or (lambda n: None)
    prepared, image_rows, outputs = [], {}, {}
    by_size: dict[tuple, list[Prepared]] = {}
    on_host = ThreadPoolExecutor(1, thread_name_prefix="mlcseg-host") if cfg.decode_threads else None
    landed: list[Future | Outputs] = []

    def forward(batch: list[Prepared]) -> None:
        out = extractor(torch.from_numpy(np.stack([p[2] for p in batch])).to(device))
        ids = [p[0] for p in batch]
        landed.append(on_host.submit(host_arrays, out, ids) if on_host else host_arrays(out, ids))
        tick(len(batch))
        batch.clear()

    def forward_all(decoded: Iterable[tuple[dict, tuple[Prepared | None, dict]]]) -> None:
        for row, (p, image_row) in decoded:
            image_rows[row["image_id"]] = image_row
            if p is None:
                tick(1)
            else:
                prepared.append((p[0], p[1]))
                by_size.setdefault(p[2].shape, []).append(p)
                if len(by_size[p[2].shape]) == cfg.batch_size:
                    forward(by_size[p[2].shape])
        for batch in by_size.values():
            if batch:
                forward(batch)

    try:
        decoded = ahead_of_use(lambda r: prepare_image(r, info, cfg), rows, cfg.decode_threads, 4 * cfg.batch_size)
        # a first batch decoded before this shard takes its turn at the model (the actor's other shard may hold it)
        first = list(itertools.islice(decoded, cfg.batch_size))
        with extractor.turn() if isinstance(extractor, ForwardClock) else contextlib.nullcontext():
            forward_all(itertools.chain(first, decoded))
        for done in landed:
            outputs.update(done.result() if isinstance(done, Future) else done)
    finally:
        if on_host:
            on_host.shutdown(cancel_futures=True)
    return prepared, image_rows, outputs


def host_arrays(out: dict[str, torch.Tensor], ids: list[str]) -> Outputs:
    """A batch's outputs on the host: the keys at the store's float16, converted where they are (on a GPU half the
    bytes cross; the same rounding as converting on the host), the CLS attention and token in float32."""
    keys = out["keys"].float().to(torch.float16).cpu().numpy()
    cls_attn, cls = out["cls_attn"].float().cpu().numpy(), out["cls"].float().cpu().numpy()
    return {image_id: (keys[j], cls_attn[j], cls[j]) for j, image_id in enumerate(ids)}


def extract_shard(
    extractor: Extractor, info: dict, rows: list[dict], cfg: Config, device: str = "cpu", tick: Tick = None
) -> tuple[pa.Table, pa.Table]:
    """Decode, preprocess and run the model over one shard's images. Returns (features table, images table).
    Images that fail to decode become rows with ``status=error``."""
    prepared, image_rows, outputs = decode_and_forward(extractor, info, rows, cfg, device, tick)
    per_image = []
    for image_id, g in sorted(prepared, key=lambda t: t[0]):
        k, a, c = outputs[image_id]
        if k.shape[0] != g.grid_h * g.grid_w:
            raise RuntimeError(f"{image_id}: the model gave {k.shape[0]} patches for a {g.grid_h}x{g.grid_w} grid")
        # the attention at the keys' precision: the last float32 bits of a forward pass depend on which images
        # share its batch, and a run's outputs should not depend on how its images were cut into shards
        per_image.append((image_id, k, a.astype(np.float16).astype(np.float32), g.grid_w))
        image_rows[image_id]["cls_token"] = c.tolist()
    images = pa.Table.from_pylist([image_rows[k] for k in sorted(image_rows)], schema=image_schema(info["embed_dim"]))
    return feature_table(per_image, info["embed_dim"]), images
