"""The one file-system layer: every read and write of a run folder, on a local disk or in a bucket.

A location is a local ``pathlib.Path`` (``/data/run``, ``file:///data/run``) or a ``UPath`` over fsspec for object
storage (``s3://bucket/runs/coco``, ``gs://...``); both have the same pathlib surface (``/``, ``exists``, ``glob``,
``read_text``...). What differs, this module does in each store's own way:

- atomic writes: locally a temp file in the same folder, then ``os.replace`` (modes from the umask); in a bucket a
  single PUT, or a multipart upload completed last: no reader ever sees a partial object under its final name;
- Parquet through pyarrow on either (pyarrow reads an fsspec file system directly, in ranges: no whole download);
- exclusive create (the lock): ``O_EXCL`` locally, a conditional PUT (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``) in a bucket;
- many small writes (a shard's masks) go out concurrently to a bucket.

Credentials and endpoints come the standard way (AWS variables and profiles, ``AWS_ENDPOINT_URL(_S3)``, roles,
``GOOGLE_APPLICATION_CREDENTIALS``). Why fsspec and not pyarrow.fs: docs/architecture.md, "Storage".
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Location: TypeAlias = Any  # pathlib.Path (local) or upath.UPath (object storage): the same pathlib surface


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # read once, at import: os.umask is process-wide and not thread-safe


def is_remote(uri: str | os.PathLike) -> bool:
    """An object-store URI (``s3://``, ``gs://``...), as opposed to a local path or ``file://``."""
    s = str(uri)
    return "://" in s and not s.startswith("file://")


# The standard variables that name an S3-compatible endpoint (botocore reads them): a Ray cluster's workers get the
# driver's, so that every process reads the same store.
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def use_endpoint(url: str | None) -> None:
    """The ``s3_endpoint_url`` config key: the S3 endpoint for this process and the Ray workers it starts."""
    if url and os.environ.get("AWS_ENDPOINT_URL_S3") != url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps a client per options, made for the old endpoint


def endpoint_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENDPOINT_VARS if os.environ.get(k)}


