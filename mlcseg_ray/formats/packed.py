"""Images inside other files: WebDataset tar shards and Parquet files with an image column.

Such an image has a URI of its own, ``CONTAINER#WHERE/NAME``, that every stage reads like any other image's:

- a tar member, ``s3://b/sa_000001.tar#1536+20480/sa_1.jpg``: the offset and size of its data in the tar (in the
  decompressed stream of a gzipped tar), then its member name. A plain tar's member is one ranged read that starts
  at the member's own 512-byte header, which must still give its size (a tar rewritten since ingest fails as
  changed). A gzipped tar cannot be entered in the middle: each process keeps its stream open and reads it forward
  (a shard's members lie next to each other), opening it again only to go back.
- a Parquet row, ``hub/train-00000.parquet#image:17/000017.jpg``: the image column and the row number, then the
  row's file name (the Hub struct's ``path``, else its id). The row group holding it is read once and kept for the
  rows after it.

Indexing a container (ingest, one task per container) reads it once from start to end: one GET per tar or file.
"""

from __future__ import annotations

import bisect
import gzip
import os
import posixpath
import re
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.errors import BadImage
from ..core.storage import as_location, get_range, is_local

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIX = ".parquet"
# image columns and id columns looked for, in this order, where the user names none
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
ID_COLUMNS = ("image_id", "id", "__key__", "key")

_PACKED = re.compile(r"^(?P<container>.+?(?:\.tar|\.tar\.gz|\.tgz|\.parquet))#(?P<where>[^/]*)/(?P<name>.*)$", re.S)
_BLOCK = tarfile.BLOCKSIZE
STREAM_BLOCK = 64 << 20  # a container read from start to end: one GET per 64 MB in a bucket
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class DamagedContainer(Exception):
    """A container that cannot be read to its end: what was read before stays."""


@dataclass(frozen=True)
class Packed:
    """Where an image lies inside a container."""

    container: str
    where: str  # "OFFSET+SIZE" in a tar, "COLUMN:ROW" in a Parquet file
    name: str  # the member's name, or the row's file name

    @property
    def in_tar(self) -> bool:
        return not self.container.endswith(PARQUET_SUFFIX)


def packed(uri: str) -> Packed | None:
    """Where ``uri`` lies inside a tar or Parquet file, or None for a file of its own."""
    m = _PACKED.match(uri)
    return Packed(**m.groupdict()) if m else None


def member_uri(tar: str, offset: int, size: int, name: str) -> str:
    return f"{tar}#{offset}+{size}/{name}"


def row_uri(file: str, column: str, row: int, name: str) -> str:
    return f"{file}#{column}:{row}/{name}"


