"""The manifest: one row per input image (``RUN/manifest.parquet``), written by ingest alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..core.config import Config
from ..core.run_dir import RunDir, id_problem, printable
from ..core.storage import as_location
from ..core.tables import atomic_write_tables, iter_batches, read_table, rows_between

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("shard", pa.int32()),
        ("coco_id", pa.int64()),
    ]
)

# The listing's columns: what a probing task is given for each image. ``error``: why an image cannot be used, known
# from its name alone (an id that cannot name an output file, a COCO file_name outside the image root): it becomes
# that image's error row, and its file is never read. An image found inside a tar or Parquet file comes probed
# (``status`` set: its bytes were in hand); the other columns are then the manifest's.
LISTING_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("coco_id", pa.int64()), ("error", pa.string())]
    + [MANIFEST_SCHEMA.field(name) for name in ("width", "height", "bytes", "mtime_ns", "content_hash", "status")]
)


def listing_row(image_id: str, uri: str, coco_id: int | None = None, error: str | None = None) -> dict:
    """A listing row. An id that cannot name an output file makes the image an error row (ids are never rewritten:
    the id a user gave is the one every table and message shows); text that cannot be stored as UTF-8 (a file name
    of undecodable bytes) is kept as escapes."""
    problem = error or id_problem(image_id)
    if problem:
        image_id, uri = printable(image_id), printable(uri)
    return {"image_id": image_id, "uri": uri, "coco_id": coco_id, "error": problem}


# Rows per row group: a shard's rows (what extract, refine and describe each read, and the executor checks on a
# rerun) come from the few groups whose statistics hold the shard, so that read stays ~5 ms at any size (a single
# group made it grow with the manifest: 16 ms at 32k images, 66 ms at 320k).
MANIFEST_GROUP_ROWS = 4096


def write_manifest(path: Path, table: pa.Table) -> None:
    write_manifest_tables(path, [table])


def write_manifest_tables(path: Path, tables: Iterable[pa.Table]) -> None:
    """A manifest from its parts in id order, a part at a time (the same bytes as ``write_manifest`` of them all)."""
    atomic_write_tables(path, MANIFEST_SCHEMA, (t.cast(MANIFEST_SCHEMA) for t in tables), MANIFEST_GROUP_ROWS)


def manifest_rows_between(path: Path, first_id: str, last_id: str) -> pa.Table:
    """The manifest's rows with ``first_id <= image_id <= last_id`` (from the row groups that can hold them)."""
    return rows_between(path, "image_id", first_id, last_id)


def last_shard(path: str | Path | None) -> int:
    """The highest shard number of a manifest (-1 for none): where a rerun's new images start their shards."""
    if path is None:
        return -1
    highest = pc.max(read_table(path, columns=["shard"]).column("shard")).as_py()
    return -1 if highest is None else int(highest)


def read_manifest(path: Path) -> pa.Table:
    if not as_location(path).exists():
        raise FileNotFoundError(f"{path} not found: run ingest/extract first")
    return read_table(path)


def manifest_fingerprint(path: Path) -> str:
    """A hash of the manifest's content: the identity of the data every later stage works on. It is
    ``digest(table.to_pydict())`` of the manifest's columns, computed a column and a batch at a time (the same
    JSON text fed to the hash in pieces), so a manifest of any size is never in memory as Python objects."""
    if not as_location(path).exists():
        raise FileNotFoundError(f"{path} not found: run ingest/extract first")
    h = hashlib.sha256(b"{")
    for n, column in enumerate(sorted(MANIFEST_SCHEMA.names)):
        h.update(f"{', ' if n else ''}{json.dumps(column)}: [".encode())
        first = True
        for batch in iter_batches(path, columns=[column]):
            if batch.num_rows:
                h.update(((", " if not first else "") + json.dumps(batch.column(0).to_pylist())[1:-1]).encode())
                first = False
        h.update(b"]")
    h.update(b"}")
    return h.hexdigest()[:16]


def expected_file(row: dict, cfg: Config) -> dict:
    """What a stage checks an image against before it reads it again (``formats.images.load_rgb(expect=...)``)."""
    return {
        "bytes": row.get("bytes"),
        "mtime_ns": row.get("mtime_ns"),
        "content_hash": row.get("content_hash") if cfg.verify_images == "hash" else None,
    }


def expected_files(run: RunDir, shard: int, cfg: Config) -> dict[str, dict]:
    """Per image of a shard, what its file must still be (from the manifest; none for a brought-in store)."""
    if not run.manifest.exists():
        return {}
    return {r["image_id"]: expected_file(r, cfg) for r in run.manifest_rows(shard)}