def url_credentials(url: object) -> bool:
    """Whether a URL carries a user name or password (``http://user:pass@host/``): they would be stored with the run
    (``config.yaml``, ``run.json``) and shown in its logs; credentials go in the standard variables or profiles."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or "://" not in url:
        return False
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def redacted(text: str) -> str:
    """``text`` with the user name and password of any URL in it replaced by ``***``."""
    import re

    return re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)


def is_local(path: Location) -> bool:
    return isinstance(path, Path)


def _remote_options(protocol: str) -> dict:
    # Listings are never cached: Ray workers in other processes write into the same folder between two listings.
    options: dict = {"use_listings_cache": False}
    if protocol in ("s3", "s3a") and not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        # throttling (503 SlowDown) and dropped connections retried with backoff, unless the user chose otherwise
        options["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": 8}}
    return options


def as_location(location: str | os.PathLike) -> Location:
    """The location a string or path names: a ``Path`` for a local one, a ``UPath`` for an object-store URI."""
    if not isinstance(location, (str, Path)):
        return location  # already a UPath
    s = str(location)
    if not is_remote(s):
        return Path(s[len("file://") :] if s.startswith("file://") else s)
    from upath import UPath

    return UPath(s, **_remote_options(s.split("://", 1)[0]))


def anchored(location: str | os.PathLike) -> Location:
    """:func:`as_location` with a local path made absolute: what is handed to Ray workers, whose working directory
    (on a joined cluster, the node's) is not the driver's."""
    path = as_location(location)
    return path.absolute() if is_local(path) else path


def _lexical(location: str) -> tuple[str, str]:
    """(scheme, '/'-separated path) of a location, a local path made absolute; nothing on disk is read."""
    if is_remote(location):
        scheme, rest = location.split("://", 1)
        return scheme, rest
    path = location[len("file://") :] if location.startswith("file://") else location
    return "", Path(os.path.abspath(path)).as_posix()


def common_folder(locations: Iterable[str]) -> str | None:
    """The deepest folder (or bucket prefix) that holds every location, or None where they share none (two
    buckets, local files beside objects)."""
    split = {_lexical(str(loc)) for loc in locations}
    schemes = {scheme for scheme, _ in split}
    if len(schemes) != 1:
        return None
    scheme = schemes.pop()
    folder = posixpath.commonpath([posixpath.dirname(path) for _, path in split])
    if scheme:
        return f"{scheme}://{folder}" if folder else None
    return folder


def path_under(root: str, location: str) -> str | None:
    """``location`` as a '/'-separated path below ``root`` (a folder or a bucket prefix), by their text alone, or
    None where it is not below it."""
    (root_scheme, top), (scheme, path) = _lexical(str(root)), _lexical(str(location))
    top = top.rstrip("/") + "/"
    if scheme != root_scheme or not path.startswith(top):
        return None
    below = path[len(top) :]
    return below if _plain_segments(below) else None


def make_folder(path: Location) -> None:
    """A local folder and its parents; in a bucket nothing (its folders are key prefixes, and a bucket is never
    created by this tool: a missing one is an error at the first write)."""
    path = as_location(path)
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)


# --- confinement: nothing is written outside the run folder ---
# The folder every write of this context must stay inside (set by the run folder's lock in the driver, and by the
# executor around each worker's shard and task): a path is checked where it is written, so that no output, present
# or future, can be sent elsewhere by a name taken from the input (an image id, a COCO file_name) or by a link.
_CONFINED_TO: contextvars.ContextVar[Location | None] = contextvars.ContextVar("confined_to", default=None)


class OutsideRunFolder(ValueError):
    """A write that would land outside the run folder (a link among its folders, or a name that climbs out)."""


@contextlib.contextmanager
def confined_to(root: str | os.PathLike | None) -> Iterator[None]:
    """Every write made inside the block (this thread) must resolve inside ``root`` (None: no confinement)."""
    where = None if root is None else as_location(root)
    if where is not None and is_local(where):
        where = where.resolve()  # once, not at every write
    token = _CONFINED_TO.set(where)
    try:
        yield
    finally:
        _CONFINED_TO.reset(token)


def contains(root: Location, path: Location) -> bool:
    """Whether ``path`` lies strictly inside ``root``. Locally both are resolved (every link followed, also in the
    part that does not exist yet), so a folder of the run that is a link to elsewhere is outside; in a bucket the
    key must start with the root's and hold no empty, ``.`` or ``..`` segment below it."""
    root, path = as_location(root), as_location(path)
    if is_local(root) != is_local(path):
        return False
    if is_local(path):
        return _resolved_inside(root.resolve(), path)
    top, key = str(root).rstrip("/") + "/", str(path)
    return key.startswith(top) and _plain_segments(key[len(top) :])


def _plain_segments(below: str) -> bool:
    """A '/'-separated path that names something below where it starts: no empty, ``.`` or ``..`` segment."""
    return all(seg not in ("", ".", "..") for seg in below.split("/"))


def _resolved_inside(real_root: Path, path: Path) -> bool:
    return real_root in path.resolve().parents


def check_write(path: Location) -> None:
    """Raise :class:`OutsideRunFolder` where ``path`` is not inside the folder this context is confined to."""
    root = _CONFINED_TO.get()
    if root is None:
        return
    path = as_location(path)
    inside = _resolved_inside(root, path) if is_local(root) and is_local(path) else contains(root, path)
    if not inside:
        raise OutsideRunFolder(
            f"refusing to write {path}: it is not inside the run folder {root} (a link among the run's folders, "
            "or a name that leads out of it)"
        )


# --- writes ---
def _atomic_local(path: Path, write: Callable[[str], object]) -> None:
    check_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def put_bytes(path: Location, data: bytes) -> None:
    """Write ``data`` under ``path`` atomically."""
    path = as_location(path)
    if is_local(path):

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        _atomic_local(path, write)
    else:
        check_write(path)
        path.fs.pipe_file(path.path, data)  # one PUT, or a multipart upload completed last


def put_stream(path: Location, write: Callable[[BinaryIO], object]) -> None:
    """Write a file too large to hold in memory, atomically: ``write(f)`` fills a temporary file (beside it, or
    local for a bucket) that is then renamed into place (or uploaded: the object appears when complete)."""
    path = as_location(path)
    if is_local(path):

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                write(f)

        _atomic_local(path, fill)
        return
    check_write(path)
    with tempfile.NamedTemporaryFile(prefix=".tmp-") as f:
        write(f)
        f.flush()
        path.fs.put_file(f.name, path.path)


def put_concatenated(path: Location, parts: list[Location]) -> None:
    """The Parquet tables at ``parts`` (one schema) concatenated into ``path``, streamed a part at a time."""
    put_tables(path, read_schema(parts[0]), (read_table(p) for p in parts))


def put_tables(path: Location, schema: pa.Schema, tables: Iterable[pa.Table], group_rows: int | None = None) -> None:
    """A stream of tables (one ``schema``) written as one Parquet file, atomically, never all of it in memory. With
    ``group_rows``, row groups of exactly that many rows (the last one shorter), so the file's bytes depend on the
    rows alone, not on how the stream was cut; without it, a row group per table."""

    def write(f: BinaryIO) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            if group_rows is None:
                for table in tables:
                    writer.write_table(table)
                return
            pending, held = [], 0
            for table in tables:
                pending.append(table)
                held += table.num_rows
                if held >= group_rows:
                    rows = pa.concat_tables(pending)
                    cut = held - held % group_rows
                    writer.write_table(rows.slice(0, cut), row_group_size=group_rows)
                    pending, held = [rows.slice(cut)], held - cut
            if held:
                writer.write_table(pa.concat_tables(pending), row_group_size=group_rows)

    put_stream(path, write)


def put_many(items: Iterable[tuple[Location, bytes]]) -> None:
    """Many small atomic writes (a shard's masks); to a bucket they go out concurrently."""
    items = list(items)
    remote = [(p, d) for p, d in items if not is_local(p)]
    for p, _ in remote:
        check_write(p)
    for p, d in items:
        if is_local(p):
            put_bytes(p, d)
    if remote:
        remote[0][0].fs.pipe({p.path: d for p, d in remote})


def table_bytes(table: pa.Table, **kwargs: object) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)  # the same bytes a local file gets
    return sink.getvalue().to_pybytes()


