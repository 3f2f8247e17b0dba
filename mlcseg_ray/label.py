"""Stage ``label``: object regions, their descriptors, K classes, and the outputs other tools read.

1. describe (per shard, parallel): regions are the connected components of the refined mask above
   ``min_region_area`` (or the whole foreground, ``region=image``); a region's descriptor is the backbone's CLS token
   on the region's box crop resized to ``crop_size`` (an actor pool, one model per actor, like extraction), or the
   mean of the feature-store keys under the region (``masked_mean``, no network pass) -> ``regions/part-N.parquet``;
2. the project's distributed spherical k-means over all descriptors -> ``num_classes`` centroids;
3. write (per shard, parallel): class-id palette PNGs ``masks/<id>.png`` (background 0, classes 1..K, VOC colours)
   and a COCO fragment per shard; the driver merges fragments into ``pseudo_labels.json`` and the region parts
   into ``regions.parquet``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config
from .imageio import load_rgb
from .refine import png_bytes
from .stage import Resources, Stage, StageContext, for_each_image
from .store import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_table, list_shards, shard_index

REGION_SCHEMA_FIELDS = [
    ("image_id", pa.string()), ("region", pa.int32()), ("x0", pa.int32()), ("y0", pa.int32()),
    ("x1", pa.int32()), ("y1", pa.int32()), ("area", pa.int64()),
    ("joined", pa.int64()),  # pixels of components beyond max_regions that took this region's class
]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def find_regions(mask: np.ndarray, mode: str, min_area: int, max_regions: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Component map (0 = none, 1..R = regions kept) and each region's box, area and joined pixels.

    Components smaller than ``min_area`` become background. With ``max_regions`` > 0, only the largest that many
    components are regions of their own (each one descriptor: the work per image is bounded whatever the mask's
    fragmentation); every other component joins the kept region nearest to it, taking its class. A region's box
    and area are those of its own component (what its descriptor sees); ``joined`` counts the pixels it took in."""
    from scipy import ndimage

    if mode == "image":
        comp = mask.astype(np.int32)
        n = int(mask.any())
    else:
        comp, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    regions, keep = [], np.zeros(n + 1, np.int32)
    if not n:
        return keep[comp], regions
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(comp)
    big = [r for r in range(1, n + 1) if areas[r] >= min_area and boxes[r - 1] is not None]
    kept = big
    if max_regions and len(big) > max_regions:
        kept = sorted(sorted(big, key=lambda r: (-areas[r], r))[:max_regions])  # the largest, in scan order
    for r in kept:
        keep[r] = len(regions) + 1
        ys, xs = boxes[r - 1]
        regions.append({"region": len(regions) + 1, "x0": xs.start, "y0": ys.start, "x1": xs.stop, "y1": ys.stop,
                        "area": int(areas[r]), "joined": 0})
    out = keep[comp]
    dropped = [r for r in big if not keep[r]]
    if dropped:
        # each dropped component's pixels take the label of the nearest kept pixel
        _, (iy, ix) = ndimage.distance_transform_edt(out == 0, return_indices=True)
        joining = np.isin(comp, dropped)
        out[joining] = out[iy[joining], ix[joining]]
        joined = np.bincount(out[joining], minlength=len(regions) + 1)
        for reg in regions:
            reg["joined"] = int(joined[reg["region"]])
    return out, regions


def read_binary(run: RunDir, image_id: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(run.binary_mask(image_id))) > 0


