"""Any input (folder, VOC root, COCO, manifest; local or in a bucket) listed and probed into a run's manifest.

Every image found gets one row: a stable ``image_id``, its ``uri``, oriented width/height, size, modification time
and content hash, ``status`` ok/error with a reason, and its ``shard`` (numbered from the sorted manifest, so reruns
shard identically). Files whose size and modification time did not change keep their row without being read again.

The work fans out as tasks, so that neither its time nor the driver's memory grows with one process's share: an
image folder (or bucket prefix) is listed one task per subfolder, and the sorted listing probed one task per
``PROBE_CHUNK`` images, each writing its part of the manifest (``RUN/manifest_parts/``) with the previous
manifest's rows of its id range. The driver holds the listing as Arrow columns, merges the parts a part at a time
and numbers the new images' shards from the parts' counts; the manifest does not depend on how it was cut.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..core import storage
from ..core.config import Config
from ..core.errors import BadImage
from ..core.fanout import serial_map
from ..core.inputs import InputSpec
from ..core.run_dir import RunDir, id_problem, printable, shard_name
from ..core.stage import MapFn
from ..core.storage import (
    Location,
    anchored,
    as_location,
    atomic_replace,
    common_folder,
    is_local,
    is_remote,
    unrecorded,
)
from ..core.tables import read_table
from ..formats.datasets import find_voc_root
from ..formats.images import (
    HEADER_BYTES,
    IMAGE_EXTENSIONS,
    content_hash,
    file_stat,
    folder_top,
    list_folder,
    probe,
    read_bytes,
)
from ..formats.manifest import (
    LISTING_SCHEMA,
    MANIFEST_SCHEMA,
    last_shard,
    listing_row,
    manifest_fingerprint,
    manifest_rows_between,
    read_manifest,
    write_manifest,
    write_manifest_tables,
)
from .containers import SKIPPED_LISTED, IndexSettings, list_containers, merge_skipped

log = logging.getLogger("mlcseg_ray")


# URI schemes a manifest may use (read through fsspec): object stores; http(s) pages are not an image store
SUPPORTED_SCHEMES = {"file", "s3", "gs", "gcs"}


# Images per probing task: about 2 s of stat, read, hash and header check (0.5 ms an image) and a manifest part of
# a few hundred KB; the manifest does not depend on it.
PROBE_CHUNK = 4096
LIST_TASKS = 256  # at most this many listing tasks (ImageNet's 1,000 class folders: 4 a task)


@dataclass
class Listing:
    """The input's images (``LISTING_SCHEMA``, sorted by id, after ``--limit`` / ``--sample``) and the files left
    out of an image folder, not being images by their extension."""

    table: pa.Table
    skipped: dict = field(default_factory=lambda: {"count": 0, "by_extension": {}, "files": [], "damaged": []})


def list_images(spec: InputSpec, map_fn: MapFn = serial_map, indexing: IndexSettings | None = None) -> Listing:
    """The input's images, with stable, unique ids. An image folder is listed one task per subfolder (its top
    level on the driver), so a bucket's prefixes are listed in parallel and the driver holds Arrow columns only;
    tars and Parquet files are indexed one task per few containers (``indexing``: how their images are probed)."""
    spec.validate()
    skipped = Listing(LISTING_SCHEMA.empty_table()).skipped
    if spec.webdataset or spec.parquet:
        indexing = indexing or IndexSettings(max_pixels=Config.model_fields["max_pixels"].default, min_side=1)
        table, skipped = list_containers(spec, replace(indexing, **spec.columns()), map_fn)  # sorted by id
    elif spec.images:
        folders, top = folder_top(spec.images)
        per_task = max(1, -(-len(folders) // LIST_TASKS))  # many small subfolders share a task
        groups = [folders[i : i + per_task] for i in range(0, len(folders), per_task)]
        parts = [_folder_part(top), *map_fn(_list_subfolders, groups, spec.images)]
        table = pa.concat_tables([t for t, _ in parts])
        skipped = merge_skipped([s for _, s in parts])
    else:
        if spec.voc:
            rows = _voc_rows(as_location(spec.voc), spec.split)
        elif spec.coco:  # the image root and the annotation file may each be local or in a bucket
            rows = _coco_rows(as_location(spec.coco), as_location(spec.ann))
        else:
            rows = _manifest_rows(spec.manifest)
        table = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    if not (spec.webdataset or spec.parquet):  # a sort is a copy (the listing: 44 MB at 320k)
        table = table.sort_by("image_id")  # byte order of UTF-8: the order of Python's sorted()
    if spec.limit:
        table = table.slice(0, spec.limit)
    if spec.sample and spec.sample < table.num_rows:
        keep = np.sort(np.random.default_rng(spec.sample_seed).choice(table.num_rows, spec.sample, replace=False))
        table = table.take(keep)
    return Listing(table, skipped)


def image_root(spec: InputSpec, listing: pa.Table) -> str | None:
    """The folder the images are named under in the COCO file (detectron2's ``image_root``, Datumaro's base): the
    image folder or bucket prefix, the VOC ``JPEGImages``, the COCO image root, a manifest's common folder."""
    if spec.webdataset or spec.parquet:
        return None  # each file_name is its image's URI inside its container
    if spec.images or spec.coco:
        return str(anchored(spec.images or spec.coco))
    if spec.voc:
        return str(find_voc_root(anchored(spec.voc)) / "JPEGImages")
    return common_folder(listing.column("uri").to_pylist())


