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
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config
from .imageio import load_rgb
from .refine import mask_path, png_bytes
from .store import (RunDir, atomic_write_bytes, atomic_write_json, atomic_write_table, list_shards, shard_index,
                    shard_name)

DESCRIBE, WRITE = "label_describe", "label_write"
REGION_SCHEMA_FIELDS = [
    ("image_id", pa.string()), ("region", pa.int32()), ("x0", pa.int32()), ("y0", pa.int32()),
    ("x1", pa.int32()), ("y1", pa.int32()), ("area", pa.int64()),
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


def find_regions(mask: np.ndarray, mode: str, min_area: int) -> tuple[np.ndarray, list[dict]]:
    """Component map (0 = none, 1..R = regions kept) and each region's box and area."""
    from scipy import ndimage

    if mode == "image":
        comp = mask.astype(np.int32)
        n = int(mask.any())
    else:
        comp, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    regions, keep = [], np.zeros(n + 1, np.int32)
    if n:
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        boxes = ndimage.find_objects(comp)
        for r in range(1, n + 1):
            if areas[r] >= min_area and boxes[r - 1] is not None:
                keep[r] = len(regions) + 1
                ys, xs = boxes[r - 1]
                regions.append({"region": len(regions) + 1, "x0": xs.start, "y0": ys.start, "x1": xs.stop,
                                "y1": ys.stop, "area": int(areas[r])})
    return keep[comp], regions


def read_binary(run: RunDir, image_id: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(mask_path(run.binary, image_id))) > 0


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


def describe_shard(run: RunDir, n: int, cfg: Config, embed=None, info: dict | None = None) -> pa.Table:
    """Regions and descriptors of one shard (plain function; ``embed(batch) -> CLS tokens`` for crop_cls)."""
    from .cluster import read_patches
    from .features import read_store_metadata

    geoms = {r["image_id"]: r for r in pq.read_table(run.images / shard_name(n)).to_pylist() if r["status"] == "ok"}
    pseudo_ids = pq.read_table(run.pseudo / shard_name(n, "part"), columns=["image_id"]).column(0).to_pylist()
    meta = read_store_metadata(run.features / shard_name(n))
    patches = read_patches(run.features / shard_name(n)) if cfg.region_descriptor == "masked_mean" else None
    rows, descs = [], []
    for image_id in pseudo_ids:
        if not mask_path(run.binary, image_id).exists():
            continue  # failed at refine: its error is in the manifest
        comp, regions = find_regions(read_binary(run, image_id), cfg.region, cfg.min_region_area)
        if not regions:
            continue
        g = geoms[image_id]
        if cfg.region_descriptor == "crop_cls":
            rgb = load_rgb(g["uri"], cfg.max_pixels)
            d = embed(crop_batch(rgb, regions, cfg.crop_size, meta["mean"], meta["std"]))
        else:
            i = patches.image_ids.index(image_id)
            d = masked_mean_descriptors(comp, regions, patches.keys[patches.slice(i)], patches.grid[i], g,
                                        meta["patch_size"])
        rows += [{"image_id": image_id, **r} for r in regions]
        descs.append(d)
    dim = int(meta["embed_dim"])
    desc = np.concatenate(descs) if descs else np.zeros((0, dim), np.float32)
    from .features import fixed_list

    table = pa.Table.from_pylist(rows, schema=pa.schema(REGION_SCHEMA_FIELDS))
    return table.append_column("descriptor", fixed_list(desc.astype(np.float32), pa.float32()))


class DescribeWorker:
    """Actor for ``crop_cls``: one backbone per actor, region crops batched through it."""

    def __init__(self, run_root: str, cfg: dict, threads: int, device: str):
        import torch

        from .backbones import FeatureExtractor, build_backbone

        self.run, self.cfg, self.device = RunDir(run_root), Config(**cfg), device
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        model, _ = build_backbone(self.cfg.backbone, self.cfg.weights)
        self.extractor = FeatureExtractor(model.to(device))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(batch), self.cfg.batch_size):
            x = torch.from_numpy(batch[i: i + self.cfg.batch_size]).to(self.device)
            out.append(self.extractor(x)["cls"].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    def __call__(self, batch: dict) -> dict:
        shards = [int(s) for s in batch["shard"]]
        for n in shards:
            _write_regions(self.run, n, describe_shard(self.run, n, self.cfg, self.embed))
        return {"shard": np.asarray(shards)}


def _write_regions(run: RunDir, n: int, table: pa.Table) -> None:
    atomic_write_table(run.root / "regions" / shard_name(n, "part"), table)
    run.mark_done(DESCRIBE, n, {"regions": table.num_rows})


def _describe_task(n: int, cfg_dict: dict, run_root: str) -> int:
    run = RunDir(run_root)
    _write_regions(run, n, describe_shard(run, n, Config(**cfg_dict)))
    return n


class RegionLoader:
    """``load(part) -> (unit descriptors, zeros)`` for the distributed k-means."""

    def __call__(self, path):
        from .features import list_to_numpy
        from .kmeans import l2_normalize

        x = list_to_numpy(pq.read_table(path, columns=["descriptor"]).column(0))
        return l2_normalize(x), np.zeros(len(x), np.int64)


def _write_task(n: int, centroids: np.ndarray, cfg_dict: dict, run_root: str, coco_ids: dict) -> dict:
    """Class masks and COCO annotations of one shard."""
    from pycocotools import mask as mask_utils

    from .features import list_to_numpy
    from .kmeans import assign, l2_normalize

    cfg, run = Config(**cfg_dict), RunDir(run_root)
    regions = pq.read_table(run.root / "regions" / shard_name(n, "part"))
    if regions.num_rows:
        labels, sims = assign(l2_normalize(list_to_numpy(regions.column("descriptor"))), centroids)
    else:
        labels, sims = np.zeros(0, np.int64), np.zeros(0, np.float32)
    by_image: dict[str, dict[int, tuple[int, float]]] = {}
    for image_id, region, lab, sim in zip(regions.column("image_id").to_pylist(), regions.column("region").to_pylist(),
                                          labels, sims):
        by_image.setdefault(image_id, {})[region] = (int(lab) + 1, float(sim))
    palette = voc_palette()
    pseudo_ids = pq.read_table(run.pseudo / shard_name(n, "part"), columns=["image_id"]).column(0).to_pylist()
    annotations, classes = [], {}
    for image_id in pseudo_ids:
        if not mask_path(run.binary, image_id).exists():
            continue
        comp, regs = find_regions(read_binary(run, image_id), cfg.region, cfg.min_region_area)
        assigned = by_image.get(image_id, {})
        lut = np.zeros(len(regs) + 1, np.uint8)
        for r in regs:
            lut[r["region"]] = assigned[r["region"]][0]
        cls_mask = lut[comp]
        atomic_write_bytes(mask_path(run.masks, image_id), png_bytes(cls_mask, palette))
        for r in regs:
            cat, sim = assigned[r["region"]]
            rle = mask_utils.encode(np.asfortranarray((comp == r["region"]).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "image_id": coco_ids[image_id], "category_id": cat, "segmentation": rle, "area": r["area"],
                "bbox": [r["x0"], r["y0"], r["x1"] - r["x0"], r["y1"] - r["y0"]], "iscrowd": 0,
                "score": round(sim, 6), "region": r["region"],
            })
            classes[cat] = classes.get(cat, 0) + 1
    atomic_write_json(run.root / "coco_parts" / f"part-{n:05d}.json", annotations)
    table = regions.drop_columns(["descriptor"]).append_column("class_id", pa.array((labels + 1).astype(np.int32)))
    table = table.append_column("score", pa.array(sims.astype(np.float32)))
    atomic_write_table(run.root / "regions" / shard_name(n, "labelled"), table)
    run.mark_done(WRITE, n, {"annotations": len(annotations)})
    return {"annotations": len(annotations), "classes": classes}


def coco_image_ids(run: RunDir) -> dict[str, int]:
    """COCO ids: the input's own where it had them, else 1-based positions in the sorted manifest."""
    from .ingest import read_manifest

    if run.manifest.exists():
        rows = read_manifest(run.manifest).to_pylist()
        return {r["image_id"]: int(r["coco_id"]) if r.get("coco_id") is not None else i + 1 for i, r in enumerate(rows)}
    ids = sorted(i for p in list_shards(run.images) for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist())
    return {image_id: i + 1 for i, image_id in enumerate(ids)}


def run_label(run: RunDir, cfg: Config) -> dict:
    import ray

    from .kmeans import distributed_kmeans, map_shards
    from .progress import progress_bar

    parts = list_shards(run.pseudo, "part")
    if not parts:
        raise FileNotFoundError(f"no pseudo-masks in {run.pseudo}: run cluster and refine first")
    shards = [shard_index(p) for p in parts]
    t0 = time.perf_counter()
    todo = [n for n in shards if not run.is_done(DESCRIBE, n)]
    if todo and cfg.region_descriptor == "crop_cls" and ray.is_initialized():
        _describe_on_actors(run, cfg, todo)
    elif todo:
        with progress_bar("describe regions", total=len(todo), unit="shards") as advance:
            if cfg.region_descriptor == "crop_cls":  # no Ray: one in-process worker
                worker = DescribeWorker(str(run.root), cfg.model_dump(), threads=0, device="cpu")
                for n in todo:
                    worker({"shard": [n]})
                    advance()
            else:
                map_shards(_describe_task, todo, cfg.model_dump(), str(run.root), on_done=advance)
    describe_s = time.perf_counter() - t0

    region_parts = [run.root / "regions" / shard_name(n, "part") for n in shards]
    n_regions = sum(pq.read_metadata(p).num_rows for p in region_parts)
    k = max(1, min(cfg.num_classes, n_regions))
    t0 = time.perf_counter()
    if n_regions >= 1:
        km = distributed_kmeans([p for p in region_parts if pq.read_metadata(p).num_rows], RegionLoader(), k,
                                iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, seed=cfg.seed,
                                init_sample=cfg.kmeans_init_sample, device=cfg.device)
        centroids = km.centroids[0]
    else:
        centroids = np.zeros((1, 1), np.float32)
    # The class centroids decide every shard's labels: rewrite all shards whenever they were recomputed.
    run.clear_stage(WRITE)
    coco_ids = coco_image_ids(run)
    with progress_bar("write masks", total=len(shards), unit="shards") as advance:
        results = map_shards(_write_task, shards, centroids, cfg.model_dump(), str(run.root), coco_ids, on_done=advance)
    _merge_outputs(run, shards, k, coco_ids)
    classes = {}
    for r in results:
        for c, v in r["classes"].items():
            classes[c] = classes.get(c, 0) + v
    run.update_record(classes={"k": k, "regions_per_class": {str(c): classes[c] for c in sorted(classes)},
                               "describe_seconds": round(describe_s, 3),
                               "kmeans_seconds": round(time.perf_counter() - t0, 3)})
    images = sum(pq.read_metadata(p).num_rows for p in parts)
    return {"images": images, "errors": 0, "regions": n_regions, "classes": k, "output": str(run.coco)}


def _describe_on_actors(run: RunDir, cfg: Config, todo: list[int]) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from .progress import progress_bar
    from .raytools import cluster_cpus, cluster_gpus, use_gpus

    use_gpu = use_gpus(cfg.device)
    n_actors = max(1, min(cfg.num_workers or (int(cluster_gpus()) if use_gpu else 1), len(todo)))
    ds = ray.data.from_items([{"shard": n} for n in todo], override_num_blocks=len(todo)).map_batches(
        DescribeWorker,
        fn_constructor_kwargs=dict(run_root=str(run.root), cfg=cfg.model_dump(),
                                   threads=max(1, cluster_cpus() // n_actors), device="cuda" if use_gpu else "cpu"),
        batch_size=1, compute=ActorPoolStrategy(size=n_actors), num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else 0.5,
    )
    with progress_bar("describe regions", total=len(todo), unit="shards") as advance:
        for _ in ds.iter_batches(batch_size=1):
            advance()


def _merge_outputs(run: RunDir, shards: list[int], k: int, coco_ids: dict) -> None:
    """Per-shard fragments -> one COCO JSON and one regions table (atomic writes)."""
    images = []
    for p in list_shards(run.images):
        for r in pq.read_table(p, columns=["image_id", "uri", "width", "height", "status"]).to_pylist():
            if r["status"] == "ok" and mask_path(run.binary, r["image_id"]).exists():
                images.append({"id": coco_ids[r["image_id"]], "file_name": r["uri"], "width": r["width"],
                               "height": r["height"], "mlcseg_image_id": r["image_id"]})
    annotations = []
    for n in shards:
        annotations += json.loads((run.root / "coco_parts" / f"part-{n:05d}.json").read_text())
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
    tables = [pq.read_table(run.root / "regions" / shard_name(n, "labelled")) for n in shards]
    atomic_write_table(run.regions, pa.concat_tables(tables) if tables else pa.table({}))
