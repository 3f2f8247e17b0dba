"""``--webdataset`` and ``--parquet``: the containers an input names, each indexed by one task into listing rows.

A container is read once, from start to end (one GET of a tar or Parquet file in a bucket), and each image in it is
probed on the way, as ingest probes a loose file's header: its size, orientation and pixel count. Its index (the
listing rows and the files skipped) is kept in the run folder (``RUN/input_index/``) with the container's size and
modification time, so a rerun reads again only the containers that changed (one ``stat`` for each of the others).
Keys are unique over the whole input: where two images share one, the first (in container, then member order)
keeps it and the others become error rows that say so.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from braceexpand import braceexpand

from ..core import storage
from ..core.errors import BadImage
from ..core.fanout import serial_map
from ..core.fingerprint import digest
from ..core.inputs import InputSpec
from ..core.stage import MapFn
from ..core.storage import as_location, is_remote
from ..core.tables import atomic_write_table, read_table
from ..formats.images import IMAGE_EXTENSIONS, content_hash, file_stat, list_folder, probe
from ..formats.manifest import LISTING_SCHEMA, listing_row
from ..formats.packed import (
    PARQUET_SUFFIX,
    TAR_SUFFIXES,
    DamagedContainer,
    Entry,
    parquet_entries,
    tar_entries,
)

log = logging.getLogger("mlcseg_ray")

INDEX_VERSION = 1  # the index files' layout; another version is read again from the container
CONTAINERS_PER_TASK = 4  # SA-1B's 1,000 tars: 250 tasks
SKIPPED_LISTED = 1000  # skipped files named in the run record (all are counted)
IMAGE_FIELDS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}  # a sample's image: the member whose field is one


@dataclass(frozen=True)
class IndexSettings:
    """What an index depends on besides its container: the header checks, the hash, the Parquet columns."""

    max_pixels: int
    min_side: int
    rehash: bool = False
    image_column: str | None = None
    id_column: str | None = None
    folder: str | None = None  # where indexes are kept (the run folder's input_index); None: not kept


def container_uris(spec: InputSpec) -> list[str]:
    """The containers ``--webdataset`` / ``--parquet`` names: a folder or prefix (its containers, recursive), a
    brace pattern (``sa_{000000..000999}.tar``), a list file (``.txt``, one per line, relative to its folder) or
    one container; sorted, so the listing does not depend on how it was given."""
    given = spec.webdataset or spec.parquet
    suffixes = TAR_SUFFIXES if spec.webdataset else (PARQUET_SUFFIX,)
    flag = "--webdataset" if spec.webdataset else "--parquet"
    if "{" in given:
        found = list(braceexpand(given))
    elif given.endswith(".txt"):
        where = as_location(given)
        lines = [ln.strip() for ln in where.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        found = [ln if "://" in ln or ln.startswith("/") else str(where.parent / ln) for ln in lines]
    elif given.endswith(suffixes):
        found = [given]
    else:
        found = [uri for rel, uri in list_folder(given) if rel.name.endswith(suffixes)]
    if not found:
        raise FileNotFoundError(f"{flag} {given}: no {' or '.join(suffixes)} files found")
    return sorted(set(found))


def list_containers(spec: InputSpec, settings: IndexSettings, map_fn: MapFn = serial_map) -> tuple[pa.Table, dict]:
    """The listing of every image in the input's containers (probed, sorted by id, duplicate keys made error rows)
    and the skipped files, merged from one task per few containers."""
    uris = container_uris(spec)
    log.info("ingest: %d container(s) to index", len(uris))
    groups = [uris[i : i + CONTAINERS_PER_TASK] for i in range(0, len(uris), CONTAINERS_PER_TASK)]
    parts = map_fn(_index_group, groups, spec.webdataset is not None, settings)
    table = pa.concat_tables([_listing_of(t) for tables, _, _ in parts for t in tables])
    skipped = merge_skipped([s for _, s, _ in parts])
    read = sum(n for _, _, n in parts)
    del parts  # the concatenated table holds the parts; sorting copies it once
    log.info(
        "ingest: %d of %d container(s) read; %d unchanged, their kept index used", read, len(uris), len(uris) - read
    )
    return _unique_keys(table), skipped


def merge_skipped(parts: list[dict]) -> dict:
    """The skipped files of many listing parts as one: counts by extension, the first names, and the
    containers that could not be read to their end."""
    by_ext: Counter = Counter()
    for p in parts:
        by_ext.update(p["by_extension"])
    return {
        "count": sum(p["count"] for p in parts),
        "by_extension": dict(sorted(by_ext.items())),
        "files": sorted(f for p in parts for f in p["files"])[:SKIPPED_LISTED],
        "damaged": sorted(d for p in parts for d in p.get("damaged", [])),
    }


def _index_group(uris: list[str], tars: bool, settings: IndexSettings) -> tuple[list[pa.Table | str], dict, int]:
    """Some containers' listing rows and skipped files, and how many of them were read (not found indexed). Where
    the kept index is on local disk its path is sent back, not its rows: the driver reads it from there, where a
    table sent back would also stay mapped in the driver from Ray's object store (a second copy of the listing:
    43 MB of shared memory at 320k images, measured)."""
    indexed = [_index(uri, tars, settings) for uri in uris]
    local = settings.folder is not None and not is_remote(settings.folder)
    tables = [kept if local and kept else t for t, _, _, kept in indexed]
    return tables, merge_skipped([s for _, s, _, _ in indexed]), sum(read for _, _, read, _ in indexed)


def _listing_of(table: pa.Table | str) -> pa.Table:
    return read_table(table).replace_schema_metadata(None) if isinstance(table, str) else table


def _index(uri: str, tars: bool, settings: IndexSettings) -> tuple[pa.Table, dict, bool, str | None]:
    """One container's listing rows and skipped files: from its kept index where the container did not change,
    else read from it (and the index kept); whether it was read, and the kept index's path (None: not kept)."""
    size, mtime = file_stat(uri)
    identity = {"uri": uri, "size": size, "mtime_ns": mtime, "version": INDEX_VERSION, **asdict(settings)}
    identity.pop("folder")
    kept = as_location(settings.folder) / f"{digest(uri)}.parquet" if settings.folder else None
    if kept is not None and kept.exists():
        try:
            table = read_table(kept)
            meta = json.loads(table.schema.metadata[b"mlcseg_index"])
            if meta["identity"] == identity:
                return table.replace_schema_metadata(None), meta["skipped"], False, str(kept)
        except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
            pass  # read again from the container
    rows, skipped = _read_container(uri, tars, settings, mtime if size is not None else None)
    table = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    if kept is not None and size is not None:
        meta = {b"mlcseg_index": json.dumps({"identity": identity, "skipped": skipped}).encode()}
        with storage.unrecorded():  # the manifest is ingest's output; the index is its cache
            atomic_write_table(kept, table.replace_schema_metadata(meta))
        return table, skipped, True, str(kept)
    return table, skipped, True, None