def list_inputs(spec: InputSpec) -> list[dict]:
    """Rows of (image_id, uri, coco_id) for the input, sorted by id, after ``--limit`` / ``--sample``."""
    return list_images(spec).table.to_pylist()


def _list_subfolders(folders: list[str], root: str) -> tuple[pa.Table, dict]:
    return _folder_part([f for folder in folders for f in list_folder(root, below=folder)])


def _folder_part(files: list) -> tuple[pa.Table, dict]:
    """A part of a folder's listing as the listing's rows and its skipped files (ids are unique within a part: two
    files that differ only by extension sit in one folder)."""
    images = [(rel, uri) for rel, uri in files if rel.suffix.lower() in IMAGE_EXTENSIONS]
    rows = _ids_from_paths([Path(rel) for rel, _ in images], [uri for _, uri in images])
    others = [str(rel) for rel, _ in files if rel.suffix.lower() not in IMAGE_EXTENSIONS]
    by_ext = Counter(PurePosixPath(p).suffix.lower() or "(none)" for p in others)
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), {
        "count": len(others),
        "by_extension": dict(by_ext),
        "files": sorted(others)[:SKIPPED_LISTED],
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
        rows.append(listing_row(image_id, uri))
    return rows


def _voc_rows(root: Location, split: str) -> list[dict]:
    voc = find_voc_root(root)
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"--voc: split file not found: {split_file}")
    ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    return [listing_row(i, str(voc / "JPEGImages" / f"{i}.jpg")) for i in ids]


def _coco_rows(images: Location, ann: Location) -> list[dict]:
    if not ann.is_file():
        raise FileNotFoundError(f"--ann: no such file: {ann}")
    try:
        data = json.loads(ann.read_text())
        listed = [(str(im["file_name"]), int(im["id"])) for im in data.get("images", [])]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"--ann {ann}: not a COCO instances file ({type(e).__name__}: {e})") from None
    rows = []
    for file_name, coco_id in listed:
        image_id = posixpath.splitext(file_name)[0]
        # a file_name is a path under the image root: one that leads out of it (absolute, '..') is never read
        if id_problem(image_id):
            why = f"the COCO file_name {printable(file_name)!r} is not a path under the image root"
            rows.append(listing_row(image_id, f"{str(images).rstrip('/')}/{file_name}", coco_id, why))
        else:
            rows.append(listing_row(image_id, str(images / file_name), coco_id))
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
        return [listing_row(i, u) for i, u in zip(ids, uris, strict=True)]
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
        if row.get("status"):  # probed where it was found (inside a tar or Parquet file)
            return row
        if row.get("error"):  # known bad from its name: never read
            return {**row, "width": None, "height": None, "bytes": None, "mtime_ns": None, "content_hash": None,
                    "status": "error"}  # fmt: skip
        size, mtime = file_stat(row["uri"])
        old = previous.get(row["uri"])
        if old and not rehash and size is not None and (old["bytes"], old["mtime_ns"]) == (size, mtime):
            return {
                **row,
                **{k: old[k] for k in ("width", "height", "bytes", "mtime_ns", "content_hash", "status", "error")},
            }
        out = {**row, "width": None, "height": None, "bytes": size, "mtime_ns": mtime, "content_hash": None}
        try:
            whole = rehash or size is None or size <= HEADER_BYTES
            if whole:  # verify_images=hash: the content's hash, so the whole file
                data = read_bytes(row["uri"])
                out["bytes"], out["content_hash"] = len(data), content_hash(data) if rehash else None
            else:  # the header alone: extraction reads the image, and this is the only other read of it
                data = read_bytes(row["uri"], first=HEADER_BYTES)
            w, h = probe(row["uri"], max_pixels, min_side, data=data, whole=whole)
            return {**out, "width": w, "height": h, "status": "ok", "error": None}
        except BadImage as e:
            return {**out, "status": "error", "error": str(e)}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, rows))


@dataclass(frozen=True)
class ProbeSettings:
    """What every probing task needs: the header checks' limits, and the previous manifest (its rows kept for files
    whose size and mtime did not change; with ``keep_shards``, its images keep their shards)."""

    max_pixels: int
    min_side: int
    rehash: bool = False
    previous: str | None = None
    keep_shards: bool = False
    chunk: int = PROBE_CHUNK


