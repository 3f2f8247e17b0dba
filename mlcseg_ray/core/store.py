"""The run folder: every path in it, atomic writes, shard markers, image status and the lock.

A shard's output is written to a temporary name in the same folder, renamed into place, and only then its marker
``_state/<stage>/NNNNN`` is written (by the executor). No reader ever sees a half-written file: readers list only
final names (``shard-*.parquet``), never ``.tmp-*``. Files take the mode the user's umask gives (``mkstemp`` alone
would leave them 0600, unreadable to the other users of a shared file system).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RunLocked

FEATURE_SCHEMA_VERSION = "1"
log = logging.getLogger("mlcseg_ray")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # read once, at import: os.umask is process-wide and not thread-safe


def shard_name(index: int, prefix: str = "shard", suffix: str = ".parquet") -> str:
    return f"{prefix}-{index:05d}{suffix}"


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


def file_crc(path: str | Path) -> int:
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def _note_write(path: Path, data: bytes | None = None) -> None:
    written = _WRITTEN.get()
    if written is None:
        return
    size = path.stat().st_size
    crc = zlib.crc32(data) if data is not None else file_crc(path) if size <= CHECKSUM_MAX_BYTES else None
    written[str(path)] = (size, crc)


def _atomic(path: Path, write: Callable[[str], object]) -> None:
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


def atomic_write_table(path: Path, table: pa.Table, **kwargs: object) -> None:
    _atomic(Path(path), lambda tmp: pq.write_table(table, tmp, **kwargs))
    _note_write(Path(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(path), write)
    _note_write(Path(path), data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


STATUS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("flag", pa.string()),
    ]
)


class RunDir:
    """Every path of one run folder, and what the folder says about each image. Stages ask it for paths; nothing
    else builds a path under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- files and folders ---
    manifest = property(lambda self: self.root / "manifest.parquet")  # ingest's listing; never rewritten
    status = property(lambda self: self.root / "status.parquet")  # each image's outcome, from every stage
    config = property(lambda self: self.root / "config.yaml")
    run_record = property(lambda self: self.root / "run.json")
    lock_file = property(lambda self: self.root / ".lock")
    features = property(lambda self: self.root / "features")
    image_tables = property(lambda self: self.root / "images")  # one row per image: geometry, CLS token
    levels = property(lambda self: self.root / "levels")
    level_fit = property(lambda self: self.levels / "fit.json")  # sample sizes, iterations, store passes
    level_dataset = property(lambda self: self.levels / "dataset.parquet")  # dataset-level centroids, fg flags
    level_categories = property(lambda self: self.levels / "categories.parquet")  # per CLS group
    level_groups = property(lambda self: self.levels / "groups.parquet")  # image -> CLS group
    pseudo = property(lambda self: self.root / "pseudo")
    binary = property(lambda self: self.root / "binary")
    masks = property(lambda self: self.root / "masks")
    region_parts = property(lambda self: self.root / "regions")
    regions = property(lambda self: self.root / "regions.parquet")
    coco_parts = property(lambda self: self.root / "coco_parts")
    coco = property(lambda self: self.root / "pseudo_labels.json")
    metrics = property(lambda self: self.root / "metrics.json")
    confusion = property(lambda self: self.root / "confusion.png")
    ablation = property(lambda self: self.root / "ablation.json")  # mlcseg ablate: every level and rule vs truth
    report = property(lambda self: self.root / "report.html")
    logs = property(lambda self: self.root / "logs")  # each command's Ray output (Ray's lines stay off the terminal)

    # --- per-shard and per-image paths ---
    def feature_shard(self, n: int) -> Path:
        return self.features / shard_name(n)

    def image_table(self, n: int) -> Path:
        return self.image_tables / shard_name(n)

    def pseudo_part(self, n: int) -> Path:
        return self.pseudo / shard_name(n, "part")

    def region_part(self, n: int) -> Path:
        return self.region_parts / shard_name(n, "part")

    def labelled_part(self, n: int) -> Path:
        return self.coco_parts / shard_name(n, "labelled")  # label's, beside its COCO fragments

    def coco_part(self, n: int) -> Path:
        return self.coco_parts / shard_name(n, "part", ".json")

    def binary_mask(self, image_id: str) -> Path:
        return self.binary / f"{image_id}.png"

    def class_mask(self, image_id: str) -> Path:
        return self.masks / f"{image_id}.png"

    def shards_of(self, folder: Path, prefix: str = "shard") -> list[int]:
        """The shard numbers of one of this run's sharded folders (final files only)."""
        return [shard_index(p) for p in list_shards(folder, prefix)]

    def pseudo_shards(self) -> list[int]:
        """The shards the cluster stage wrote: the units of work of every stage after it."""
        shards = self.shards_of(self.pseudo, "part")
        if not shards:
            raise FileNotFoundError(f"no pseudo-masks in {self.pseudo}: run cluster first")
        return shards

    def image_ids(self) -> set[str]:
        """Every image of the run: the manifest's, or a brought-in store's image tables'."""
        if self.manifest.exists():
            return set(pq.read_table(self.manifest, columns=["image_id"]).column(0).to_pylist())
        return {
            i
            for p in list_shards(self.image_tables)
            for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist()
        }

    def manifest_rows(self, shard: int) -> list[dict]:
        """The manifest's rows of one shard (what extract reads, and what later stages check images against)."""
        return pq.read_table(self.manifest, filters=[("shard", "=", shard)]).to_pylist()

    # --- stage state: markers and the stage record ---
    def state(self, stage: str) -> Path:
        return self.root / "_state" / stage

    def marker(self, stage: str, shard: int) -> Path:
        return self.state(stage) / f"{shard:05d}"

    def stage_record(self, stage: str) -> Path:
        return self.state(stage) / "stage.json"

    def remove(self, path: Path) -> None:
        """Remove a file or folder of this run (a stage's stale outputs)."""
        path = Path(path)
        if self.root.resolve() not in path.resolve().parents:
            raise ValueError(f"refusing to remove {path}: not inside the run folder {self.root}")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # --- run record: what made this run (config fingerprint, backbone, stage timings) ---
    def read_record(self) -> dict:
        return read_json(self.run_record, {})

    def update_record(self, **fields: object) -> dict:
        rec = self.read_record()
        for k, v in fields.items():
            if isinstance(v, dict) and isinstance(rec.get(k), dict):
                rec[k].update(v)
            else:
                rec[k] = v
        atomic_write_json(self.run_record, rec)
        return rec

    # --- each image's status ---
    def write_status(self, rows: list[dict]) -> None:
        atomic_write_table(self.status, pa.Table.from_pylist(rows, schema=STATUS_SCHEMA))

    def read_status(self) -> list[dict]:
        """One row per image (image_id, uri, status ok/error, stage, error, flag); empty before ingest."""
        return pq.read_table(self.status).to_pylist() if self.status.exists() else []

    # --- the lock ---
    @contextlib.contextmanager
    def lock(self, command: str = "") -> Iterator[dict]:
        """Hold the run folder for this process. A live holder is a clear error naming it; a dead holder's lock
        (same host, process gone) is taken over, and said so. A guard ``flock`` makes check-and-take atomic."""
        import fcntl

        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        }
        guard_path = self.root / "_state" / "lock.guard"
        guard_path.parent.mkdir(parents=True, exist_ok=True)
        with open(guard_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            holder = read_json(self.lock_file)
            if holder and holder.get("pid") != me["pid"]:
                if _alive(holder):
                    raise RunLocked(
                        f"{self.root} is in use by another run: pid {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('started_at')} ({holder.get('command') or 'mlcseg'}); wait for it to end or use "
                        f"another --out"
                        + (
                            ""
                            if holder.get("host") == me["host"]
                            else f" (if that run is gone, delete {self.lock_file})"
                        )
                    )
                log.warning(
                    "taking over the lock of %s: its holder (pid %s on %s, started %s) is no longer running",
                    self.root,
                    holder.get("pid"),
                    holder.get("host"),
                    holder.get("started_at"),
                )
            atomic_write_json(self.lock_file, me)
        try:
            yield me
        finally:
            with open(guard_path, "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                if (read_json(self.lock_file) or {}).get("pid") == me["pid"]:
                    self.lock_file.unlink(missing_ok=True)
            if created and self._holds_only_state():  # a run that failed before writing anything leaves nothing
                shutil.rmtree(self.root, ignore_errors=True)

    def _holds_only_state(self) -> bool:
        return all(p.name in ("_state", ".lock") for p in self.root.iterdir())


def _alive(holder: dict) -> bool:
    """Whether a lock's holder still runs. On another host that cannot be told: assume it does."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(holder["pid"]))
        # a reused PID belongs to a process that started after the lock was taken
        return proc.create_time() <= float(holder.get("started", 0)) + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def list_shards(folder: Path, prefix: str = "shard") -> list[Path]:
    """Final shard files only (never ``.tmp-*``), in shard order."""
    folder = Path(folder)
    return sorted(folder.glob(f"{prefix}-*.parquet")) if folder.is_dir() else []


def shard_index(path: Path) -> int:
    return int(Path(path).stem.split("-")[-1])


def read_tables(paths: Iterable[Path], columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({})


def remove_stale_temp_files(*folders: Path) -> None:
    """Temp files of a run that was killed mid-write; never read, removed so they do not pile up."""
    for folder in folders:
        if Path(folder).is_dir():
            for p in Path(folder).glob(".tmp-*"):
                p.unlink(missing_ok=True)