def put_table(path: Location, table: pa.Table, **kwargs: object) -> None:
    path = as_location(path)
    if is_local(path):
        _atomic_local(path, lambda tmp: pq.write_table(table, tmp, **kwargs))
    else:
        put_bytes(path, table_bytes(table, **kwargs))


def create_exclusive(path: Location, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if nothing is there; False when something is. On object storage this
    is a conditional PUT (S3 ``If-None-Match``, GCS ``ifGenerationMatch=0``): exclusive where the store enforces it."""
    path = as_location(path)
    check_write(path)
    if is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        path.fs.pipe_file(path.path, data, mode="create")
    except FileExistsError:
        return False
    return True


def remove(path: Location) -> None:
    """Remove a file or a whole folder (prefix); nothing there is fine."""
    path = as_location(path)
    check_write(path)
    if is_local(path):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def probe(path: Location) -> None:
    """Ask ``path``'s store once whether it answers, raising what the client raises (nothing for a local path):
    one attempt and a short connect timeout, a fresh client, so the answer is about now, not after the retries."""
    path = as_location(path)
    if is_local(path):
        return
    fs = path.fs
    if path.protocol in ("s3", "s3a"):
        import s3fs

        quick = {"retries": {"max_attempts": 1}, "connect_timeout": 5}
        fs = s3fs.S3FileSystem(**{**fs.storage_options, "config_kwargs": quick}, skip_instance_cache=True)
    fs.info(path.path)


# --- reads ---
def read_table(path: Location, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    # opened here, not handed to pyarrow with the file system: pyarrow would first ask whether it is a file or a
    # folder, a second request for every object read
    with _opened(path) as source:
        return pq.read_table(source, columns=columns, filters=filters)


def get_bytes(path: Location) -> bytes:
    """A file's or an object's bytes; an object in one GET (opening it, or s3fs reading it in concurrent ranges,
    first asks for its size)."""
    path = as_location(path)
    if is_local(path):
        return path.read_bytes()
    one_get = {"max_concurrency": 1} if "s3" in path.fs.protocol else {}
    return path.fs.cat_file(path.path, **one_get)


@contextlib.contextmanager
def _opened(path: Location) -> Iterator[Any]:
    """What pyarrow reads a file from: a local path as it is, an object as a file opened for ranged reads."""
    path = as_location(path)
    if is_local(path):
        yield path
        return
    with path.fs.open(path.path, "rb") as f:
        yield f


def iter_batches(
    path: Location, columns: list[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows a batch at a time, in file order (a bucket's object read in ranges, never whole)."""
    with _opened(path) as source:
        yield from pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=columns)


