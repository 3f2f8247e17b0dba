"""Stage ``ingest``: any input (folder, VOC root, COCO, manifest) -> ``RUN/manifest.parquet``.

Every image found gets one row: a stable ``image_id``, its ``uri``, oriented width/height, size, modification time
and content hash, ``status`` ok/error with a reason, and its ``shard`` (numbered from the sorted manifest, so reruns
shard identically). Ingest runs on every ``mlcseg run``: files whose size and modification time did not change keep
their row without being read again, so a rerun notices a changed image (the manifest, and so every fingerprint,
changes) at the cost of a ``stat`` per file. The manifest is written by ingest alone; what later stages find out
about an image goes to ``status.parquet``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..core.errors import BadImage
from ..core.inputs import InputSpec
from ..core.stage import MapFn, Stage, StageContext
from ..core.storage import Location, as_location, is_local, is_remote, read_table
from ..core.store import RunDir
from ..formats.datasets import find_voc_root
from ..formats.images import (
    IMAGE_EXTENSIONS,
    content_hash,
    file_stat,
    list_folder,
    probe,
    read_bytes,
)
from ..formats.manifest import MANIFEST_SCHEMA, manifest_fingerprint, read_manifest, write_manifest
from ..models.backbones import available_backbones, patch_size_of

log = logging.getLogger("mlcseg_ray")


# URI schemes a manifest may use (read through fsspec): object stores; http(s) pages are not an image store
SUPPORTED_SCHEMES = {"file", "s3", "gs", "gcs"}


def list_inputs(spec: InputSpec) -> list[dict]:
    """Rows of (image_id, uri, coco_id) for the input, sorted by id, after ``--limit`` / ``--sample``; image ids
    unique and stable."""
    spec.validate()
    if spec.images:
        files = [(rel, uri) for rel, uri in list_folder(spec.images) if rel.suffix.lower() in IMAGE_EXTENSIONS]
        rows = _ids_from_paths([Path(rel) for rel, _ in files], [uri for _, uri in files])
    elif spec.voc:
        rows = _voc_rows(as_location(spec.voc), spec.split)
    elif spec.coco:  # the image root and the annotation file may each be local or in a bucket
        rows = _coco_rows(as_location(spec.coco), as_location(spec.ann))
    else:
        rows = _manifest_rows(spec.manifest)
    rows = sorted(rows, key=lambda r: r["image_id"])
    if spec.limit:
        rows = rows[: spec.limit]
    if spec.sample and spec.sample < len(rows):
        keep = np.sort(np.random.default_rng(spec.sample_seed).choice(len(rows), spec.sample, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def skipped_files(spec: InputSpec, limit: int = 1000) -> dict:
    """Files of an image folder that ingest leaves out, not being images by their extension: counted by extension
    and listed (the first ``limit``)."""
    if not spec.images:
        return {"count": 0, "by_extension": {}, "files": []}
    found = [rel for rel, _ in list_folder(spec.images) if rel.suffix.lower() not in IMAGE_EXTENSIONS]
    by_ext: dict[str, int] = {}
    for p in found:
        by_ext[p.suffix.lower() or "(none)"] = by_ext.get(p.suffix.lower() or "(none)", 0) + 1
    return {
        "count": len(found),
        "by_extension": dict(sorted(by_ext.items())),
        "files": [str(p) for p in found[:limit]],
    }


def _ids_from_paths(rel_paths: list[Path], uris: list[str]) -> list[dict]:
    # The id is the relative path without its extension ("a/cat"), so the same file name in two folders stays two
    # images; where two files differ only by extension the extension is kept in the id ("a/cat_png").
    stems = [p.with_suffix("").as_posix() for p in rel_paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    rows = []
    for p, s, uri in zip(rel_paths, stems, uris, strict=True):
        image_id = s if counts[s] == 1 else f"{s}_{p.suffix.lstrip('.').lower()}"
        rows.append({"image_id": image_id, "uri": uri, "coco_id": None})
    return rows


def _voc_rows(root: Location, split: str) -> list[dict]:
    voc = find_voc_root(root)
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"--voc: split file not found: {split_file}")
    ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    return [{"image_id": i, "uri": str(voc / "JPEGImages" / f"{i}.jpg"), "coco_id": None} for i in ids]


def _coco_rows(images: Location, ann: Location) -> list[dict]:
    if not ann.is_file():
        raise FileNotFoundError(f"--ann: no such file: {ann}")
    data = json.loads(ann.read_text())
    rows = []
    for im in data.get("images", []):
        rel = Path(im["file_name"])
        rows.append({"image_id": rel.with_suffix("").as_posix(), "uri": str(images / rel), "coco_id": int(im["id"])})
    return rows


def _manifest_rows(path: str) -> list[dict]:
    where = as_location(path)  # a local file or an object
    if str(path).endswith(".parquet"):
        table = read_table(where)
    else:
        with where.open("rb") as f:
            table = pacsv.read_csv(f)
    if "uri" not in table.column_names:
        raise ValueError(f"--manifest {path}: needs a 'uri' column (has {table.column_names})")
    # a relative path is relative to the manifest's folder, not to wherever the command runs
    here = where.resolve().parent if is_local(where) else where.parent
    uris = [
        u if "://" in u or Path(u).is_absolute() else str(here / u) for u in map(str, table.column("uri").to_pylist())
    ]
    unsupported = sorted({u.split("://", 1)[0] for u in uris if "://" in u} - SUPPORTED_SCHEMES)
    if unsupported:
        raise ValueError(
            f"--manifest {path}: URIs of scheme {', '.join(unsupported)} are not read; use local "
            f"paths or {', '.join(sorted(SUPPORTED_SCHEMES))}"
        )
    if "image_id" in table.column_names:
        ids = [str(i) for i in table.column("image_id").to_pylist()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"--manifest {path}: image_id values are not unique")
        return [{"image_id": i, "uri": u, "coco_id": None} for i, u in zip(ids, uris, strict=True)]
    # Ids from the URIs' paths below their longest common folder.
    paths = [u.split("://", 1)[-1] if is_remote(u) else str(Path(u).resolve()) for u in uris]
    common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0]) if paths else ""
    rel = [Path(posixpath.relpath(p, common)) for p in paths]
    return _ids_from_paths(rel, uris)


def probe_rows(
    rows: list[dict],
    max_pixels: int,
    min_side: int,
    previous: dict[str, dict] | None = None,
    rehash: bool = False,
    threads: int = 16,
) -> list[dict]:
    """Size, modification time, content hash and a header-only check (size, orientation, bomb guard) of every image.
    A file whose size and mtime match its row in ``previous`` keeps that row unread (unless ``rehash``). Decoding
    errors show up at extraction."""
    previous = previous or {}

    def one(row: dict) -> dict:
        size, mtime = file_stat(row["uri"])
        old = previous.get(row["uri"])
        if old and not rehash and size is not None and (old["bytes"], old["mtime_ns"]) == (size, mtime):
            return {
                **row,
                **{k: old[k] for k in ("width", "height", "bytes", "mtime_ns", "content_hash", "status", "error")},
            }
        out = {**row, "width": None, "height": None, "bytes": size, "mtime_ns": mtime, "content_hash": None}
        try:
            data = read_bytes(row["uri"])
            out["bytes"], out["content_hash"] = len(data), content_hash(data)
            w, h = probe(row["uri"], max_pixels, min_side, data=data)
            return {**out, "width": w, "height": h, "status": "ok", "error": None}
        except BadImage as e:
            return {**out, "status": "error", "error": str(e)}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, rows))


def build_manifest(
    spec: InputSpec,
    shard_size: int,
    max_pixels: int,
    min_side: int,
    previous: pa.Table | None = None,
    rehash: bool = False,
    keep_shards: bool = False,
) -> pa.Table:
    """The manifest of ``spec``'s images. With ``keep_shards``, every image of ``previous`` stays in its shard (so
    its features are kept) and new images fill new shards after the last one."""
    rows = list_inputs(spec)
    if not rows:
        raise FileNotFoundError(f"no images found in {spec.describe()}")
    prev = (
        {r["uri"]: r for r in previous.to_pylist()}
        if previous is not None and "bytes" in previous.column_names
        else None
    )
    rows = sorted(probe_rows(rows, max_pixels, min_side, prev, rehash), key=lambda r: r["image_id"])
    known = {}
    if keep_shards and previous is not None and "shard" in previous.column_names:
        known = dict(zip(previous.column("image_id").to_pylist(), previous.column("shard").to_pylist(), strict=True))
    assign_shards(rows, shard_size, known)
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def assign_shards(rows: list[dict], shard_size: int, known: dict[str, int]) -> None:
    """Each row's ``shard``: a known image keeps its shard; the others, in id order, fill new shards of
    ``shard_size`` after the last known one (all of them, numbered from 0, on a first ingest)."""
    new = [r for r in rows if r["image_id"] not in known]
    for r in rows:
        if r["image_id"] in known:
            r["shard"] = known[r["image_id"]]
    start = max(known.values()) + 1 if known else 0
    for i, r in enumerate(new):
        r["shard"] = start + i // shard_size


def _readable_manifest(run: RunDir) -> pa.Table | None:
    """The previous manifest, or None where there is none or it is damaged (it is rebuilt: every file is read)."""
    if not run.manifest.exists():
        return None
    try:
        return read_manifest(run.manifest)
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("ingest: %s is damaged (%s); rebuilding it from the input", run.manifest, e)
        return None


class IngestStage(Stage):
    """The source of a run: lists and checks the input, every time (cheap for unchanged files)."""

    name = "ingest"
    reads = ("run_record",)  # the inputs a rerun without any was made with
    writes = ("manifest",)
    config_keys = ("shard_size", "max_pixels", "backbone", "verify_images")
    source = True

    def output_fingerprint(self, ctx: StageContext) -> str:
        return manifest_fingerprint(ctx.run.manifest) if ctx.run.manifest.exists() else "absent"

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        run, cfg = ctx.run, ctx.cfg
        spec = ctx.inputs.spec()
        recorded = run.read_record().get("inputs")
        if not ctx.inputs.given():
            if not recorded:
                raise ValueError(
                    f"{run.root} holds no run yet: give the images with --images, --voc, --coco or --manifest"
                )
            spec = InputSpec(**recorded)  # a rerun from the run folder alone: the inputs it was made with
        elif recorded and InputSpec(**recorded).describe() != spec.describe():
            raise ValueError(
                f"{run.root} already holds a run over {InputSpec(**recorded).describe()!r}; use a new "
                f"--out for {spec.describe()!r}"
            )
        if cfg.backbone not in available_backbones():
            raise ValueError(f"unknown backbone {cfg.backbone!r}; available: {', '.join(available_backbones())}")
        previous = _readable_manifest(run)
        # images keep their shards while shard_size stays (a new shard_size cuts every image afresh)
        same_cut = run.read_record().get("stages", {}).get("ingest", {}).get("shard_size") == cfg.shard_size
        table = build_manifest(
            spec,
            cfg.shard_size,
            cfg.max_pixels,
            min_side=patch_size_of(cfg.backbone),
            previous=previous,
            rehash=cfg.verify_images == "hash",
            keep_shards=same_cut,
        )
        unchanged = (
            previous is not None
            and set(MANIFEST_SCHEMA.names) <= set(previous.column_names)
            and previous.select(MANIFEST_SCHEMA.names).equals(table)
        )
        if not unchanged:  # an untouched manifest keeps its file (and its mtime)
            write_manifest(run.manifest, table)
        skipped = skipped_files(spec)
        if skipped["count"]:
            log.warning(
                "ingest: %d file(s) skipped, not images by their extension (%s); `mlcseg errors %s` lists them",
                skipped["count"],
                ", ".join(f"{k} {v}" for k, v in skipped["by_extension"].items()),
                run.root,
            )
        run.update_record(inputs=asdict(spec), input=spec.describe(), skipped_files=skipped)
        return {
            "images": table.num_rows,
            "errors": table.num_rows - pc.sum(pc.equal(table.column("status"), "ok")).as_py(),
            "shard_size": cfg.shard_size,
            "output": str(run.manifest),
        }
