"""The one file-system layer: every read and write of a run folder, on a local disk or in a bucket.

A location is a local ``pathlib.Path`` (``/data/run``, ``file:///data/run``) or a ``UPath`` over fsspec for object
storage (``s3://bucket/runs/coco``, ``gs://...``); both have the same pathlib surface (``/``, ``exists``, ``glob``,
``read_text``...). What differs, this module does in each store's own way:

- atomic writes: locally a temp file in the same folder, then ``os.replace`` (modes from the umask); in a bucket a
  single PUT, or a multipart upload completed last: no reader ever sees a partial object under its final name;
- exclusive create (the lock): ``O_EXCL`` locally, a conditional PUT (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``) in a bucket;
- many small writes (a shard's masks) go out concurrently to a bucket.

Credentials and endpoints come the standard way (AWS variables and profiles, ``AWS_ENDPOINT_URL(_S3)``, roles,
``GOOGLE_APPLICATION_CREDENTIALS``). Why fsspec and not pyarrow.fs: docs/architecture.md, "Storage". Every write is
confined to the run folder (``confined_to``) and recorded (``recording_writes``: what a shard's marker lists).
Parquet tables on this layer: ``core/tables.py``; the run folder's paths: ``core/run_dir.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import posixpath
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

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
def atomic_local(path: Path, write: Callable[[str], object]) -> None:
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


def get_bytes(path: Location) -> bytes:
    """A file's or an object's bytes; an object in one GET (opening it, or s3fs reading it in concurrent ranges,
    first asks for its size)."""
    path = as_location(path)
    if is_local(path):
        return path.read_bytes()
    one_get = {"max_concurrency": 1} if "s3" in path.fs.protocol else {}
    return path.fs.cat_file(path.path, **one_get)


def get_range(path: Location, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive, or fewer at the file's end); an object's in one ranged GET."""
    path = as_location(path)
    if is_local(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return path.fs.cat_file(path.path, start=start, end=end)


@contextlib.contextmanager
def opened(path: Location) -> Iterator[Any]:
    """What pyarrow reads a file from: a local path as it is, an object as a file opened for ranged reads."""
    path = as_location(path)
    if is_local(path):
        yield path
        return
    with path.fs.open(path.path, "rb") as f:
        yield f


def walk_files(folder: Location) -> list[Location]:
    """Every file below ``folder`` (recursive), sorted."""
    folder = as_location(folder)
    if is_local(folder):
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not folder.exists():
        return []
    return sorted(folder / os.path.relpath(f, folder.path) for f in folder.fs.find(folder.path))


# The files written in the current context (a shard of a stage): path -> (size, crc32 or None). The executor
# records them in the shard's marker, so that a rerun notices a deleted or truncated output.
_WRITTEN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("written", default=None)


CHECKSUM_MAX_BYTES = 4 << 20  # larger files (feature shards) are checked by size alone: a CRC would re-read them


@contextlib.contextmanager
def recording_writes() -> Iterator[dict[str, tuple[int, int | None]]]:
    """Collects every atomic write made inside the block (this thread): ``{path: (size, crc32 or None)}``."""
    written: dict = {}
    token = _WRITTEN.set(written)
    try:
        yield written
    finally:
        _WRITTEN.reset(token)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Writes inside the block are no stage's outputs: scratch files merged into one and removed (ingest's parts)."""
    token = _WRITTEN.set(None)
    try:
        yield
    finally:
        _WRITTEN.reset(token)


def file_crc(path: Location) -> int:
    return zlib.crc32(as_location(path).read_bytes())


def note_write(path: Location, data: bytes | None = None) -> None:
    written = _WRITTEN.get()
    if written is None:
        return
    size = len(data) if data is not None else path.stat().st_size
    crc = zlib.crc32(data) if data is not None else file_crc(path) if size <= CHECKSUM_MAX_BYTES else None
    written[str(path)] = (size, crc)


def atomic_write_bytes(path: Location, data: bytes) -> None:
    """Write ``data`` under ``path`` atomically (locally a temp file renamed into place; in a bucket one PUT, or a
    multipart upload completed last), and record it."""
    path = as_location(path)
    if is_local(path):

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_local(path, write)
    else:
        check_write(path)
        path.fs.pipe_file(path.path, data)
    note_write(path, data)


def atomic_write_stream(path: Location, write: Callable[[BinaryIO], object]) -> None:
    """A file too large to hold in memory, atomically: ``write(f)`` fills a temporary file (beside it, or local for
    a bucket) that is then renamed into place (or uploaded: the object appears when complete); recorded."""
    path = as_location(path)
    if is_local(path):

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                write(f)

        atomic_local(path, fill)
    else:
        check_write(path)
        with tempfile.NamedTemporaryFile(prefix=".tmp-") as f:
            write(f)
            f.flush()
            path.fs.put_file(f.name, path.path)
    note_write(path)


def atomic_write_many(items: list[tuple[Location, bytes]]) -> None:
    """A shard's many small files (masks): each atomic, to a bucket concurrently; each recorded."""
    items = [(as_location(p), d) for p, d in items]
    remote = [(p, d) for p, d in items if not is_local(p)]
    for p, _ in remote:
        check_write(p)
    for p, d in items:
        if is_local(p):
            atomic_write_bytes(p, d)
    if remote:
        remote[0][0].fs.pipe({p.path: d for p, d in remote})
        for p, d in remote:
            note_write(p, d)


def atomic_replace(source: Location, target: Location) -> None:
    """A complete file written elsewhere put in ``target``'s place: locally a rename; in a bucket a server-side
    copy (the object appears whole) and the source's removal. Recorded."""
    source, target = as_location(source), as_location(target)
    check_write(target)
    if is_local(source):
        os.replace(source, target)
    else:
        source.fs.mv(source.path, target.path)
    note_write(target)


def atomic_write_text(path: Location, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Location, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Location, default: Any = None) -> Any:
    try:
        return json.loads(get_bytes(path))
    except FileNotFoundError:
        return default
