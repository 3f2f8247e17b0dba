"""``mlcseg export RUN --format F --out DIR``: a labelled run as a dataset that the next tool loads (issue 41).

* ``coco``: ``annotations/instances_pseudo.json`` (detectron2's ``register_coco_instances``, mmdetection,
  Datumaro, FiftyOne), its ``file_name`` relative to ``info.image_root``: the run's image root, or with
  ``--copy-images`` the ``images/`` folder beside it;
* ``voc``: ``SegmentationClass/`` (class ids, the VOC palette), ``SegmentationObject/`` (one index per region),
  ``ImageSets/Segmentation/default.txt`` and ``labelmap.txt`` (what CVAT's "Segmentation mask" import, Datumaro's
  ``voc_segmentation`` and mmsegmentation read), ``JPEGImages/`` with ``--copy-images``;
* ``yolo-seg``: Ultralytics' ``images/`` and ``labels/`` (one polygon per region: its parts and holes joined as
  Ultralytics' own COCO converter joins them) and ``data.yaml``; the images are always copied (Ultralytics finds a
  label by its image's path);
* ``hf``: Parquet for the Hugging Face Hub: ``data/`` one row per image (``image`` and ``mask`` in ``datasets``'
  ``Image`` layout, a struct of ``bytes`` and ``path``), ``regions/`` one row per region, and a dataset card
  (``README.md``) with the backbone, the config, and the random-weights warning where it applies;
  ``datasets.load_dataset("parquet", data_files=...)`` or ``load_dataset(DIR)`` reads it.

The run is read shard by shard (the label stage's per-shard COCO fragments and the masks): nothing the size of the
run is held. ``min_confidence`` / ``max_confidence`` keep the images whose confidence (``status.parquet``, read a
shard's images at a time) is in that range: the sure ones for training, the doubtful ones for review. DIR is a
local folder or a bucket prefix; every file is written atomically, and every name in it is the image's own id or
its path under the image root (checked: nothing outside DIR)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from ..core.run_dir import RunDir
from ..core.storage import (
    Location,
    as_location,
    atomic_write_bytes,
    atomic_write_stream,
    atomic_write_text,
    is_local,
    path_under,
)
from ..core.tables import atomic_write_table, read_table
from ..formats.images import read_bytes
from ..formats.masks import png_bytes, voc_palette
from ..formats.packed import file_name
from ..models.backbones import untrained_warning
from .labelling import coco_info, write_coco

FORMATS = ("coco", "voc", "yolo-seg", "hf")


@dataclass(frozen=True)
class Exported:
    format: str
    out: str
    images: int
    annotations: int
    classes: int


def export_run(
    run: RunDir,
    fmt: str,
    out: str,
    copy_images: bool = False,
    min_confidence: float | None = None,
    max_confidence: float | None = None,
) -> Exported:
    """Write ``run``'s pseudo-labels as ``fmt`` into ``out``; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not run.coco.exists():
        raise FileNotFoundError(f"{run.root} has no pseudo-labels yet (no pseudo_labels.json): run `mlcseg label`")
    dest = as_location(out)
    keep = (min_confidence, max_confidence)
    classes = _classes(run)
    writer = {"coco": _coco, "voc": _voc, "yolo-seg": _yolo, "hf": _hf}[fmt]
    images, annotations = writer(run, dest, keep, classes, copy_images)
    return Exported(fmt, str(dest), images, annotations, len(classes))


# ------------------------------------------------------------------ what is exported
def _classes(run: RunDir) -> list[dict]:
    """The run's categories (ids 1..K), read from the COCO file's tail (its last line holds them; a longer tail is
    read where they do not fit in the first)."""
    marker, tail_size = '"categories": ', 65536
    with run.coco.open("rb") as f:
        size = f.seek(0, 2)
        while True:
            f.seek(max(0, size - tail_size))
            tail = f.read().decode("utf-8", errors="replace")
            if marker in tail or tail_size >= size:
                break
            tail_size *= 4
    return json.loads(tail[tail.rindex(marker) + len(marker) : tail.rindex("}")])


Bounds = tuple[float | None, float | None]  # --min-confidence, --max-confidence


def _confident(run: RunDir, ids: list[str], bounds: Bounds) -> set[str] | None:
    """Which of ``ids`` (one shard's images) to export: status ok and confidence within the bounds
    (``status.parquet``, read for these ids alone: its row groups are by image id); None: all of them."""
    low, high = bounds
    if low is None and high is None:
        return None
    if not ids:
        return set()
    rows = read_table(
        run.status, columns=["image_id", "status", "confidence"], filters=[("image_id", "in", ids)]
    ).to_pylist()
    return {
        r["image_id"]
        for r in rows
        if r["status"] == "ok"
        and r["confidence"] is not None
        and (low is None or r["confidence"] >= low)
        and (high is None or r["confidence"] <= high)
    }


def _labelled(run: RunDir, keep: Bounds) -> Iterator[tuple[dict, list[dict]]]:
    """Each exported image's COCO entry (``file_name`` its URI) and its annotations, shard by shard."""
    for _, labelled in _shards(run, keep):
        yield from labelled


