"""The run folder: every path in it, shard markers, image status and the lock.

The folder is local or in a bucket (``s3://``, ``gs://``); every read and write goes through the file-system layer
(``core/storage.py``, Parquet in ``core/tables.py``), which writes atomically: a shard's outputs are in place before
the executor writes its marker ``_state/<stage>/NNNNN``, and readers list only final names (``shard-*.parquet``),
never ``.tmp-*``. Nothing else builds a path under the run folder's root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .errors import RunLocked, UnsafeImageId
from .storage import Location, anchored, as_location, atomic_write_json, is_local, read_json
from .tables import atomic_write_tables, iter_batches, read_table, rows_where

FEATURE_SCHEMA_VERSION = "2"  # 2: key as fixed-size binary float16 (1: fixed_size_list, still read)
log = logging.getLogger("mlcseg_ray")


def shard_name(index: int, prefix: str = "shard", suffix: str = ".parquet") -> str:
    return f"{prefix}-{index:05d}{suffix}"


# An image id names its outputs (``masks/<id>.png``), so it must be a relative path of plain segments. Longer ones
# would not fit a file name (255 bytes, ".png" and a temp prefix included) or a path.
MAX_SEGMENT_BYTES = 240
MAX_ID_BYTES = 1024


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name an output file, or None where it can: a relative path of ``/``-separated
    segments, none empty, ``.`` or ``..``, without a backslash, a control character or an undecodable byte, and not
    too long. Anything else (spaces, a leading ``-``, brackets, any script) is kept as it is."""
    if not image_id:
        return "the image id is empty"
    if image_id.startswith("/"):
        return "the image id is an absolute path"
    if "\\" in image_id:
        return "the image id holds a backslash (ids are '/'-separated paths)"
    bad = next((c for c in image_id if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"the image id holds a control character or an undecodable byte ({ascii(bad)})"
    segments = image_id.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        return "the image id holds an empty, '.' or '..' segment (it must stay inside the output folder)"
    if len(image_id.encode()) > MAX_ID_BYTES or any(len(seg.encode()) > MAX_SEGMENT_BYTES for seg in segments):
        return (
            f"the image id is too long for a file name (a segment over {MAX_SEGMENT_BYTES} bytes, or the whole "
            f"over {MAX_ID_BYTES})"
        )
    return None


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes written as escapes (``\\x1b``), so that a name never
    drives the terminal or fails to encode; everything else as it is."""
    if all(unicodedata.category(c) not in ("Cc", "Cs") for c in text):
        return text
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)


STATUS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("flag", pa.string()),
        ("confidence", pa.float32()),  # the pseudo-mask's confidence (cluster), None where it has none
    ]
)


STATUS_GROUP_ROWS = 65_536  # rows per row group of status.parquet


@dataclass
class StatusSummary:
    """What ``status.parquet`` says in numbers (a run of any size), and its first failed rows."""

    images: int = 0
    failed: int = 0
    flags: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)  # (stage, reason) -> images
    failed_rows: list[dict] = field(default_factory=list)


class RunDir:
    """Every path of one run folder, and what the folder says about each image. Stages ask it for paths; nothing
    else builds a path under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = anchored(root)  # a local Path (absolute: workers have their own directory), or a UPath
        self.remote = not is_local(self.root)

    # --- files and folders ---
    manifest = property(lambda self: self.root / "manifest.parquet")  # ingest's listing; never rewritten
    manifest_parts = property(lambda self: self.root / "manifest_parts")  # ingest's tasks' parts, while it runs
    input_index = property(lambda self: self.root / "input_index")  # each tar's or Parquet file's listing, kept
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
    level_groups = property(lambda self: self.levels / "groups.parquet")  # the CLS groups' centroids
    pseudo = property(lambda self: self.root / "pseudo")
    binary = property(lambda self: self.root / "binary")
    masks = property(lambda self: self.root / "masks")
    region_parts = property(lambda self: self.root / "regions")
    regions = property(lambda self: self.root / "regions.parquet")
    classes = property(lambda self: self.root / "classes.parquet")  # the class centroids (library/fits.py)
    coco_parts = property(lambda self: self.root / "coco_parts")
    coco = property(lambda self: self.root / "pseudo_labels.json")
    metrics = property(lambda self: self.root / "metrics.json")
    confusion = property(lambda self: self.root / "confusion.png")
    ablation = property(lambda self: self.root / "ablation.json")  # mlcseg ablate: every level and rule vs truth
    report = property(lambda self: self.root / "report.html")
    logs = property(lambda self: self.root / "logs")  # each command's Ray output (Ray's lines stay off the terminal)

    # --- per-shard and per-image paths ---
    def feature_shard(self, n: int) -> Location:
        return self.features / shard_name(n)

    def image_table(self, n: int) -> Location:
        return self.image_tables / shard_name(n)

    def pseudo_part(self, n: int) -> Location:
        return self.pseudo / shard_name(n, "part")

    def region_part(self, n: int) -> Location:
        return self.region_parts / shard_name(n, "part")

    def labelled_part(self, n: int) -> Location:
        return self.coco_parts / shard_name(n, "labelled")  # label's, beside its COCO fragments

    def coco_part(self, n: int) -> Location:
        return self.coco_parts / shard_name(n, "part", ".json")

    def binary_mask(self, image_id: str) -> Location:
        return self.image_file(self.binary, image_id)

    def class_mask(self, image_id: str) -> Location:
        return self.image_file(self.masks, image_id)

    def has_binary_mask(self, image_id: str) -> bool:
        """Whether refine wrote the image's binary mask (never for an id that cannot name a file)."""
        return id_problem(image_id) is None and self.binary_mask(image_id).exists()

    def has_class_mask(self, image_id: str) -> bool:
        """Whether label wrote the image's class mask (never for an id that cannot name a file)."""
        return id_problem(image_id) is None and self.class_mask(image_id).exists()

    def image_file(self, folder: Location, image_id: str, suffix: str = ".png") -> Location:
        """An image's file in one of the run's per-image folders. An id that cannot name a file there (it would
        climb out, or is no file name) is that image's error (:class:`UnsafeImageId`), never a path elsewhere."""
        problem = id_problem(image_id)
        if problem:
            raise UnsafeImageId(problem)
        return folder / f"{image_id}{suffix}"

    # The run's own folders and files: none may be a link (a write through it would land elsewhere).
    OWN_ENTRIES = (
        "manifest", "status", "config", "run_record", "features", "image_tables", "levels", "pseudo", "binary",
        "masks", "region_parts", "regions", "classes", "coco_parts", "coco", "metrics", "confusion", "ablation",
        "report", "logs", "input_index",
    )  # fmt: skip

    def check_own_folders(self) -> None:
        """Refuse a run folder whose own folders (or files) are links, or hold a link below them on the way to its
        outputs: a rerun would write through it, outside the run folder."""
        if self.remote:
            return
        for name in (*self.OWN_ENTRIES, "_state"):
            p = self.state_root if name == "_state" else getattr(self, name)
            if p.is_symlink():
                raise storage.OutsideRunFolder(
                    f"{p} is a link (to {os.readlink(p)}): a run never writes through a link; replace it with a "
                    "folder (or remove it) and rerun"
                )

    def mask_ids(self, folder: Location) -> set[str]:
        """The image ids with a mask in ``folder`` (``binary``, ``masks``), from one listing: in a bucket a LIST
        per thousand masks, not a HEAD per image."""
        top = len(self.relative(folder)) + 1
        return {self.relative(p)[top:-4] for p in storage.walk_files(folder) if str(p).endswith(".png")}

    def shards_of(self, folder: Location, prefix: str = "shard") -> list[int]:
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
            return set(read_table(self.manifest, columns=["image_id"]).column(0).to_pylist())
        return {
            i for p in list_shards(self.image_tables) for i in read_table(p, columns=["image_id"]).column(0).to_pylist()
        }

    def images_per_shard(self) -> dict[int, int]:
        """How many images the manifest puts in each shard (empty without a manifest: a brought-in store)."""
        if not self.manifest.exists():
            return {}
        counts = pc.value_counts(read_table(self.manifest, columns=["shard"]).column("shard"))
        return {int(c["values"]): int(c["counts"]) for c in counts.to_pylist()}

    def manifest_rows(self, shard: int) -> list[dict]:
        """The manifest's rows of one shard (what extract reads, and what later stages check images against)."""
        return rows_where(self.manifest, "shard", shard)[0].to_pylist()

    # --- stage state: markers and the stage record ---
    state_root = property(lambda self: self.root / "_state")  # the executor's markers and stage records

    def state(self, stage: str) -> Location:
        return self.state_root / stage

    def stages_with_state(self) -> list[str]:
        """The stages that have a state folder (ran, or began to), by name."""
        return sorted(p.name for p in self.state_root.iterdir() if p.is_dir()) if self.state_root.is_dir() else []

    def marker(self, stage: str, shard: int) -> Location:
        return self.state(stage) / f"{shard:05d}"

    def stage_record(self, stage: str) -> Location:
        return self.state(stage) / "stage.json"

    def relative(self, path: Location | str) -> str:
        """``path`` (inside the run folder) relative to its root, as the markers record it."""
        return str(path)[len(str(self.root).rstrip("/")) + 1 :]

    def at(self, relative: str) -> Location:
        """The path a marker or record names relative to the root (``relative``'s inverse)."""
        return self.root / relative

    def inside(self, path: Location) -> bool:
        return storage.contains(self.root, path)

    def remove(self, path: Location) -> None:
        """Remove a file or folder of this run (a stage's stale outputs)."""
        path = as_location(path)
        if not self.inside(path):
            raise ValueError(f"refusing to remove {path}: not inside the run folder {self.root}")
        storage.remove(path)

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
    def write_status(self, tables: Iterable[pa.Table]) -> None:
        """``status.parquet`` from a stream of tables of its rows (never every row in memory at once)."""
        atomic_write_tables(self.status, STATUS_SCHEMA, tables, STATUS_GROUP_ROWS)

    def read_status(self, problems_only: bool = False) -> list[dict]:
        """One row per image (image_id, uri, status ok/error, stage, error, flag, confidence); empty before
        ingest. ``problems_only``: only the failed and the flagged images' rows."""
        if not self.status.exists():
            return []
        where = (pc.field("status") != "ok") | pc.field("flag").is_valid() if problems_only else None
        return read_table(self.status, filters=where).to_pylist()

    def status_summary(self, examples: int = 0) -> StatusSummary:
        """Counts of ``status.parquet`` (images, failed, flags, failures by stage and reason) and the first
        ``examples`` failed rows, read a batch at a time."""
        out = StatusSummary()
        if not self.status.exists():
            return out
        for batch in iter_batches(self.status, columns=["image_id", "stage", "status", "error", "flag"]):
            out.images += batch.num_rows
            flags = batch.column("flag").drop_null().to_pylist()
            out.flags.update(flags)
            failed = batch.filter(pc.not_equal(batch.column("status"), "ok")).to_pylist()
            out.failed += len(failed)
            out.reasons.update((r["stage"], (r["error"] or "").split(":")[0][:80]) for r in failed)
            out.failed_rows += failed[: max(0, examples - len(out.failed_rows))]
        return out

    # --- the lock ---
    @contextlib.contextmanager
    def lock(self, command: str = "") -> Iterator[dict]:
        """Hold the run folder for this process. A live holder is a clear error naming it; a dead holder's lock
        (same host, process gone) is taken over, and said so. Check-and-take is atomic: locally under a guard
        ``flock``, in a bucket by a conditional create of the lock object."""
        self.check_own_folders()  # before anything is written
        created = not self.root.exists()
        storage.make_folder(self.root)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        }
        self._take_lock(me)
        try:
            with storage.confined_to(self.root):  # whatever this command writes stays in the run folder
                yield me
        finally:
            try:
                with self._lock_guard():
                    if (read_json(self.lock_file) or {}).get("pid") == me["pid"]:
                        storage.remove(self.lock_file)
                if created and self._holds_only_state():  # a run that failed before writing anything leaves nothing
                    storage.remove(self.root)
            except Exception as e:  # a store that went away: the next run takes the dead holder's lock over
                log.warning("could not release the lock %s (%s): the next run takes it over", self.lock_file, e)

    def _take_lock(self, me: dict) -> None:
        if self.remote:
            # Of two runs that create the lock object at once, the store lets exactly one succeed. Taking over a
            # dead holder's lock (delete, then create) is not exclusive against a second taker at the same moment.
            while not self._create_lock(me):
                holder = read_json(self.lock_file)
                if holder and not self._ours(holder, me):
                    self._refuse_live(holder, me)
                storage.remove(self.lock_file)
            return
        with self._lock_guard():
            holder = read_json(self.lock_file)
            if holder and not self._ours(holder, me):
                self._refuse_live(holder, me)
            atomic_write_json(self.lock_file, me)

    def _create_lock(self, me: dict) -> bool:
        try:
            return storage.create_exclusive(self.lock_file, json.dumps(me).encode())
        except FileNotFoundError:
            bucket = str(self.root).split("://", 1)[1].split("/", 1)[0]
            raise FileNotFoundError(f"--out {self.root}: no such bucket {bucket!r} (create it first)") from None

    @staticmethod
    def _ours(holder: dict, me: dict) -> bool:
        return holder.get("pid") == me["pid"] and holder.get("host") == me["host"]

    def _refuse_live(self, holder: dict, me: dict) -> None:
        """Raise RunLocked naming a live holder; say so when a dead one's lock is taken over."""
        if _alive(holder):
            raise RunLocked(
                f"{self.root} is in use by another run: pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('started_at')} ({holder.get('command') or 'mlcseg'}); wait for it to end or use "
                f"another --out"
                + ("" if holder.get("host") == me["host"] else f" (if that run is gone, delete {self.lock_file})")
            )
        log.warning(
            "taking over the lock of %s: its holder (pid %s on %s, started %s) is no longer running",
            self.root,
            holder.get("pid"),
            holder.get("host"),
            holder.get("started_at"),
        )

    @contextlib.contextmanager
    def _lock_guard(self) -> Iterator[None]:
        """Locally a ``flock`` on ``_state/lock.guard`` around check-and-take; a bucket needs none (its create is
        conditional)."""
        if self.remote:
            yield
            return
        import fcntl

        guard_path = self.state_root / "lock.guard"
        guard_path.parent.mkdir(parents=True, exist_ok=True)
        with open(guard_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

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


def list_shards(folder: Location, prefix: str = "shard") -> list[Location]:
    """Final shard files only (never ``.tmp-*``), in shard order."""
    folder = as_location(folder)
    return sorted(folder.glob(f"{prefix}-*.parquet")) if folder.is_dir() else []


def markers(state: Location) -> list[Location]:
    """A stage's shard markers (files named by their shard number), in shard order."""
    return sorted((p for p in state.iterdir() if p.name.isdigit()), key=lambda p: p.name) if state.is_dir() else []


def shard_index(path: Location) -> int:
    return int(as_location(path).stem.split("-")[-1])


def remove_stale_temp_files(*folders: Location) -> None:
    """Temp files of a run that was killed mid-write; never read, removed so they do not pile up. (A bucket has
    none: its writes are single objects.)"""
    for folder in map(as_location, folders):
        if is_local(folder) and folder.is_dir():
            for p in folder.glob(".tmp-*"):
                p.unlink(missing_ok=True)
