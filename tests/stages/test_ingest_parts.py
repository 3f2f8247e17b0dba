"""Ingest fanned out (issue 25): the listing one task per subfolder, the probing one task per chunk of images, each
writing a part of the manifest; the parts merged in id order. The manifest must not depend on how it was cut."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlcseg_ray.core import tables
from mlcseg_ray.core.inputs import InputSpec
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.formats.manifest import manifest_fingerprint, read_manifest
from mlcseg_ray.library import listing as listing_module
from mlcseg_ray.library.listing import ProbeSettings, build_manifest, list_images

MAX_PIXELS = 178_956_970
# top-level files whose ids sort between a subfolder's ("a-b" < "a/..." < "a_c"), an extension clash, nesting
FILES = ["a-b.png", "a/x.png", "a/y/z.png", "a_c.png", "b/x.jpg", "b/x.png", "c/q.png", "d.png", "e/r.png", "notes.txt"]


def save(root, rel, size=(16, 16), colour=0):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 0, 0)).save(root / rel)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for i, rel in enumerate(FILES):
        if rel.endswith(".txt"):
            (root / rel).write_text("not an image")
        else:
            save(root, rel, size=(16 + i, 16), colour=i)
    return root


def build(spec, folder, shard_size=2, chunk=3, **settings):
    run = RunDir(folder)
    built = build_manifest(spec, run, shard_size, ProbeSettings(MAX_PIXELS, 8, chunk=chunk, **settings))
    return run, built


@pytest.mark.parametrize("tasks", [256, 2])  # a task per subfolder, or several subfolders a task
def test_the_listing_fanned_out_per_subfolder_is_the_whole_folders_sorted(folder, tasks, monkeypatch):
    monkeypatch.setattr(listing_module, "LIST_TASKS", tasks)
    listing = list_images(InputSpec(images=str(folder)))
    ids = listing.table.column("image_id").to_pylist()
    assert ids == ["a-b", "a/x", "a/y/z", "a_c", "b/x_jpg", "b/x_png", "c/q", "d", "e/r"]
    assert ids == sorted(ids)
    assert listing.table.column("uri").to_pylist()[2] == str(folder / "a/y/z.png")
    assert listing.skipped == {"count": 1, "by_extension": {".txt": 1}, "files": ["notes.txt"], "damaged": []}


def test_a_manifest_probed_in_parts_has_the_bytes_of_one_probed_whole(folder, tmp_path):
    spec = InputSpec(images=str(folder))
    small, built = build(spec, tmp_path / "small", chunk=2)
    whole, _ = build(spec, tmp_path / "whole", chunk=4096)
    assert small.manifest.read_bytes() == whole.manifest.read_bytes()
    assert built["images"] == 9 and built["errors"] == 0 and built["changed"]
    assert built["fingerprint"] == manifest_fingerprint(small.manifest)
    table = read_manifest(small.manifest)
    assert table.column("shard").to_pylist() == [i // 2 for i in range(9)]
    assert table.column("width").to_pylist()[:2] == [16, 17]  # each image's own header
    assert not small.manifest_parts.exists()  # the parts are gone once merged


def test_a_rerun_keeps_known_shards_numbers_new_images_after_the_last_and_reads_only_them(
    folder, tmp_path, monkeypatch
):
    spec = InputSpec(images=str(folder))
    run, _ = build(spec, tmp_path / "run")
    before = {r["image_id"]: r for r in read_manifest(run.manifest).to_pylist()}
    for rel in ("a/aa.png", "m/new.png", "zz.png"):
        save(folder, rel, colour=200)
    (folder / "c/q.png").unlink()
    read = []
    real = listing_module.read_bytes
    monkeypatch.setattr(listing_module, "read_bytes", lambda uri: read.append(uri) or real(uri))

    _, built = build(spec, tmp_path / "run", previous=str(run.manifest), keep_shards=True)
    after = {r["image_id"]: r for r in read_manifest(run.manifest).to_pylist()}

    assert sorted(read) == sorted(str(folder / rel) for rel in ("a/aa.png", "m/new.png", "zz.png"))
    assert built["changed"] and set(after) == (set(before) - {"c/q"}) | {"a/aa", "m/new", "zz"}
    last = max(r["shard"] for r in before.values())
    for image_id, row in before.items():
        if image_id != "c/q":
            assert after[image_id] == row  # its shard, and its probe, unchanged
    assert [after[i]["shard"] for i in ("a/aa", "m/new", "zz")] == [last + 1, last + 1, last + 2]


def test_an_unchanged_rerun_keeps_the_manifest_file(folder, tmp_path):
    spec = InputSpec(images=str(folder))
    run, _ = build(spec, tmp_path / "run")
    stamp = os.stat(run.manifest).st_mtime_ns
    _, built = build(spec, tmp_path / "run", previous=str(run.manifest), keep_shards=True, chunk=4)
    assert not built["changed"] and os.stat(run.manifest).st_mtime_ns == stamp
    assert not run.manifest_parts.exists()


def test_rows_between_reads_the_range_from_the_groups_that_can_hold_it(tmp_path):
    path = tmp_path / "t.parquet"
    ids = [f"{i:03d}" for i in range(20)]
    pq.write_table(pa.table({"image_id": ids, "n": list(range(20))}), path, row_group_size=4)
    got = tables.rows_between(path, "image_id", "005", "013")
    assert got.column("n").to_pylist() == list(range(5, 14))
    assert tables.rows_between(path, "image_id", "0055", "0057").num_rows == 0
    assert tables.rows_where(path, "image_id", "007")[1] == [7]


def test_a_folder_without_subfolders_is_listed_on_the_driver(tmp_path):
    for i in range(3):
        save(tmp_path, f"{i}.png")
    listing = list_images(InputSpec(images=str(tmp_path)))
    assert listing.table.column("image_id").to_pylist() == ["0", "1", "2"]