def crop_batch(rgb: np.ndarray, regions: list[dict], size: int, mean, std) -> np.ndarray:
    from PIL import Image

    out = []
    img = Image.fromarray(rgb)
    for r in regions:
        crop = img.crop((r["x0"], r["y0"], r["x1"], r["y1"])).resize((size, size), Image.BICUBIC)
        a = (np.asarray(crop, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(a.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, 3, size, size), np.float32)


def masked_mean_descriptors(comp: np.ndarray, regions: list[dict], keys: np.ndarray, grid, geom, patch) -> np.ndarray:
    """Mean key of the patches whose centres fall inside each region (the nearest patch when none does)."""
    gh, gw = grid
    H, W = comp.shape
    scale = geom["scale"]
    cy = np.clip(((np.arange(gh) + 0.5) * patch / scale).astype(int), 0, H - 1)
    cx = np.clip(((np.arange(gw) + 0.5) * patch / scale).astype(int), 0, W - 1)
    at_centres = comp[np.ix_(cy, cx)].ravel()
    out = []
    for r in regions:
        sel = at_centres == r["region"]
        if not sel.any():
            py = min(gh - 1, int((r["y0"] + r["y1"]) / 2 * scale / patch))
            px = min(gw - 1, int((r["x0"] + r["x1"]) / 2 * scale / patch))
            sel = np.zeros(gh * gw, bool)
            sel[py * gw + px] = True
        out.append(keys[sel].mean(0))
    return np.asarray(out, np.float32).reshape(len(regions), keys.shape[1])


def describe_shard(run: RunDir, n: int, cfg: Config, embed=None) -> tuple[pa.Table, dict[str, str]]:
    """Regions and descriptors of one shard (plain function; ``embed(batch) -> CLS tokens`` for crop_cls), and
    the images that failed."""
    from .cluster import read_patches
    from .features import fixed_list, read_store_metadata
    from .refine import expected_files

    geoms = {r["image_id"]: r for r in pq.read_table(run.image_table(n)).to_pylist() if r["status"] == "ok"}
    pseudo_ids = pq.read_table(run.pseudo_part(n), columns=["image_id"]).column(0).to_pylist()
    meta = read_store_metadata(run.feature_shard(n))
    patches = read_patches(run.feature_shard(n)) if cfg.region_descriptor == "masked_mean" else None
    expect = expected_files(run, n, cfg) if cfg.region_descriptor == "crop_cls" else {}

    def describe(image_id):
        """An image's regions and either their crops (embedded below, all of the shard's together) or their
        masked-mean descriptors."""
        comp, regions = find_regions(read_binary(run, image_id), cfg.region, cfg.min_region_area, cfg.max_regions)
        if not regions:
            return [], None
        g = geoms[image_id]
        if cfg.region_descriptor == "crop_cls":
            rgb = load_rgb(g["uri"], cfg.max_pixels, expect=expect.get(image_id))
            return regions, crop_batch(rgb, regions, cfg.crop_size, meta["mean"], meta["std"])
        i = patches.image_ids.index(image_id)
        return regions, masked_mean_descriptors(comp, regions, patches.keys[patches.slice(i)], patches.grid[i], g,
                                                meta["patch_size"])

    # images without a binary mask failed at refine: their error row is already written
    done, errors = for_each_image("label", [(i, i) for i in pseudo_ids if run.binary_mask(i).exists()], describe)
    rows = [{"image_id": image_id, **r} for image_id, (regions, _) in done.items() for r in regions]
    descs = [d for _, d in done.values() if d is not None]
    if cfg.region_descriptor == "crop_cls" and descs:
        # the crops of every image of the shard in full batches: one forward per batch_size crops, not per image
        descs = [embed(np.concatenate(descs))]
    dim = int(meta["embed_dim"])
    desc = np.concatenate(descs) if descs else np.zeros((0, dim), np.float32)
    table = pa.Table.from_pylist(rows, schema=pa.schema(REGION_SCHEMA_FIELDS))
    return table.append_column("descriptor", fixed_list(desc.astype(np.float32), pa.float32())), errors


class RegionEmbedder:
    """The backbone's CLS token of region crops, batched (``crop_cls``): one per actor."""

    def __init__(self, cfg: Config, device: str):
        from .backbones import FeatureExtractor, build_backbone

        model, _ = build_backbone(cfg.backbone, cfg.weights)
        self.extractor, self.device, self.batch_size = FeatureExtractor(model.to(device)), device, cfg.batch_size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(batch), self.batch_size):
            x = torch.from_numpy(batch[i: i + self.batch_size]).to(self.device)
            out.append(self.extractor(x)["cls"].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


class DescribeStage(Stage):
    """Label, part 1: object regions of every refined mask and a descriptor for each."""

    name = "describe"
    after = ("refine",)
    reads = ("binary", "pseudo", "image_tables", "features")
    writes = ("region_parts",)
    version = 2  # 2: max_regions, and the joined pixels per region
    config_keys = ("region", "min_region_area", "max_regions", "region_descriptor", "crop_size", "backbone", "weights",
                   "max_pixels")

    def resources_for(self, cfg: Config) -> Resources:
        # crop_cls runs the backbone: one model per actor, like extraction; masked_mean reads the store only
        return Resources(cpus=0.5, gpus="one", actor=True) if cfg.region_descriptor == "crop_cls" else Resources()

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        from .extract import weights_identity

        return {"weights_file": weights_identity(ctx.cfg.weights)}

    def shards(self, ctx: StageContext) -> list[int]:
        parts = list_shards(ctx.run.pseudo, "part")
        if not parts:
            raise FileNotFoundError(f"no pseudo-masks in {ctx.run.pseudo}: run cluster and refine first")
        return [shard_index(p) for p in parts]

    def preflight(self, ctx: StageContext) -> None:
        if ctx.cfg.region_descriptor == "crop_cls":
            from .backbones import locate_weights

            locate_weights(ctx.cfg.backbone, ctx.cfg.weights)  # a clear error here, not in every actor

    def setup(self, ctx: StageContext):
        return RegionEmbedder(ctx.cfg, ctx.device) if ctx.cfg.region_descriptor == "crop_cls" else None

    def process_shard(self, ctx: StageContext, shard: int, shared=None, worker=None) -> dict:
        table, errors = describe_shard(ctx.run, shard, ctx.cfg, worker)
        atomic_write_table(ctx.run.region_part(shard), table)
        return {"images": len(pq.read_table(ctx.run.pseudo_part(shard), columns=["image_id"])), "errors": errors,
                "regions": table.num_rows}

    def finish(self, ctx: StageContext, results: dict, map_fn) -> dict:
        return {"regions": sum(r.get("regions", 0) for r in results.values()), "output": str(ctx.run.region_parts)}


class RegionLoader:
    """``load(part) -> (unit descriptors, zeros, row keys)`` for the distributed k-means."""

    def __call__(self, path):
        from .features import list_to_numpy
        from .kmeans import id_hash, row_keys, unit_vectors

        t = pq.read_table(path, columns=["image_id", "region", "descriptor"])
        x = unit_vectors(list_to_numpy(t.column("descriptor")))
        keys = row_keys(id_hash(t.column("image_id").to_pylist()), t.column("region").to_numpy())
        return x, np.zeros(len(x), np.int64), keys


@dataclass
class ClassFit:
    """What every label shard needs: the class centroids and the COCO image ids."""

    centroids: np.ndarray  # (K, D)
    k: int
    coco_ids: dict[str, int]


def write_shard_labels(run: RunDir, n: int, fit: ClassFit, cfg: Config) -> dict:
    """Class masks, the COCO fragment and the labelled regions of one shard (plain function)."""
    from pycocotools import mask as mask_utils

    from .features import list_to_numpy
    from .kmeans import assign, unit_vectors

    regions = pq.read_table(run.region_part(n))
    if regions.num_rows:
        labels, sims = assign(unit_vectors(list_to_numpy(regions.column("descriptor"))), fit.centroids)
    else:
        labels, sims = np.zeros(0, np.int64), np.zeros(0, np.float32)
    by_image: dict[str, dict[int, tuple[int, float]]] = {}
    for image_id, region, lab, sim in zip(regions.column("image_id").to_pylist(), regions.column("region").to_pylist(),
                                          labels, sims):
        by_image.setdefault(image_id, {})[region] = (int(lab) + 1, float(sim))
    palette = voc_palette()
    pseudo_ids = pq.read_table(run.pseudo_part(n), columns=["image_id"]).column(0).to_pylist()
    annotations, classes, images = [], {}, 0
    for image_id in pseudo_ids:
        if not run.binary_mask(image_id).exists():
            continue
        comp, regs = find_regions(read_binary(run, image_id), cfg.region, cfg.min_region_area, cfg.max_regions)
        assigned = by_image.get(image_id, {})
        if len(assigned) != len(regs):
            continue  # failed at describe: its error row is written
        lut = np.zeros(len(regs) + 1, np.uint8)
        for r in regs:
            lut[r["region"]] = assigned[r["region"]][0]
        atomic_write_bytes(run.class_mask(image_id), png_bytes(lut[comp], palette))
        images += 1
        for r in regs:
            cat, sim = assigned[r["region"]]
            rle = mask_utils.encode(np.asfortranarray((comp == r["region"]).astype(np.uint8)))
            area, bbox = int(mask_utils.area(rle)), [int(v) for v in mask_utils.toBbox(rle)]  # joined parts too
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "image_id": fit.coco_ids[image_id], "category_id": cat, "segmentation": rle, "area": area,
                "bbox": bbox, "iscrowd": 0,
                "score": round(sim, 6), "region": r["region"],
            })
            classes[cat] = classes.get(cat, 0) + 1
    atomic_write_json(run.coco_part(n), annotations)
    table = regions.drop_columns(["descriptor"]).append_column("class_id", pa.array((labels + 1).astype(np.int32)))
    table = table.append_column("score", pa.array(sims.astype(np.float32)))
    atomic_write_table(run.labelled_part(n), table)
    return {"images": len(pseudo_ids), "annotations": len(annotations), "classes": classes}