def build_manifest(
    spec: InputSpec, run: RunDir, shard_size: int, settings: ProbeSettings, map_fn: MapFn = serial_map
) -> dict:
    """``run.manifest`` for ``spec``'s images: listed, then probed by tasks of ``settings.chunk`` images that each
    write a sorted part; the parts merged in id order, a part at a time, with the new images' shards numbered from
    the parts' counts. A manifest equal to the previous one keeps its file (and its mtime). With ``keep_shards``,
    every image of the previous manifest stays in its shard (so its features are kept) and new images fill new
    shards after the last one; otherwise shards are numbered from 0 in id order. Returns the counts, whether the
    manifest changed, the skipped files and the manifest's fingerprint."""
    indexing = IndexSettings(settings.max_pixels, settings.min_side, settings.rehash, folder=str(run.input_index))
    listing = list_images(spec, map_fn, indexing)
    if not listing.table.num_rows:
        raise FileNotFoundError(f"no images found in {spec.describe()}")
    storage.remove(run.manifest_parts)  # a crashed ingest's parts
    n_parts = -(-listing.table.num_rows // settings.chunk)
    log.info("ingest: %d images, probed in %d task(s)", listing.table.num_rows, n_parts)
    # each task is sent its own slice: the driver never puts the whole listing in the object store at once
    parts = [(n, listing.table.slice(n * settings.chunk, settings.chunk)) for n in range(n_parts)]
    counts = map_fn(_probe_part, parts, settings, str(run.manifest_parts))
    start = last_shard(settings.previous) + 1 if settings.keep_shards else 0
    merged = run.manifest_parts / "manifest.parquet"
    with unrecorded():  # the manifest is the output, once in its place
        write_manifest_tables(merged, _numbered_parts(run, counts, start, shard_size))
    fingerprint = manifest_fingerprint(merged)
    changed = settings.previous is None or _fingerprint_or_none(run.manifest) != fingerprint
    if changed:
        atomic_replace(merged, run.manifest)
    storage.remove(run.manifest_parts)
    return {
        "images": listing.table.num_rows,
        "errors": sum(c["errors"] for c in counts),
        "changed": changed,
        "skipped": listing.skipped,
        "fingerprint": fingerprint,
        "image_root": image_root(spec, listing.table),
    }


def _probe_part(part: tuple[int, pa.Table], settings: ProbeSettings, parts: str) -> dict:
    """Part ``n`` of the manifest (``part``: n and its listing rows): its images probed (the previous manifest's
    rows of its id range reused), each with its known shard or none yet, written to ``parts``; returns its
    counts."""
    n, rows = part[0], part[1].to_pylist()
    previous = _previous_rows(settings.previous, rows[0]["image_id"], rows[-1]["image_id"])
    probed = probe_rows(rows, settings.max_pixels, settings.min_side, {r["uri"]: r for r in previous}, settings.rehash)
    known = {r["image_id"]: r["shard"] for r in previous} if settings.keep_shards else {}
    for r in probed:
        r["shard"] = known.get(r["image_id"])
    with unrecorded():
        write_manifest(as_location(parts) / shard_name(n, "part"), pa.Table.from_pylist(probed, schema=MANIFEST_SCHEMA))
    return {
        "images": len(probed),
        "new": sum(r["shard"] is None for r in probed),
        "errors": sum(r["status"] != "ok" for r in probed),
    }


def _numbered_parts(run: RunDir, counts: list[dict], start: int, shard_size: int) -> Iterator[pa.Table]:
    """The parts in id order, each new image given its shard: in id order, ``shard_size`` a shard from ``start``."""
    new_before = 0
    for n, count in enumerate(counts):
        part = read_manifest(run.manifest_parts / shard_name(n, "part"))
        shard = part.column("shard")
        new = pc.is_null(shard).to_numpy(zero_copy_only=False)
        order = new_before + np.cumsum(new) - 1  # each new image's place among all the new ones
        numbered = np.where(new, start + order // shard_size, shard.fill_null(0).to_numpy())
        yield part.set_column(part.schema.get_field_index("shard"), "shard", pa.array(numbered, pa.int32()))
        new_before += count["new"]


def _previous_rows(previous: str | None, first_id: str, last_id: str) -> list[dict]:
    """The previous manifest's rows of an id range; none where there is none or it cannot be read (those files are
    probed again)."""
    if previous is None:
        return []
    try:
        return manifest_rows_between(as_location(previous), first_id, last_id).to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("ingest: previous manifest unreadable (%s); probing those files again", e)
        return []


def _fingerprint_or_none(path: Location) -> str | None:
    try:
        return manifest_fingerprint(path)
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
