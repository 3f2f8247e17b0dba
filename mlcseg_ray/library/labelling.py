"""Labelling: each region's class from the class centroids (a spherical k-means over all region descriptors), and
the outputs other tools read: class-id palette PNGs ``masks/<id>.png`` (background 0, classes 1..K, VOC colours),
a COCO fragment per shard, then the fragments merged into ``pseudo_labels.json`` and the region parts into
``regions.parquet``, streamed a part at a time."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from ..core.run_dir import RunDir, list_shards
from ..core.storage import atomic_write_json, atomic_write_many, atomic_write_stream, path_under
from ..core.tables import atomic_concat_tables, atomic_write_table, read_table, rows_where
from ..formats.feature_store import list_to_numpy
from ..formats.masks import png_bytes, rle_mask, voc_palette
from ..ops.kmeans import assign, unit_vectors
from ..ops.sampling import id_hash, row_keys
from .region_descriptors import described_images


class RegionLoader:
    """``load(part) -> (unit descriptors, zeros, row keys)`` for the distributed k-means."""

    def __call__(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = read_table(path, columns=["image_id", "region", "descriptor"])
        x = unit_vectors(list_to_numpy(t.column("descriptor")))
        keys = row_keys(id_hash(t.column("image_id").to_pylist()), t.column("region").to_numpy())
        return x, np.zeros(len(x), np.int64), keys


@dataclass
class ClassFit:
    """What every label shard needs: the class centroids (each shard finds its own COCO image ids)."""

    centroids: np.ndarray  # (K, D)
    k: int


def write_shard_labels(run: RunDir, n: int, fit: ClassFit, min_confidence: float, stable_ids: bool = False) -> dict:
    """Class masks, the COCO fragment and the labelled regions of one shard (plain function), from describe's
    region part: each region's pixels (RLE) and descriptor; an image describe failed on is left out."""
    regions = read_table(run.region_part(n))
    if regions.num_rows:
        labels, sims = assign(unit_vectors(list_to_numpy(regions.column("descriptor"))), fit.centroids)
    else:
        labels, sims = np.zeros(0, np.int64), np.zeros(0, np.float32)
    by_image: dict[str, list[tuple[int, str, int, float]]] = {}
    for image_id, region, rle, lab, sim in zip(
        *(regions.column(c).to_pylist() for c in ("image_id", "region", "rle")), labels, sims, strict=True
    ):
        by_image.setdefault(image_id, []).append((region, rle, int(lab) + 1, float(sim)))
    palette = voc_palette()
    pseudo = read_table(run.pseudo_part(n), columns=["image_id", "confidence"]).to_pylist()
    confidence = {r["image_id"]: float(r["confidence"]) for r in pseudo}
    geoms = {
        r["image_id"]: r
        for r in read_table(run.image_table(n), columns=["image_id", "uri", "width", "height"]).to_pylist()
    }
    coco_ids = coco_image_ids(run, n, stable_ids)
    annotations, classes, images, masks, doubtful = [], {}, [], [], {}
    for image_id in described_images(regions):
        g = geoms[image_id]
        regs = by_image.get(image_id, [])
        if confidence[image_id] < min_confidence:  # a doubtful pseudo-label: kept out of masks and COCO JSON
            doubtful[image_id] = "doubtful"
            regs = []
        class_map = np.zeros((g["height"], g["width"]), np.uint8)
        for _, rle, cat, _ in regs:
            class_map[rle_mask(rle, g["height"], g["width"])] = cat
        masks.append((run.class_mask(image_id), png_bytes(class_map, palette)))
        images.append(
            {
                "id": coco_ids[image_id],
                "file_name": g["uri"],
                "width": g["width"],
                "height": g["height"],
                "mlcseg_image_id": image_id,
            }
        )
        for region, counts, cat, sim in regs:
            rle = {"size": [g["height"], g["width"]], "counts": counts.encode("ascii")}
            area, bbox = int(mask_utils.area(rle)), [int(v) for v in mask_utils.toBbox(rle)]  # joined parts too
            annotations.append(
                {
                    "image_id": coco_ids[image_id],
                    "category_id": cat,
                    "segmentation": {"size": rle["size"], "counts": counts},
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                    "score": round(confidence[image_id], 4),  # the pseudo-mask's confidence: what to threshold
                    "class_score": round(sim, 6),  # the region's cosine similarity to its class centroid
                    "region": region,
                }
            )
            classes[cat] = classes.get(cat, 0) + 1
    atomic_write_many(masks)  # the shard's masks together: to a bucket, concurrently
    # the shard's part of the COCO file: finish streams the parts into one, never holding it whole
    atomic_write_json(run.coco_part(n), {"images": sorted(images, key=lambda x: x["id"]), "annotations": annotations})
    table = regions.drop_columns(["descriptor", "rle"]).replace_schema_metadata(None)
    table = table.append_column("class_id", pa.array((labels + 1).astype(np.int32)))
    table = table.append_column("score", pa.array(sims.astype(np.float32)))
    ids = regions.column("image_id").to_pylist()
    table = table.append_column("confidence", pa.array([confidence.get(i) for i in ids], pa.float32()))
    atomic_write_table(run.labelled_part(n), table)
    return {"images": len(pseudo), "annotations": len(annotations), "classes": classes, "flags": doubtful}