def _read_container(uri: str, tars: bool, settings: IndexSettings, mtime: int | None) -> tuple[list[dict], dict]:
    entries = (
        tar_entries(uri, IMAGE_FIELDS.__contains__)
        if tars
        else parquet_entries(uri, settings.image_column, settings.id_column)
    )
    rows, others, damaged = [], [], []
    try:
        for entry in entries:
            if entry.data is None and entry.error is None:
                others.append(entry)
            else:
                rows.append(_probed(entry, settings, mtime))
    except DamagedContainer as e:
        damaged.append(f"{uri}: {e}")
    by_field = Counter(f".{e.field}" if e.field else "(none)" for e in others)
    names = sorted(_where(e.uri) for e in others)[:SKIPPED_LISTED]
    return rows, {"count": len(others), "by_extension": dict(by_field), "files": names, "damaged": damaged}


def _probed(entry: Entry, settings: IndexSettings, mtime: int | None) -> dict:
    """A listing row probed from the bytes in hand (as ingest probes a loose file's header)."""
    row = listing_row(entry.key, entry.uri, error=entry.error)
    size = None if entry.data is None else len(entry.data)
    row.update(bytes=size, mtime_ns=mtime, width=None, height=None, content_hash=None, status="error")
    if row["error"]:
        return row
    try:
        w, h = probe(entry.uri, settings.max_pixels, settings.min_side, data=entry.data, whole=True)
    except BadImage as e:
        return {**row, "error": str(e)}
    digest_ = content_hash(entry.data) if settings.rehash else None
    return {**row, "width": w, "height": h, "content_hash": digest_, "status": "ok"}


def _unique_keys(table: pa.Table) -> pa.Table:
    """Sorted by id; where ids repeat, the first in input order keeps it and each other becomes an error row whose
    id names the repeat (``KEY (duplicate 2)``)."""
    table = table.append_column("order", pa.array(np.arange(table.num_rows)))
    table = table.sort_by([("image_id", "ascending"), ("order", "ascending")]).drop_columns(["order"])
    ids = table.column("image_id")
    if table.num_rows < 2 or not pc.any(pc.equal(ids.slice(1), ids.slice(0, table.num_rows - 1))).as_py():
        return table
    rows = table.to_pylist()  # only where keys repeat, which a well-formed input never does
    first = 0  # the first row of the current run of equal ids (never renamed)
    for n in range(1, len(rows)):
        key = rows[n]["image_id"]
        if key != rows[first]["image_id"]:
            first = n
            continue
        rows[n] = {
            **rows[n],
            "image_id": f"{key} (duplicate {n - first + 1})",
            "status": "error",
            "error": f"duplicate key {key!r}: {_where(rows[first]['uri'])} has it first; only the first is used",
        }
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA).sort_by("image_id")


def _where(uri: str) -> str:
    container, _, rest = uri.partition("#")
    return f"{posixpath.basename(container)}:{rest.split('/', 1)[-1]}"
