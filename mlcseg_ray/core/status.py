"""Each image's status (``status.parquet``): ingest's row of every image, with what the stages' shard markers say
of it. Written once per command by the executor; read through ``RunDir``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pyarrow as pa

from .run_dir import STATUS_SCHEMA, RunDir, list_shards, shard_index
from .storage import read_json
from .tables import iter_batches, read_table


def write_status(run: RunDir, stages: list[tuple[str, str]]) -> None:
    """``status.parquet``: every image once, ok or the first stage's error, its flag (empty/full mask, or below
    ``min_confidence``) and its confidence: what the stages' markers say (a later stage's flag wins). Built a
    batch of the manifest at a time (its order: by image id), each shard's markers read once while its images
    come (a few shards at a time: the driver never holds every row)."""
    verdicts = functools.lru_cache(maxsize=256)(functools.partial(shard_verdicts, run, stages))
    run.write_status(status_rows(batch, verdicts) for batch in image_batches(run))


def image_batches(run: RunDir) -> Iterator[list[dict]]:
    """Every image's (image_id, uri, status, error, shard) as ingest saw it, a batch at a time: the manifest's
    batches, or for a brought-in store its image tables shard by shard."""
    columns = ["image_id", "uri", "status", "error", "shard"]
    if run.manifest.exists():
        yield from (b.to_pylist() for b in iter_batches(run.manifest, columns=columns))
        return
    for p in list_shards(run.image_tables):
        rows = read_table(p, columns=columns[:-1]).to_pylist()
        yield sorted(({**r, "shard": shard_index(p)} for r in rows), key=lambda r: r["image_id"])


def shard_verdicts(run: RunDir, stages: list[tuple[str, str]], shard: int) -> dict[str, dict]:
    """Per image of a shard, what the current markers of ``stages`` (name, fingerprint; in stage order) say of it:
    the first stage that failed it, the last flag and confidence given."""
    out: dict[str, dict] = {}
    for name, fp in stages:
        m = read_json(run.marker(name, shard)) or {}
        if m.get("fingerprint") != fp:
            continue
        for image_id, err in m.get("errors", {}).items():
            out.setdefault(image_id, {}).setdefault("failed", (name, err))
        for image_id, flag in m.get("flags", {}).items():
            out.setdefault(image_id, {})["flag"] = flag
        for image_id, confidence in m.get("confidence", {}).items():
            out.setdefault(image_id, {})["confidence"] = confidence
    return out


def status_rows(batch: list[dict], verdicts: Callable[[int], dict[str, dict]]) -> pa.Table:
    """Ingest's rows of some images, with what the stages said of each: ``status.parquet``'s rows."""
    for r in batch:
        said = verdicts(r.pop("shard")).get(r["image_id"], {})
        r.update(stage="ingest" if r["status"] != "ok" else None, flag=said.get("flag"))
        r["confidence"] = said.get("confidence")
        if r["status"] == "ok" and "failed" in said:
            r.update(status="error", stage=said["failed"][0], error=said["failed"][1])
    return pa.Table.from_pylist(batch, schema=STATUS_SCHEMA)