def rows_where(
    path: Location, column: str, value: object, columns: list[str] | None = None
) -> tuple[pa.Table, list[int]]:
    """The rows of a Parquet file whose ``column`` equals ``value`` (``columns`` of them, or all), and their
    positions in the file: only the row groups whose statistics can hold ``value`` are read (a shard's rows of a
    manifest of any size)."""
    return _rows_in(path, column, value, value, columns)


def rows_between(path: Location, column: str, low: object, high: object, columns: list[str] | None = None) -> pa.Table:
    """The rows whose ``column`` lies in ``[low, high]``, read from the row groups whose statistics overlap that
    range (the previous manifest's rows of one ingest task's id range)."""
    return _rows_in(path, column, low, high, columns)[0]


def _rows_in(
    path: Location, column: str, low: object, high: object, columns: list[str] | None
) -> tuple[pa.Table, list[int]]:
    with _opened(path) as source:
        pf = pq.ParquetFile(source)
        meta, where = pf.metadata, pf.schema_arrow.get_field_index(column)
        columns = columns or pf.schema_arrow.names
        found, positions, start = [], [], 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(where).statistics
            if stats is None or not stats.has_min_max or (stats.min <= high and low <= stats.max):
                table = pf.read_row_group(g, columns=sorted({*columns, column}))
                values = table.column(column)  # compared in Arrow: a third of a Python loop's time a group
                inside = pc.fill_null(pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high)), False)
                found.append(table.filter(inside).select(columns))
                positions += (start + pc.indices_nonzero(inside).to_numpy()).tolist()
            start += group.num_rows
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    return (pa.concat_tables(found) if found else schema.empty_table()), positions


def move(source: Location, target: Location) -> None:
    """``source`` put in ``target``'s place: locally a rename (atomic); in a bucket a server-side copy (the object
    appears whole) and the source's removal."""
    source, target = as_location(source), as_location(target)
    check_write(target)
    if is_local(source):
        os.replace(source, target)
    else:
        source.fs.mv(source.path, target.path)


def _read_footer(path: Location, read: Callable) -> Any:
    with _opened(path) as source:  # in a bucket, one ranged read of the footer, not the whole object
        return read(source)


def read_metadata(path: Location) -> pq.FileMetaData:
    """A Parquet file's footer alone (row counts, schema)."""
    return _read_footer(path, pq.read_metadata)


def read_schema(path: Location) -> pa.Schema:
    return _read_footer(path, pq.read_schema)


def walk_files(folder: Location) -> list[Location]:
    """Every file below ``folder`` (recursive), sorted."""
    folder = as_location(folder)
    if is_local(folder):
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not folder.exists():
        return []
    return sorted(folder / os.path.relpath(f, folder.path) for f in folder.fs.find(folder.path))
