"""The run folder: file layout, atomic writes and shard completion markers (DESIGN §1).

A shard's output is written to a temporary name in the same folder, renamed into place, and only then its marker
``_state/<stage>/NNNNN`` is written. A rerun skips shards whose marker exists, and no reader ever sees a half-written
file: readers list only final names (``shard-*.parquet``), never ``.tmp-*``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_SCHEMA_VERSION = "1"


def shard_name(index: int, prefix: str = "shard", suffix: str = ".parquet") -> str:
    return f"{prefix}-{index:05d}{suffix}"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_table(path: Path, table: pa.Table, **kwargs) -> None:
    _atomic(Path(path), lambda tmp: pq.write_table(table, tmp, **kwargs))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(path), write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDir:
    """Paths of one run folder. Everything a stage writes lives under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    manifest = property(lambda self: self.root / "manifest.parquet")
    config = property(lambda self: self.root / "config.yaml")
    run_record = property(lambda self: self.root / "run.json")
    features = property(lambda self: self.root / "features")
    images = property(lambda self: self.root / "images")
    levels = property(lambda self: self.root / "levels")
    pseudo = property(lambda self: self.root / "pseudo")
    binary = property(lambda self: self.root / "binary")
    masks = property(lambda self: self.root / "masks")
    regions = property(lambda self: self.root / "regions.parquet")
    coco = property(lambda self: self.root / "pseudo_labels.json")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.html")

    def state(self, stage: str) -> Path:
        return self.root / "_state" / stage

    def is_done(self, stage: str, shard: int) -> bool:
        return (self.state(stage) / f"{shard:05d}").exists()

    def mark_done(self, stage: str, shard: int, info: dict | None = None) -> None:
        atomic_write_json(self.state(stage) / f"{shard:05d}", info or {})

    def done_shards(self, stage: str) -> set[int]:
        d = self.state(stage)
        return {int(p.name) for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()

    def clear_stage(self, stage: str) -> None:
        d = self.state(stage)
        if d.is_dir():
            for p in d.iterdir():
                p.unlink()

    # --- run record: what made this run (backbone, weights, random-weight flag, stage timings) ---
    def read_record(self) -> dict:
        return json.loads(self.run_record.read_text()) if self.run_record.exists() else {}

    def update_record(self, **fields) -> dict:
        rec = self.read_record()
        for k, v in fields.items():
            if isinstance(v, dict) and isinstance(rec.get(k), dict):
                rec[k].update(v)
            else:
                rec[k] = v
        atomic_write_json(self.run_record, rec)
        return rec


def list_shards(folder: Path, prefix: str = "shard") -> list[Path]:
    """Final shard files only (never ``.tmp-*``), in shard order."""
    folder = Path(folder)
    return sorted(folder.glob(f"{prefix}-*.parquet")) if folder.is_dir() else []


def shard_index(path: Path) -> int:
    return int(Path(path).stem.split("-")[-1])


def read_tables(paths: Iterable[Path], columns=None) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({})