def _shards(run: RunDir, bounds: Bounds) -> Iterator[tuple[int, list[tuple[dict, list[dict]]]]]:
    """Each run shard's number and its exported images (COCO entry and annotations): one shard in memory."""
    for n in run.shards_of(run.coco_parts, "labelled"):  # each with its COCO fragment beside it
        part = json.loads(run.coco_part(n).read_text())
        keep = _confident(run, [image["mlcseg_image_id"] for image in part["images"]], bounds)
        by_image: dict[int, list[dict]] = {}
        for a in part["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        yield (
            n,
            [
                (image, by_image.get(image["id"], []))
                for image in part["images"]
                if keep is None or image["mlcseg_image_id"] in keep
            ],
        )


def _relative_name(root: str | None, image: dict) -> str:
    """Where an image goes below an export's image folder: its path under the run's image root, else its id with
    the file's extension (never a path that leaves the folder)."""
    below = root and path_under(root, image["file_name"])
    name = file_name(image["file_name"])  # inside a tar or Parquet file: the member's name
    return below or f"{image['mlcseg_image_id']}{posixpath.splitext(name)[1].lower() or '.jpg'}"


def _copy_image(uri: str, to: Location) -> None:
    atomic_write_bytes(to, read_bytes(uri))


# ------------------------------------------------------------------ coco
def _coco(run: RunDir, dest: Location, keep: Bounds, classes: list[dict], copy: bool) -> tuple[int, int]:
    root = run.read_record().get("image_root")
    info = coco_info(run, "images" if copy else root)

    def chunks() -> Iterator[tuple[list[dict], list[dict]]]:
        for image, anns in _labelled(run, keep):
            name = _relative_name(root, image)
            if copy:
                _copy_image(image["file_name"], dest / "images" / name)
            yield [{**image, "file_name": name}], anns

    counts = []
    atomic_write_stream(
        dest / "annotations" / "instances_pseudo.json", lambda f: counts.extend(write_coco(f, info, chunks(), classes))
    )
    return counts[0], counts[1]


# ------------------------------------------------------------------ voc
def _voc(run: RunDir, dest: Location, keep: Bounds, classes: list[dict], copy: bool) -> tuple[int, int]:
    palette = voc_palette()
    ids, annotations = [], 0
    for image, anns in _labelled(run, keep):
        image_id = image["mlcseg_image_id"]
        atomic_write_bytes(dest / "SegmentationClass" / f"{image_id}.png", run.class_mask(image_id).read_bytes())
        objects = np.zeros((image["height"], image["width"]), np.uint8)
        for index, a in enumerate(anns, start=1):  # at most 255 regions: the VOC object PNG is 8-bit
            objects[mask_utils.decode(a["segmentation"]).astype(bool)] = min(index, 254)
        atomic_write_bytes(dest / "SegmentationObject" / f"{image_id}.png", png_bytes(objects, palette))
        if copy:
            _copy_image(image["file_name"], dest / "JPEGImages" / f"{image_id}.jpg")
        ids.append(image_id)
        annotations += len(anns)
    atomic_write_text(dest / "ImageSets" / "Segmentation" / "default.txt", "".join(f"{i}\n" for i in ids))
    lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    for c in classes:
        r, g, b = palette[3 * c["id"] : 3 * c["id"] + 3]
        lines.append(f"{c['name']}:{r},{g},{b}::")
    atomic_write_text(dest / "labelmap.txt", "\n".join(lines) + "\n")
    return len(ids), annotations


# ------------------------------------------------------------------ yolo-seg
def _yolo(run: RunDir, dest: Location, keep: Bounds, classes: list[dict], copy: bool) -> tuple[int, int]:
    images = annotations = 0
    root = run.read_record().get("image_root")
    for image, anns in _labelled(run, keep):
        name = _relative_name(root, image)
        _copy_image(image["file_name"], dest / "images" / name)
        rows = []
        for a in anns:
            polygon = region_polygon(mask_utils.decode(a["segmentation"]))
            if len(polygon) >= 3:
                xy = (polygon / [image["width"], image["height"]]).clip(0, 1).ravel()
                rows.append(" ".join([str(a["category_id"] - 1), *(f"{v:.6f}" for v in xy)]))
        atomic_write_text(dest / "labels" / f"{posixpath.splitext(name)[0]}.txt", "".join(f"{r}\n" for r in rows))
        images += 1
        annotations += len(rows)
    names = "".join(f"  {c['id'] - 1}: {c['name']}\n" for c in classes)
    # Ultralytics resolves a relative `path` against the working directory (or its own datasets folder), so the
    # dataset's folder is written out in full: the file then works from anywhere, and says where the dataset was made
    root = dest.absolute() if is_local(dest) else dest
    atomic_write_text(dest / "data.yaml", f"path: {json.dumps(str(root))}\ntrain: images\nval: images\nnames:\n{names}")
    return images, annotations