def file_name(uri: str) -> str:
    """The name an image goes by: a member's or a row's name inside a container, else the URI itself."""
    inside = packed(uri)
    return inside.name if inside else uri


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into the sample key and the field: ``a/0001.seg.png`` is sample
    ``a/0001``, field ``seg.png`` (everything after the first dot of the file's name)."""
    folder, base = posixpath.split(name)
    stem, dot, field = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, field.lower() if dot else ""


# ------------------------------------------------------------------------------------------------ reading
def read_packed(inside: Packed, first: int | None = None) -> bytes:
    """An image's bytes from its container (its ``first`` bytes alone, where asked)."""
    try:
        if inside.in_tar:
            offset, size = (int(v) for v in inside.where.split("+"))
            want = size if first is None else min(size, first)
            if inside.container.endswith(".tar"):
                block = get_range(inside.container, offset - _BLOCK, offset + want)
            else:
                block = _opened(inside.container, _ForwardGzip).read(offset - _BLOCK, _BLOCK + want)
            return _member_data(block, size, want)
        column, row = inside.where.rsplit(":", 1)
        data = _opened(inside.container, _ParquetRows).row(column, int(row))
        if data is None:
            raise BadImage("the row's image bytes are null")
        return data if first is None else data[:first]
    except FileNotFoundError:
        raise BadImage(f"container not found: {inside.container}") from None
    except (ValueError, IndexError, KeyError, pa.ArrowException) as e:
        raise BadImage(f"changed since ingest: {inside.container} no longer holds this image ({e}); rerun") from None
    except _READ_ERRORS as e:
        raise BadImage(f"cannot read {inside.container}: {e}") from None


def _member_data(block: bytes, size: int, want: int) -> bytes:
    """The member's data after its header, once the header says the member is still the one indexed."""
    try:
        header = tarfile.TarInfo.frombuf(block[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        header = None
    if header is None or header.size != size:
        raise BadImage("changed since ingest: the tar no longer holds this member at its offset; rerun to recompute")
    data = block[_BLOCK:]
    if len(data) < want:
        raise BadImage("truncated tar: the member's data ends early")
    return data


class _ForwardGzip:
    """A gzipped tar's decompressed stream, read forward, with the last ``WINDOW`` bytes kept: the decode threads
    ask for a shard's members a little out of order, and going further back opens the stream again."""

    WINDOW = 64 << 20

    def __init__(self, uri: str) -> None:
        self.uri, self.raw, self.stream = uri, None, None
        self.kept, self.kept_from = bytearray(), 0  # the stream's bytes [kept_from, kept_from + len(kept))

    def read(self, start: int, size: int) -> bytes:
        if self.stream is None or start < self.kept_from:
            self.close()
            self.raw = _stream(self.uri)
            self.stream = gzip.GzipFile(fileobj=self.raw)
        if start > self.kept_from + len(self.kept):  # skip ahead without keeping what lies between
            self.stream.seek(start)
            self.kept, self.kept_from = bytearray(), start
        end = self.kept_from + len(self.kept)
        if start + size > end:
            self.kept += self.stream.read(start + size - end)
        data = bytes(self.kept[start - self.kept_from : start - self.kept_from + size])
        if len(self.kept) > self.WINDOW:
            drop = len(self.kept) - self.WINDOW
            del self.kept[:drop]
            self.kept_from += drop
        return data

    def close(self) -> None:
        for f in (self.stream, self.raw):
            if f is not None:
                f.close()
        self.raw = self.stream = None
        self.kept, self.kept_from = bytearray(), 0


def _stream(uri: str) -> Any:
    where = as_location(uri)
    return where.open("rb") if is_local(where) else where.open("rb", block_size=STREAM_BLOCK)


class _ParquetRows:
    """A Parquet file's rows, a row group at a time: the group last read is kept for the rows after it."""

    def __init__(self, uri: str) -> None:
        self.raw = None if is_local(as_location(uri)) else as_location(uri).open("rb")
        self.file = pq.ParquetFile(self.raw or uri)
        counts = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = [sum(counts[:i]) for i in range(len(counts))]
        self.kept: tuple[tuple[str, int], list] | None = None

    def row(self, column: str, row: int) -> bytes | None:
        group = bisect.bisect_right(self.starts, row) - 1
        if self.kept is None or self.kept[0] != (column, group):
            images = self.file.read_row_group(group, columns=[column]).column(0)
            self.kept = ((column, group), image_bytes(images).to_pylist())
        return self.kept[1][row - self.starts[group]]

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()


_OPEN: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
_OPEN_LOCK = threading.Lock()
_KEEP_OPEN = 4  # containers a process keeps open (a shard spans one or two)


class _Locked:
    """A container's reader used by one thread at a time (the decode threads read side by side)."""

    def __init__(self, reader: Any, lock: threading.Lock) -> None:
        self.reader, self.lock = reader, lock

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.reader, name)

        def locked(*args: Any) -> Any:
            with self.lock:
                return method(*args)

        return locked


def _opened(uri: str, kind: type) -> _Locked:
    """The container's reader kept in this process: a local file by its size and mtime too (a long-lived process
    that reads a container rewritten since sees the new one; in a bucket a command's processes are its own)."""
    key = (uri, _local_identity(uri))
    with _OPEN_LOCK:
        if key in _OPEN:
            _OPEN.move_to_end(key)
        else:
            _OPEN[key] = (kind(uri), threading.Lock())
            while len(_OPEN) > _KEEP_OPEN:
                reader, lock = _OPEN.popitem(last=False)[1]
                with lock:
                    reader.close()
        return _Locked(*_OPEN[key])


def _local_identity(uri: str) -> tuple[int, int] | None:
    where = as_location(uri)
    if not is_local(where):
        return None
    st = os.stat(where)
    return st.st_size, st.st_mtime_ns


def forget_open() -> None:
    """Close every container this process keeps open (a rewritten container is opened afresh)."""
    with _OPEN_LOCK:
        while _OPEN:
            reader, lock = _OPEN.popitem()[1]
            with lock:
                reader.close()


# ------------------------------------------------------------------------------------------------ indexing
@dataclass
class Entry:
    """One file found in a container: its sample key, URI and bytes (None for a file that is not an image, never
    kept), or why it cannot be read."""

    key: str
    field: str
    uri: str
    data: bytes | None
    error: str | None = None


def tar_entries(tar: str, is_image: Any) -> Iterator[Entry]:
    """Every regular member of a tar, in the tar's order, streamed (one GET of a tar in a bucket). ``is_image``:
    whether a member's field (``jpg``, ``seg.png``) is a sample's image; other members are never kept. A tar that
    ends early or holds a broken header raises :class:`DamagedContainer` after the members before it."""
    mode = "r|gz" if tar.endswith((".tar.gz", ".tgz")) else "r|"
    read = 0
    try:
        with _stream(tar) as raw, tarfile.open(fileobj=raw, mode=mode) as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, field = sample_key(info.name)
                uri = member_uri(tar, info.offset_data, info.size, info.name)
                if not is_image(field):
                    yield Entry(key, field, uri, None)
                    continue
                try:
                    data = archive.extractfile(info).read()
                except _READ_ERRORS:
                    yield Entry(key, field, uri, None, "truncated tar: the member's data ends early")
                    raise
                read += 1
                yield Entry(key, field, uri, data)
    except FileNotFoundError:
        raise DamagedContainer("not found") from None
    except _READ_ERRORS as e:
        raise DamagedContainer(f"unreadable after {read} image(s): {type(e).__name__}: {e}") from None


def parquet_entries(file: str, image_column: str | None = None, id_column: str | None = None) -> Iterator[Entry]:
    """Every row of a Parquet file with an image column (bytes, or the Hub's ``{bytes, path}`` struct), a row group
    at a time. The key: the id column's value, else the struct's ``path`` without its extension, else
    ``FILE/ROW``. Raises ValueError (one line) for a file without an image column or a named column it lacks."""
    try:
        rows = _ParquetRows(file)
    except FileNotFoundError:
        raise DamagedContainer("not found") from None
    except (pa.ArrowException, OSError) as e:
        raise DamagedContainer(f"not a readable Parquet file: {e}") from None
    try:
        schema = rows.file.schema_arrow
        column = image_column or _image_column(schema, file)
        ids = id_column or next((c for c in ID_COLUMNS if c in schema.names and _is_id(schema.field(c).type)), None)
        for name in (column, ids):
            if name and name not in schema.names:
                raise ValueError(f"--parquet {file}: no column {name!r} (it has {', '.join(schema.names)})")
        if "/" in column or ":" in column:
            raise ValueError(f"--parquet {file}: the image column's name {column!r} holds '/' or ':'")
        stem = posixpath.basename(file)[: -len(PARQUET_SUFFIX)]
        for group, start in enumerate(rows.starts):
            try:
                table = rows.file.read_row_group(group, columns=[c for c in (column, ids) if c])
            except (pa.ArrowException, OSError) as e:
                raise DamagedContainer(f"row group {group} unreadable: {e}") from None
            images = table.column(column)
            data, paths = image_bytes(images).to_pylist(), _paths(images)
            keys = [None if v is None else str(v) for v in table.column(ids).to_pylist()] if ids else None
            for i, image in enumerate(data):
                path = paths[i] if paths else None
                key = (keys and keys[i]) or (path and posixpath.splitext(path)[0]) or f"{stem}/{start + i:08d}"
                uri = row_uri(file, column, start + i, path or key)
                yield Entry(key, "", uri, image, None if image is not None else "the row's image bytes are null")
    finally:
        rows.close()


def image_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The encoded images of an image column: the column itself, or the ``bytes`` of a ``{bytes, path}`` struct."""
    return pc.struct_field(column, "bytes") if pa.types.is_struct(column.type) else column


def _paths(column: pa.ChunkedArray) -> list | None:
    if pa.types.is_struct(column.type) and column.type.get_field_index("path") >= 0:
        return pc.struct_field(column, "path").to_pylist()
    return None


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_binary(t.field(i).type)
    return _is_binary(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def _image_column(schema: pa.Schema, file: str) -> str:
    candidates = [f.name for f in schema if _is_image_type(f.type)]
    named = [c for c in IMAGE_COLUMNS if c in candidates]
    if named or candidates:
        return (named or candidates)[0]
    raise ValueError(
        f"--parquet {file}: no image column (binary, or a struct of bytes and path); name one with --image-column"
    )