def coco_image_ids(run: RunDir, shard: int, stable: bool = False) -> dict[str, int]:
    """One shard's COCO image ids: the input's own where it had them, else 1-based positions in the sorted manifest
    (``stable``: a 53-bit hash of the image id, which no added image moves). Each task reads them from the
    manifest's narrow columns itself: no map of every image travels to every task."""
    if run.manifest.exists():
        table, rows = rows_where(run.manifest, "shard", shard, ["image_id", "coco_id"])
        ids, own = table.column("image_id").to_pylist(), table.column("coco_id").to_pylist()
        if stable:
            rows = [int(h >> np.uint64(11)) for h in id_hash(ids)]
        return {i: int(c) if c is not None else r + 1 for i, c, r in zip(ids, own, rows, strict=True)}
    # a brought-in store: positions among the sorted ids of all its image tables
    ids = np.sort(
        np.concatenate(
            [
                read_table(p, columns=["image_id"]).column(0).to_numpy(zero_copy_only=False)
                for p in list_shards(run.image_tables)
            ]
        )
    )
    mine = read_table(run.image_table(shard), columns=["image_id"]).column(0).to_pylist()
    return {i: int(np.searchsorted(ids, i)) + 1 for i in mine}


def coco_info(run: RunDir, image_root: str | None) -> dict:
    """The ``info`` of a COCO file of ``run``'s pseudo-labels, its ``file_name``s below ``image_root``."""
    backbone = run.read_record().get("backbone", {})
    return {
        "description": "mlcseg_ray pseudo-labels",
        "backbone": backbone.get("backbone"),
        "random_weights": backbone.get("random_weights"),
        "image_root": image_root,  # file_names are below it, as COCO readers expect (detectron2's image_root)
    }


def write_coco(
    f: BinaryIO, info: dict, chunks: Iterable[tuple[list[dict], list[dict]]], categories: list[dict]
) -> tuple[int, int]:
    """A COCO instances file streamed into ``f`` from ``(images, annotations)`` chunks, one read of each: the images
    go straight out, the annotations (numbered 1.. in order) to a spool appended after them. Returns the numbers of
    images and annotations."""
    images = annotations = 0
    with tempfile.TemporaryFile() as spool:
        f.write(b'{"info": %s,\n"images": [' % json.dumps(info).encode())
        for chunk_images, chunk_annotations in chunks:
            for image in chunk_images:
                f.write(b"%s\n%s" % (b"," if images else b"", json.dumps(image).encode()))
                images += 1
            for a in chunk_annotations:
                annotations += 1
                spool.write(
                    b"%s\n%s" % (b"," if annotations > 1 else b"", json.dumps({**a, "id": annotations}).encode())
                )
        f.write(b'],\n"annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, f)
        f.write(b'],\n"categories": %s}\n' % json.dumps(categories).encode())
    return images, annotations


def merge_outputs(run: RunDir, shards: list[int], k: int) -> None:
    """Per-shard fragments -> one COCO JSON and one regions table, each streamed part by part into its file (atomic
    writes): the driver holds one shard's fragment at a time, whatever the number of images. The COCO file's images
    come shard by shard (by id within a shard), its annotations numbered 1.. in shard order."""
    root = run.read_record().get("image_root")
    info = coco_info(run, root)

    def named(image: dict) -> dict:
        # a fragment names its image by its URI; an image outside the root (a run without one) keeps it
        return {**image, "file_name": (root and path_under(root, image["file_name"])) or image["file_name"]}

    categories = [{"id": c, "name": f"cluster_{c}", "supercategory": "object"} for c in range(1, k + 1)]

    def chunks() -> Iterator[tuple[list[dict], list[dict]]]:
        for n in shards:
            part = json.loads(run.coco_part(n).read_text())
            yield [named(image) for image in part["images"]], part["annotations"]

    def write_file(f: BinaryIO) -> None:
        write_coco(f, info, chunks(), categories)

    atomic_write_stream(run.coco, write_file)
    atomic_concat_tables(run.regions, [run.labelled_part(n) for n in shards])
