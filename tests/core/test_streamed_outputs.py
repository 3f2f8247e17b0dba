"""The run-wide tables written as streams (issue 25): ``status.parquet`` built a batch of the manifest at a time
equals the one built from every row at once, the manifest's fingerprint streamed equals the in-memory digest, and a
streamed Parquet file's bytes depend on its rows, not on how the stream was cut."""

import functools
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import TINY_CONFIG, copy_voc_images
from mlcseg_ray.core import run_dir, tables
from mlcseg_ray.core import status as status_module
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.fingerprint import digest
from mlcseg_ray.core.run_dir import STATUS_SCHEMA, RunDir
from mlcseg_ray.formats.manifest import MANIFEST_SCHEMA, manifest_fingerprint, write_manifest
from mlcseg_ray.pipeline import Pipeline


def _status_from_every_row(run: RunDir, order: list[str]) -> list[dict]:
    """The status as it was built before it was streamed: every manifest row in a dict, every marker applied."""
    rows = {
        r["image_id"]: {
            "image_id": r["image_id"],
            "uri": r["uri"],
            "status": r["status"],
            "stage": "ingest" if r["status"] != "ok" else None,
            "error": r["error"],
            "flag": None,
            "confidence": None,
        }
        for r in pq.read_table(run.manifest).to_pylist()
    }
    for name in order:
        record = run.stage_record(name)
        if not record.exists():
            continue
        rec = json.loads(record.read_text())
        for marker in sorted(p for p in run.state(name).iterdir() if p.name.isdigit()):
            m = json.loads(marker.read_text())
            if m.get("fingerprint") != rec.get("marker_fingerprint", rec.get("fingerprint")):
                continue
            for image_id, err in m.get("errors", {}).items():
                if rows[image_id]["status"] == "ok":
                    rows[image_id].update(status="error", error=err, stage=name)
            for image_id, flag in m.get("flags", {}).items():
                rows[image_id]["flag"] = flag
            for image_id, c in m.get("confidence", {}).items():
                rows[image_id]["confidence"] = c
    return pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=STATUS_SCHEMA).to_pylist()


def test_the_status_streamed_equals_the_one_built_from_every_row(tmp_path, monkeypatch):
    images = copy_voc_images(tmp_path / "images", 5)
    photos = sorted(images.glob("*.jpg"))
    (images / "2007_000000_text.jpg").write_text("not a picture\n")  # an ingest error
    (images / "2007_000001_cut.jpg").write_bytes(photos[1].read_bytes()[:3000])  # a header that reads, data cut
    # batches of 2 manifest rows and row groups of 3: every image crosses a batch or a group boundary somewhere
    monkeypatch.setattr(status_module, "iter_batches", functools.partial(tables.iter_batches, batch_size=2))
    monkeypatch.setattr(run_dir, "STATUS_GROUP_ROWS", 3)
    cfg = Config(**TINY_CONFIG, shard_size=2)
    pipe = Pipeline(tmp_path / "run", cfg, images=str(images), backend="local")
    pipe.run()
    for p in photos[:2]:  # new images whose ids fall between the old ones: a new shard
        shutil.copy(p, images / f"{p.stem}b.jpg")
    pipe = Pipeline(tmp_path / "run", cfg, images=str(images), backend="local")
    pipe.run()

    run = RunDir(tmp_path / "run")
    manifest = pq.read_table(run.manifest).to_pylist()
    shards = [r["shard"] for r in manifest]
    assert shards != sorted(shards)  # the new shard's images interleave with the old ones in id order
    status = run.read_status()
    assert status == _status_from_every_row(run, pipe.executor.order)
    by_id = {r["image_id"]: r for r in status}
    assert by_id["2007_000000_text"]["stage"] == "ingest" and by_id["2007_000001_cut"]["stage"] == "extract"
    assert sum(r["confidence"] is not None for r in status) == len(status) - 2
    assert [pq.ParquetFile(run.status).metadata.row_group(i).num_rows for i in range(3)] == [3, 3, 3]

    summary = run.status_summary(examples=1)
    assert (summary.images, summary.failed, len(summary.failed_rows)) == (9, 2, 1)
    assert sum(summary.reasons.values()) == 2 and {s for s, _ in summary.reasons} == {"ingest", "extract"}
    assert {r["image_id"] for r in run.read_status(problems_only=True)} >= {"2007_000000_text", "2007_000001_cut"}


def test_a_streamed_files_bytes_depend_on_its_rows_not_on_how_the_stream_was_cut(tmp_path):
    rows = pa.Table.from_pylist(
        [{"image_id": f"im{i:02d}", "uri": f"/x/im{i}.jpg", "status": "ok"} for i in range(10)], schema=STATUS_SCHEMA
    )
    cuts = {"one": [10], "three": [3, 3, 4], "singles": [1] * 10, "empty parts": [0, 5, 0, 5, 0]}
    written = {}
    for name, sizes in cuts.items():
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = (rows.slice(s, n) for s, n in zip(starts, sizes, strict=True))
        tables.atomic_write_tables(tmp_path / name, STATUS_SCHEMA, parts, 4)
        written[name] = (tmp_path / name).read_bytes()
    assert len(set(written.values())) == 1
    meta = pq.ParquetFile(tmp_path / "one").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    assert pq.read_table(tmp_path / "one").equals(rows)
    tables.atomic_write_tables(tmp_path / "none", STATUS_SCHEMA, iter(()), 4)  # no rows: a valid empty table
    assert pq.read_table(tmp_path / "none").schema.equals(STATUS_SCHEMA) and not pq.read_table(tmp_path / "none")


def test_the_manifests_fingerprint_streamed_equals_the_in_memory_digest(tmp_path):
    n = 70_000  # more than one batch of 65,536 rows
    table = pa.Table.from_pylist(
        [
            {
                "image_id": f"dir/é{i:06d}",
                "uri": f"s3://bucket/dir/é{i:06d}.jpg",
                "width": i % 640 or None,
                "height": 480,
                "bytes": 10_000 + i,
                "mtime_ns": 1_700_000_000_000_000_000 + i,
                "content_hash": None if i % 3 else f"{i:016x}",
                "status": "ok" if i % 97 else "error",
                "error": None if i % 97 else 'not an image: "quoted"\n',
                "shard": i // 64,
                "coco_id": None,
            }
            for i in range(n)
        ],
        schema=MANIFEST_SCHEMA,
    )
    pq.write_table(table, tmp_path / "manifest.parquet")
    assert manifest_fingerprint(tmp_path / "manifest.parquet") == digest(table.to_pydict())
    # ingest's layout (row groups of 4,096 rows, so a shard's read touches one or two) is not part of its identity
    write_manifest(tmp_path / "grouped.parquet", table)
    groups = pq.ParquetFile(tmp_path / "grouped.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [4096] * 17 + [70_000 - 17 * 4096]
    assert manifest_fingerprint(tmp_path / "grouped.parquet") == manifest_fingerprint(tmp_path / "manifest.parquet")
    changed = table.set_column(2, "width", pa.array([1] * n, pa.int32()))
    pq.write_table(changed, tmp_path / "changed.parquet")
    assert manifest_fingerprint(tmp_path / "changed.parquet") != manifest_fingerprint(tmp_path / "manifest.parquet")
