"""Object regions of a refined mask and a descriptor for each.

Regions are the connected components of the refined mask above ``min_region_area`` (or the whole foreground,
``region=image``), at most ``max_regions`` per image; a region's descriptor is the backbone's CLS token on the
region's box crop resized to ``crop_size`` (:class:`RegionEmbedder`, one per actor), or the mean of the
feature-store keys under the region (``masked_mean``, no network pass). Each region row also holds its pixels as
a COCO RLE (its component and the components joined to it), so labelling never finds the regions again; the part's
``described`` metadata lists every image described (with regions or without), so a failed one is told apart."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from ..core.config import Config
from ..core.prefetch import ahead_of_use
from ..core.run_dir import RunDir
from ..core.stage import attempt
from ..core.tables import read_table
from ..formats.feature_store import fixed_list, read_patches, read_store_metadata
from ..formats.images import load_rgb
from ..formats.manifest import expected_files
from ..formats.masks import read_binary, rle_counts
from ..models.backbones import feature_extractor
from ..ops.regions import crop_batch, find_regions, masked_mean_descriptors

REGION_SCHEMA_FIELDS = [
    ("image_id", pa.string()),
    ("region", pa.int32()),
    ("x0", pa.int32()),
    ("y0", pa.int32()),
    ("x1", pa.int32()),
    ("y1", pa.int32()),
    ("area", pa.int64()),
    ("joined", pa.int64()),  # pixels of components beyond max_regions that took this region's class
    ("rle", pa.string()),  # the region's pixels (joined ones too): COCO RLE counts at the image's size
]
DESCRIBED_KEY = b"described"  # a region part's metadata: the JSON list of the images it describes


def describe_shard(
    run: RunDir, n: int, cfg: Config, embed: RegionEmbedder | None = None, tick: Callable[[int], None] | None = None
) -> tuple[pa.Table, dict[str, str]]:
    """Regions and descriptors of one shard (plain function; ``embed(batch) -> CLS tokens`` for crop_cls), and
    the images that failed; ``tick(n)``: n more images described."""
    tick = tick or (lambda n: None)
    geoms = {r["image_id"]: r for r in read_table(run.image_table(n)).to_pylist() if r["status"] == "ok"}
    pseudo_ids = read_table(run.pseudo_part(n), columns=["image_id"]).column(0).to_pylist()
    meta = read_store_metadata(run.feature_shard(n))
    patches = read_patches(run.feature_shard(n)) if cfg.region_descriptor == "masked_mean" else None
    expect = expected_files(run, n, cfg) if cfg.region_descriptor == "crop_cls" else {}

    def describe(image_id: str) -> tuple[list[dict], np.ndarray | None]:
        """An image's regions and either their crops (embedded below, in batches across the shard's images) or
        their masked-mean descriptors."""
        comp, regions = find_regions(
            read_binary(run.binary_mask(image_id)), cfg.region, cfg.min_region_area, cfg.max_regions
        )
        if not regions:
            return [], None
        regions = [{**r, "rle": rle_counts(comp == r["region"])} for r in regions]
        g = geoms[image_id]
        if cfg.region_descriptor == "crop_cls":
            rgb = load_rgb(g["uri"], cfg.max_pixels, expect=expect.get(image_id))
            return regions, crop_batch(rgb, regions, cfg.crop_size, meta["mean"], meta["std"])
        i = patches.image_ids.index(image_id)
        return regions, masked_mean_descriptors(
            comp, regions, patches.keys[patches.slice(i)], patches.grid[i], g, meta["patch_size"]
        )

    # images without a binary mask failed at refine: their error row is already written
    ids = [i for i in pseudo_ids if run.has_binary_mask(i)]
    crop_cls = cfg.region_descriptor == "crop_cls"
    rows, descs, errors, described = [], [], {}, []
    waiting = np.zeros((0, 3, cfg.crop_size, cfg.crop_size), np.float32)  # crops not embedded yet
    # the next images' crops are cut by cfg.decode_threads threads while the model embeds full batches of them,
    # across the shard's images: cut at multiples of batch_size from its first crop, the same batches whatever
    # the threads
    threads = cfg.decode_threads if crop_cls else 0
    ahead = 2 * cfg.batch_size
    for image_id, (got, error) in ahead_of_use(lambda i: attempt("describe", describe, i), ids, threads, ahead):
        tick(1)
        if error is not None:
            errors[image_id] = error
            continue
        regions, d = got
        described.append(image_id)
        rows += [{"image_id": image_id, **r} for r in regions]
        if d is None:
            continue
        if not crop_cls:
            descs.append(d)
            continue
        waiting = np.concatenate([waiting, d])
        full = len(waiting) - len(waiting) % cfg.batch_size
        if full:
            descs.append(embed(waiting[:full]))
            waiting = waiting[full:]
    if len(waiting):
        descs.append(embed(waiting))
    dim = int(meta["embed_dim"])
    desc = np.concatenate(descs) if descs else np.zeros((0, dim), np.float32)
    table = pa.Table.from_pylist(rows, schema=pa.schema(REGION_SCHEMA_FIELDS))
    table = table.append_column("descriptor", fixed_list(desc.astype(np.float32), pa.float32()))
    return table.replace_schema_metadata({DESCRIBED_KEY: json.dumps(described)}), errors


def described_images(part: pa.Table) -> list[str]:
    """The images a region part describes, in its order (those with no region among them)."""
    return json.loads((part.schema.metadata or {}).get(DESCRIBED_KEY, b"[]"))


class RegionEmbedder:
    """The backbone's CLS token of region crops, batched (``crop_cls``): one per actor."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.extractor, _ = feature_extractor(cfg, device)
        self.device, self.batch_size = device, cfg.batch_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(batch), self.batch_size):
            x = torch.from_numpy(batch[i : i + self.batch_size]).to(self.device)
            out.append(self.extractor(x)["cls"].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