def coco_image_ids(run: RunDir) -> dict[str, int]:
    """COCO ids: the input's own where it had them, else 1-based positions in the sorted manifest."""
    from .ingest import read_manifest

    if run.manifest.exists():
        rows = read_manifest(run.manifest).to_pylist()
        return {r["image_id"]: int(r["coco_id"]) if r.get("coco_id") is not None else i + 1 for i, r in enumerate(rows)}
    ids = sorted(i for p in list_shards(run.image_tables)
                 for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist())
    return {image_id: i + 1 for i, image_id in enumerate(ids)}


class LabelStage(Stage):
    """Label, part 2: the class k-means over every descriptor (``prepare``), then class masks and COCO fragments
    per shard, merged into one COCO file and one regions table."""

    name = "label"
    after = ("describe",)
    reads = ("region_parts", "binary", "pseudo", "manifest")
    writes = ("masks", "coco_parts", "coco", "regions")
    config_keys = ("num_classes", "region", "min_region_area", "max_regions", "kmeans_iters", "kmeans_tol",
                   "kmeans_sample", "seed")
    resources = Resources(cpus=1)
    version = 3  # 2: class k-means on a sample (issue 14); 3: COCO area and box from the RLE (joined parts)

    def shards(self, ctx: StageContext) -> list[int]:
        return DescribeStage().shards(ctx)

    def prepare(self, ctx: StageContext, map_fn) -> ClassFit:
        from .kmeans import sampled_kmeans

        run, cfg = ctx.run, ctx.cfg
        parts = [run.region_part(n) for n in self.shards(ctx)]
        sizes = [pq.read_metadata(p).num_rows for p in parts]
        n_regions = sum(sizes)
        k = max(1, min(cfg.num_classes, n_regions))
        centroids = np.zeros((1, 1), np.float32)
        if n_regions:
            km = sampled_kmeans([p for p, s in zip(parts, sizes) if s], RegionLoader(), k, iters=cfg.kmeans_iters,
                                tol=cfg.kmeans_tol, seed=cfg.seed, sample=cfg.kmeans_sample, sizes=[n_regions],
                                assign_all=False, map_fn=map_fn)
            centroids = km.centroids[0]
        return ClassFit(centroids, k, coco_image_ids(run))

    def process_shard(self, ctx: StageContext, shard: int, fit: ClassFit, worker=None) -> dict:
        return {**write_shard_labels(ctx.run, shard, fit, ctx.cfg), "k": fit.k}

    def finish(self, ctx: StageContext, results: dict, map_fn) -> dict:
        run = ctx.run
        shards = sorted(results)
        k = max([r.get("k", 1) for r in results.values()] or [1])
        _merge_outputs(run, shards, k, coco_image_ids(run))
        classes: dict = {}
        for r in results.values():
            for c, v in r.get("classes", {}).items():
                classes[int(c)] = classes.get(int(c), 0) + v
        return {"classes": k, "regions": sum(classes.values()),
                "regions_per_class": {str(c): classes[c] for c in sorted(classes)}, "output": str(run.coco)}


