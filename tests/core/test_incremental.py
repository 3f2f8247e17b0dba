"""Adding, touching or removing images redoes the extraction of just the shards they are in: an image keeps its
shard (and its features) across reruns; the global levels and everything after them are recomputed, and come out
as a fresh run over the same images does."""

import logging
import os
import shutil

import pyarrow.parquet as pq

from helpers import TINY_CONFIG, VOC_SUBSET, need
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.pipeline import STAGES, Pipeline

ALL = [s.name for s in STAGES if s.name != "evaluate"]
CFG = Config(**TINY_CONFIG, shard_size=2)


def _masks(run: RunDir) -> dict:
    return {f"{d.name}/{p.name}": p.read_bytes() for d in (run.binary, run.masks) for p in sorted(d.glob("*.png"))}


def _run(root, images, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlcseg_ray"):
        Pipeline(root, CFG, backend="local", images=str(images)).run(ALL, print_summary=False)
    return caplog.text


def _extract_markers(run: RunDir) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(run.state("extract").glob("[0-9]*"))}


def test_new_touched_and_removed_images_redo_only_their_shards(tmp_path, caplog):
    photos = sorted((need(VOC_SUBSET) / "JPEGImages").glob("*.jpg"))
    images = tmp_path / "images"
    images.mkdir()
    for p in photos[:4]:
        shutil.copy(p, images / p.name)
    run = RunDir(tmp_path / "run")
    _run(run.root, images, caplog)
    before = _extract_markers(run)
    assert list(before) == ["00000", "00001"]

    shutil.copy(photos[4], images / photos[4].name)  # a new image: a new shard, the others kept
    text = _run(run.root, images, caplog)
    assert "extract: 1 of 3 shards new or changed; the others kept" in text
    assert "cluster: stale (extract changed); recomputing" in text
    after = _extract_markers(run)
    assert {k: after[k] for k in before} == before and "00002" in after
    manifest = pq.read_table(run.manifest).to_pylist()
    assert {r["image_id"]: r["shard"] for r in manifest}[photos[4].stem] == 2

    fresh = RunDir(tmp_path / "fresh")  # the same five images in one go: the same masks
    _run(fresh.root, images, caplog)
    assert _masks(run) == _masks(fresh)

    touched = images / photos[0].name  # a changed file: its shard alone
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    marks = _extract_markers(run)
    text = _run(run.root, images, caplog)
    assert "extract: 1 of 3 shards new or changed; the others kept" in text
    now = _extract_markers(run)
    assert now["00000"] != marks["00000"] and now["00001"] == marks["00001"] and now["00002"] == marks["00002"]

    for p in photos[2:4]:  # shard 1 loses both its images: its features and marker go
        (images / p.name).unlink()
    _run(run.root, images, caplog)
    assert sorted(_extract_markers(run)) == ["00000", "00002"]
    assert not run.feature_shard(1).exists() and not run.image_table(1).exists()
    assert len(list(run.masks.glob("*.png"))) == 3
