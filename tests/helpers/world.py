"""The test session's one world (issue 39): what many tests read is built once and shared, read-only. A test that
changes a shared run copies it first.

- ``cluster``: one ``ray start --head`` on loopback with Ray's defaults (token authentication on), for the tests
  that join a cluster (``--address``), submit jobs, or only need a run made (whatever the backend, the bytes are
  the same). Tests whose subject is the embedded Ray or a process's death start their own.
- ``s3``: one loopback S3 API server (moto's server mode) with the photos in ``s3://photos/set/``.
- ``photos``: four VOC photos and a note (a file that is not an image), as a folder.
- ``tiny_run``: ``mlcseg run`` over ``photos`` with the tiny config, one image a shard, joined to ``cluster``.
- ``bucket_run``: the same run with its images and its run folder in the bucket, on an embedded Ray.

``cluster``, ``photos`` and ``tiny_run`` are made once for the whole session, whatever the number of xdist
workers: the first worker that asks makes them, under a file lock in the session's world folder, and records them
there for the others (:func:`made_once`); the head is ended when the session ends. The fixtures themselves are in
``tests/conftest.py``; this module builds what they hold.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from helpers import TINY, copy_voc_images, mlcseg

N_PHOTOS = 4
RUN_CONFIG = [*TINY, "shard_size=1"]  # one image a shard: runs can be caught between shards
BUCKET_PHOTOS = "s3://photos/set/"
BUCKET_RUN = "s3://runs/shared"


@dataclass(frozen=True)
class Made:
    """A run the session made: where it is and what the command said."""

    out: str
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        return json.loads(self.stdout)


def make_photos(folder: Path) -> Path:
    copy_voc_images(folder, N_PHOTOS)
    (folder / "notes.txt").write_text("not an image")
    return folder


def make_run(images, out, *extra, env=None) -> Made:
    res = mlcseg("run", "--images", images, "--out", out, *RUN_CONFIG, "--json", *extra, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return Made(str(out), res.stdout, res.stderr)


def made_once(world: Path, name: str, make: Callable[[], dict]) -> dict:
    """What ``make()`` returns (a JSON object), made by the first of the session's processes that asks and read
    by the others from ``world/NAME.json``."""
    record = world / f"{name}.json"
    with FileLock(world / f"{name}.lock"):
        if not record.exists():
            made = make()
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(made))
            os.replace(tmp, record)
        return json.loads(record.read_text())


def local_files(run: str | Path) -> dict[str, bytes]:
    """Every file of a local run folder, by path relative to it."""
    run = Path(run)
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# Files a run writes whose bytes hold no path or backend: runs of the same images and config agree on every one
SAME_BYTES = ("masks/", "binary/", "pseudo/", "features/", "levels/", "regions.parquet", "regions/")


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith(SAME_BYTES)}