def _merge_outputs(run: RunDir, shards: list[int], k: int, coco_ids: dict) -> None:
    """Per-shard fragments -> one COCO JSON and one regions table (atomic writes)."""
    images = []
    for p in list_shards(run.image_tables):
        for r in pq.read_table(p, columns=["image_id", "uri", "width", "height", "status"]).to_pylist():
            if r["status"] == "ok" and run.class_mask(r["image_id"]).exists():
                images.append({"id": coco_ids[r["image_id"]], "file_name": r["uri"], "width": r["width"],
                               "height": r["height"], "mlcseg_image_id": r["image_id"]})
    annotations = []
    for n in shards:
        annotations += json.loads(run.coco_part(n).read_text())
    for i, a in enumerate(annotations):
        a["id"] = i + 1
    rec = run.read_record()
    coco = {
        "info": {"description": "mlcseg_ray pseudo-labels", "backbone": rec.get("backbone", {}).get("backbone"),
                 "random_weights": rec.get("backbone", {}).get("random_weights")},
        "images": sorted(images, key=lambda x: x["id"]),
        "annotations": annotations,
        "categories": [{"id": c, "name": f"cluster_{c}", "supercategory": "object"} for c in range(1, k + 1)],
    }
    atomic_write_json(run.coco, coco)
    tables = [pq.read_table(run.labelled_part(n)) for n in shards]
    atomic_write_table(run.regions, pa.concat_tables(tables) if tables else pa.table({}))