def region_polygon(mask: np.ndarray) -> np.ndarray:
    """One polygon (N, 2) in pixel coordinates for a region's mask: the outline of each part and of each hole, joined
    into one ring by going to the next outline at its nearest point and coming back the same way (what Ultralytics'
    COCO converter does with a region in several pieces), so that an even-odd fill gives the mask back."""
    import contourpy

    padded = np.pad(mask.astype(np.float32), 1)
    # each outline (x, y), closed; in pixel-centre coordinates of the unpadded mask
    outlines = [line - 1 for line in contourpy.contour_generator(z=padded).lines(0.5) if len(line) >= 3]
    if not outlines:
        return np.zeros((0, 2))
    ring = [outlines[0]]
    for nxt in outlines[1:]:
        here = np.concatenate(ring)
        d = ((here[:, None, :] - nxt[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        joined = np.concatenate([here[: i + 1], np.roll(nxt, -j, axis=0), nxt[j : j + 1], here[i:]])
        ring = [joined]
    return ring[0]


# ------------------------------------------------------------------ hf
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature, as Parquet holds it
HF_IMAGES = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", HF_IMAGE),
        ("mask", HF_IMAGE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("confidence", pa.float32()),
    ]
)
HF_REGIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("region", pa.int32()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("score", pa.float32()),
        ("class_score", pa.float32()),
    ]
)


def _hf_features(schema: pa.Schema) -> bytes:
    """The schema metadata by which ``datasets`` reads the image columns as images (its ``Features``)."""
    value = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32"}
    features = {}
    for field in schema:
        if field.type == HF_IMAGE:
            features[field.name] = {"_type": "Image"}
        elif pa.types.is_fixed_size_list(field.type):
            features[field.name] = {"_type": "List", "feature": {"dtype": "float32", "_type": "Value"}, "length": 4}
        else:
            features[field.name] = {"dtype": value[field.type], "_type": "Value"}
    return json.dumps({"info": {"features": features}}).encode()


def _hf(run: RunDir, dest: Location, keep: Bounds, classes: list[dict], copy: bool) -> tuple[int, int]:
    names = {c["id"]: c["name"] for c in classes}
    images_schema = HF_IMAGES.with_metadata({b"huggingface": _hf_features(HF_IMAGES)})
    regions_schema = HF_REGIONS.with_metadata({b"huggingface": _hf_features(HF_REGIONS)})
    images = regions = 0
    for n, labelled in _shards(run, keep):  # one Parquet file of images and one of their regions a run shard
        if not labelled:
            continue
        image_rows, region_rows = [], []
        ids = [image["mlcseg_image_id"] for image, _ in labelled]
        status = read_table(run.status, columns=["image_id", "confidence"], filters=[("image_id", "in", ids)])
        confidence = dict(zip(*(status.column(c).to_pylist() for c in ("image_id", "confidence")), strict=True))
        for image, anns in labelled:
            image_id, uri = image["mlcseg_image_id"], image["file_name"]
            image_rows.append(
                {
                    "image_id": image_id,
                    "image": {"bytes": read_bytes(uri), "path": posixpath.basename(file_name(uri))},
                    "mask": {"bytes": run.class_mask(image_id).read_bytes(), "path": f"{image_id}.png"},
                    "width": image["width"],
                    "height": image["height"],
                    "confidence": confidence.get(image_id),
                }
            )
            region_rows += [
                {
                    "image_id": image_id,
                    "region": a.get("region"),
                    "class_id": a["category_id"],
                    "class_name": names.get(a["category_id"]),
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "score": a.get("score"),
                    "class_score": a.get("class_score"),
                }
                for a in anns
            ]
        if image_rows:  # always, here: a shard's file holds its images
            name = f"part-{n:05d}.parquet"
            atomic_write_table(dest / "data" / name, pa.Table.from_pylist(image_rows, schema=images_schema))
            atomic_write_table(dest / "regions" / name, pa.Table.from_pylist(region_rows, schema=regions_schema))
        images, regions = images + len(image_rows), regions + len(region_rows)
    atomic_write_text(dest / "README.md", _dataset_card(run, images, regions, classes))
    return images, regions


def _dataset_card(run: RunDir, images: int, regions: int, classes: list[dict]) -> str:
    rec = run.read_record()
    backbone = rec.get("backbone", {})
    warning = untrained_warning(backbone)
    config = run.config.read_text() if run.config.exists() else ""
    header = (
        "---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n"
        "- config_name: regions\n  data_files: regions/*.parquet\ntags:\n- image-segmentation\n- pseudo-labels\n---\n"
    )
    return (
        f"{header}\n# Pseudo-labels from mlcseg_ray\n\n"
        + (f"**{warning}**\n\n" if warning else "")
        + f"{images} images, {regions} regions, {len(classes)} classes (unsupervised clusters: "
        "`cluster_1` ... are ids, not names). `data/`: each image with its class mask (0 background, class c is "
        "pixel value c) and its confidence; `regions/`: each region's class, box (x, y, w, h), area and scores.\n\n"
        f"Backbone: `{backbone.get('backbone')}` ({backbone.get('weights')}).\n\n"
        f"The run's configuration:\n\n```yaml\n{config}```\n"
    )
