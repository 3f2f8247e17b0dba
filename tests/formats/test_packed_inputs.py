"""Datasets as they ship past COCO (issue 42): WebDataset tar shards and Parquet image columns, read where they lie.

The VOC photos are packed here, by the tests themselves: into tars of 8 (plain and gzipped, each photo with a JSON
beside it, as WebDataset samples have) and into Parquet files of the Hugging Face ``{bytes, path}`` struct. Their
runs must give the bytes a folder run gives; a changed tar redoes only its shards; every kind of bad input ends as
an error row or a skipped count that says why.
"""

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import TINY_CONFIG, VOC_SUBSET, mlcseg, need
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.inputs import InputSpec
from mlcseg_ray.formats.images import read_bytes
from mlcseg_ray.library.listing import list_images
from mlcseg_ray.pipeline import Pipeline

PER_TAR = 8
CONFIG = {**TINY_CONFIG, "shard_size": PER_TAR}  # a shard holds one tar's photos: a changed tar is one shard


def pack_tars(photos: list[Path], folder: Path, per_tar: int = PER_TAR, gzip_every: int = 2) -> Path:
    """``photos`` as WebDataset samples (``KEY.jpg`` and ``KEY.json``), ``per_tar`` a tar; every ``gzip_every``-th
    tar gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(range(0, len(photos), per_tar)):
        gz = gzip_every and n % gzip_every == 1
        with tarfile.open(folder / f"part-{n:03d}.tar{'.gz' if gz else ''}", "w:gz" if gz else "w") as tar:
            for p in photos[i : i + per_tar]:
                tar.add(p, arcname=p.name)
                add_member(tar, f"{p.stem}.json", json.dumps({"source": p.name}).encode())
    return folder


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack_parquet(photos: list[Path], file: Path, group_rows: int = 10) -> Path:
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in photos]
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"label": list(range(len(rows))), "image": rows}), file, row_group_size=group_rows)
    return file


def outputs(run: Path) -> dict[str, str]:
    """What must not depend on how the images were packed: every mask and binary mask, and the COCO annotations."""
    digests = {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*.png")}
    coco = json.loads((run / "pseudo_labels.json").read_text())
    digests["annotations"] = hashlib.sha256(json.dumps(coco["annotations"]).encode()).hexdigest()
    return digests


def run_local(out: Path, **inputs) -> Path:
    Pipeline(out, Config(**CONFIG), backend="local", **inputs).run(print_summary=False)
    return out


@pytest.fixture(scope="module")
def voc_photos():
    return sorted((need(VOC_SUBSET) / "JPEGImages").glob("*.jpg"))


@pytest.fixture(scope="module")
def packed_runs(voc_photos, tmp_path_factory):
    """The 59 VOC photos run as a folder, as tars of 8 (half of them gzipped) and as two Parquet files."""
    work = tmp_path_factory.mktemp("packed")
    tars = pack_tars(voc_photos, work / "tars")
    hub = work / "hub"
    pack_parquet(voc_photos[:30], hub / "train-00000-of-00002.parquet")
    pack_parquet(voc_photos[30:], hub / "train-00001-of-00002.parquet")
    return {
        "tars": tars,
        "folder": run_local(work / "folder", images=str(voc_photos[0].parent)),
        "tar": run_local(work / "tar", webdataset=str(tars)),
        "parquet": run_local(work / "parquet", parquet=str(hub)),
    }


def test_tars_and_parquet_give_the_folder_runs_bytes(packed_runs, voc_photos):
    folder = outputs(packed_runs["folder"])
    assert len(folder) == 2 * len(voc_photos) + 1  # a binary and a class mask each, and the annotations
    assert outputs(packed_runs["tar"]) == folder
    assert outputs(packed_runs["parquet"]) == folder
    manifest = pq.read_table(packed_runs["tar"] / "manifest.parquet").to_pylist()
    assert [r["image_id"] for r in manifest] == [p.stem for p in voc_photos]
    # each image's URI says where it lies: its tar, its data's offset and size, its member name
    first = manifest[0]
    assert first["uri"].startswith(f"{packed_runs['tars']}/part-000.tar#") and first["uri"].endswith(
        f"/{voc_photos[0].name}"
    )
    assert read_bytes(first["uri"]) == voc_photos[0].read_bytes()
    gz = next(r for r in manifest if ".tar.gz#" in r["uri"])
    assert read_bytes(gz["uri"]) == (voc_photos[0].parent / f"{gz['image_id']}.jpg").read_bytes()
    record = json.loads((packed_runs["tar"] / "run.json").read_text())
    assert record["skipped_files"]["by_extension"] == {".json": len(voc_photos)}  # the samples' other members


def test_a_changed_tar_redoes_only_its_shards(packed_runs, voc_photos, tmp_path, caplog):
    """Each tar's index is kept in the run folder: a rerun reads only the tar that changed, and every stage redoes
    only the shard of its photos."""
    import shutil

    tars = tmp_path / "tars"
    shutil.copytree(packed_runs["tars"], tars)
    run = tmp_path / "run"
    frozen = Config(**CONFIG, refit=False)
    Pipeline(run, frozen, backend="local", webdataset=str(tars)).run(print_summary=False)
    features = {p.name: p.stat().st_mtime_ns for p in (run / "features").glob("shard-*.parquet")}
    masks = {p.name: p.read_bytes() for p in (run / "masks").glob("*.png")}

    changed = voc_photos[PER_TAR * 2 : PER_TAR * 3]  # part-002.tar: its first photo now upside down
    flipped = tmp_path / changed[0].name
    from PIL import Image

    Image.open(changed[0]).transpose(Image.Transpose.ROTATE_180).save(flipped, quality=90)
    with tarfile.open(tars / "part-002.tar", "w") as tar:
        for p in [flipped, *changed[1:]]:
            tar.add(p, arcname=p.name)
            add_member(tar, f"{p.stem}.json", b"{}")
    with caplog.at_level(logging.INFO, logger="mlcseg_ray"):
        Pipeline(run, frozen, backend="local", webdataset=str(tars)).run(print_summary=False)
    log = caplog.text
    n_tars = len(features)
    assert f"ingest: 1 of {n_tars} container(s) read" in log
    assert f"extract: 1 of {n_tars} shards new or changed" in log, log
    after = {p.name: p.stat().st_mtime_ns for p in (run / "features").glob("shard-*.parquet")}
    assert [k for k in features if after[k] != features[k]] == ["shard-00002.parquet"]
    new_masks = {p.name: p.read_bytes() for p in (run / "masks").glob("*.png")}
    moved = sorted(k for k in masks if new_masks[k] != masks[k])
    assert moved and set(moved) <= {f"{p.stem}.png" for p in changed}  # frozen: no other image moves


def bad_tars(folder: Path, photos: list[Path]) -> Path:
    """Tars with every kind of trouble, beside a good one."""
    folder.mkdir()
    with tarfile.open(folder / "a-good.tar", "w") as tar:
        tar.add(photos[0], arcname=photos[0].name)
        tar.add(photos[1], arcname=f"sub/dir/{photos[1].name}")  # a member in a subfolder
        add_member(tar, "notes.txt", b"not an image")
        add_member(tar, "broken.jpg", b"\xff\xd8 not a jpeg")  # a corrupt member
        add_member(tar, "../escape.jpg", photos[2].read_bytes())  # a name that leaves the run folder
        add_member(tar, "twice.jpg", photos[3].read_bytes())
        add_member(tar, "twice.png", photos[4].read_bytes())  # the same key again, in the same sample
    with tarfile.open(folder / "b-dup.tar", "w") as tar:
        add_member(tar, photos[0].name, photos[5].read_bytes())  # a key the first tar has
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        tar.add(photos[6], arcname=photos[6].name)
        tar.add(photos[7], arcname=photos[7].name)
    data = whole.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmembers()[1].offset_data + 1000  # inside the second member's data
    (folder / "c-truncated.tar").write_bytes(data[:cut])
    (folder / "d-not-a-tar.tar").write_bytes(b"plain text, no tar at all" * 40)
    return folder


def test_bad_tars_end_as_error_rows_and_skipped_counts(voc_photos, tmp_path):
    from mlcseg_ray.library.containers import IndexSettings

    tars = bad_tars(tmp_path / "tars", voc_photos)
    listing = list_images(InputSpec(webdataset=str(tars)), indexing=IndexSettings(max_pixels=10**9, min_side=8))
    rows = {r["image_id"]: r for r in listing.table.to_pylist()}
    ok = sorted(i for i, r in rows.items() if r["status"] == "ok")
    assert ok == sorted([voc_photos[0].stem, f"sub/dir/{voc_photos[1].stem}", "twice", voc_photos[6].stem])
    errors = {i: r["error"] for i, r in rows.items() if r["status"] == "error"}
    assert "not an image" in errors["broken"]
    assert "'..'" in errors["../escape"]  # never a path: an error row that says why
    assert errors["twice (duplicate 2)"].startswith("duplicate key 'twice': a-good.tar:twice.jpg has it first")
    assert errors[f"{voc_photos[0].stem} (duplicate 2)"].startswith(f"duplicate key '{voc_photos[0].stem}'")
    assert "ends early" in errors[voc_photos[7].stem]
    assert len(rows) == len(ok) + len(errors) == 9
    skipped = listing.skipped
    assert skipped["by_extension"] == {".txt": 1} and skipped["files"] == ["a-good.tar:notes.txt"]
    assert [d.split(": ", 1)[0].rsplit("/", 1)[-1] for d in skipped["damaged"]] == [
        "c-truncated.tar",
        "d-not-a-tar.tar",
    ]


def test_parquet_rows_ids_columns_and_bad_rows(voc_photos, tmp_path):
    from mlcseg_ray.library.containers import IndexSettings

    settings = IndexSettings(max_pixels=10**9, min_side=8)
    plain = tmp_path / "plain.parquet"  # a bytes column and an id column, one of its rows null
    images = [voc_photos[0].read_bytes(), None, voc_photos[1].read_bytes()]
    pq.write_table(pa.table({"key": ["x/a", "x/b", "x/c"], "jpg": pa.array(images, pa.binary())}), plain)
    rows = list_images(InputSpec(parquet=str(plain)), indexing=settings).table.to_pylist()
    assert [(r["image_id"], r["status"]) for r in rows] == [("x/a", "ok"), ("x/b", "error"), ("x/c", "ok")]
    assert rows[1]["error"] == "the row's image bytes are null"
    assert read_bytes(rows[2]["uri"]) == images[2]

    nameless = tmp_path / "nameless.parquet"  # no id column, no paths: the file and the row number
    pq.write_table(pa.table({"pixels": pa.array(images[:1], pa.binary())}), nameless)
    rows = list_images(InputSpec(parquet=str(nameless)), indexing=settings).table.to_pylist()
    assert [r["image_id"] for r in rows] == ["nameless/00000000"]
    rows = list_images(InputSpec(parquet=str(plain), id_column="key", image_column="jpg"), indexing=settings)
    assert rows.table.num_rows == 3
    with pytest.raises(ValueError, match="no column 'nope'"):
        list_images(InputSpec(parquet=str(plain), image_column="nope"), indexing=settings)
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), text)
    with pytest.raises(ValueError, match="no image column"):
        list_images(InputSpec(parquet=str(text)), indexing=settings)


def test_the_cli_takes_tars_by_pattern_and_says_what_it_skipped(voc_photos, tmp_path, cluster):
    """``--webdataset`` with a brace pattern naming one tar that is not there: the others run, and ``mlcseg
    errors`` names what could not be read; ``--parquet`` without an image column is one line, exit 2."""
    tars = pack_tars(voc_photos[:6], tmp_path / "tars", per_tar=3, gzip_every=0)
    with tarfile.open(tars / "part-000.tar", "a") as tar:  # a member name that would drive the terminal
        add_member(tar, "note.j\x1b[31mg", b"not an image")
    out = tmp_path / "run"
    pattern = f"{tars}/part-{{000..002}}.tar"
    config = [f"{k}={v}" for k, v in CONFIG.items()]
    res = mlcseg(
        "extract", "--webdataset", pattern, "--out", out, *config, "--address", cluster.address, env=cluster.env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "could not read to its end" in res.stderr and "part-002.tar: not found" in res.stderr
    assert "\x1b" not in res.stderr and "\\x1b" in res.stderr  # the name shown, escaped
    assert pq.read_table(out / "manifest.parquet").num_rows == 6
    res = mlcseg("errors", out)
    assert "part-002.tar: not found" in res.stdout and "\x1b" not in res.stdout
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), text)
    res = mlcseg("extract", "--parquet", text, "--out", tmp_path / "run2", *config)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "no image column" in errors[0], res.stderr[-2000:]


@pytest.mark.s3
def test_tars_and_parquet_in_a_bucket_one_read_per_tar_at_ingest(s3, voc_photos, tmp_path, monkeypatch):
    """Tars and a Parquet file on the loopback S3 server, read through a counting proxy: ingest reads each tar once
    (a HEAD and one GET), extraction each image once (one ranged GET, never the whole tar); the masks are a local
    run's."""
    import s3fs

    from helpers.s3 import FlakyProxy

    photos = voc_photos[:24]
    tars = pack_tars(photos, tmp_path / "tars")  # part-001 gzipped
    pack_parquet(photos, tmp_path / "hub" / "train.parquet", group_rows=8)
    s3.client.create_bucket(Bucket="packed")
    s3.upload(tars, "packed", "tars")
    s3.upload(tmp_path / "hub", "packed", "hub")
    local = outputs(run_local(tmp_path / "local", webdataset=str(tars)))
    assert len(local) == 2 * len(photos) + 1  # every image has its masks (none failed)

    with FlakyProxy(s3.port, every=0) as proxy:
        for k, v in {**s3.env, "AWS_ENDPOINT_URL": proxy.url}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # a client made for another endpoint is not reused
        try:
            out = tmp_path / "bucket"
            pipeline = Pipeline(out, Config(**CONFIG), backend="local", webdataset="s3://packed/tars/")
            pipeline.run(["ingest"], print_summary=False)
            ingest = list(proxy.log)
            pipeline.run(["extract"], print_summary=False)
            extract = proxy.log[len(ingest) :]
            pipeline.run(print_summary=False)
            hub = Pipeline(tmp_path / "hub_run", Config(**CONFIG), backend="local", parquet="s3://packed/hub/")
            hub.run(print_summary=False)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert outputs(out) == local
    assert outputs(tmp_path / "hub_run") == local

    def read_of(log, name):  # the bytes of tar ``name`` each GET asked for
        got = []
        for method, path, ranged in log:
            if method == "GET" and path == f"/packed/tars/{name}":
                first, last = (int(v) for v in ranged.removeprefix("bytes=").split("-"))
                got.append(last + 1 - first)
        return got

    for tar in tars.iterdir():  # ingest: each tar streamed once, start to end
        assert sum(read_of(ingest, tar.name)) == tar.stat().st_size
    assert sum(m == "HEAD" for m, _, _ in ingest) <= 2 * len(list(tars.iterdir()))  # a stat, and s3fs's on opening
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    for tar in tars.iterdir():  # extraction: a plain tar's images one ranged GET each; a gzipped tar streamed once
        members = [r for r in manifest if r["uri"].startswith(f"s3://packed/tars/{tar.name}#")]
        if tar.name.endswith(".gz"):
            assert sum(read_of(extract, tar.name)) == tar.stat().st_size
        else:
            assert sorted(read_of(extract, tar.name)) == sorted(512 + r["bytes"] for r in members)


def test_a_rewritten_container_is_read_afresh_in_the_same_process(voc_photos, tmp_path):
    """A gzipped tar and a Parquet file stay open between reads (a shard's images lie next to each other); one
    rewritten since is read anew, not from what was kept."""
    import os

    first, second = voc_photos[0], voc_photos[1]
    tar, table = tmp_path / "one.tar.gz", tmp_path / "one.parquet"

    def write(photo: Path, mtime_s: int) -> list[str]:
        with tarfile.open(tar, "w:gz") as t:
            t.add(photo, arcname="a.jpg")
        pq.write_table(pa.table({"image": pa.array([photo.read_bytes()], pa.binary())}), table)
        for f in (tar, table):
            os.utime(f, (mtime_s, mtime_s))
        specs = (InputSpec(webdataset=str(tar)), InputSpec(parquet=str(table)))
        return [list_images(spec).table.column("uri")[0].as_py() for spec in specs]

    for uri in write(first, 1_000_000):
        assert read_bytes(uri) == first.read_bytes()
    for uri in write(second, 2_000_000):
        assert read_bytes(uri) == second.read_bytes()


def test_exports_write_the_images_out_of_their_containers(packed_runs, voc_photos, tmp_path):
    """A COCO export with ``--copy-images`` and the Hugging Face export hold each image's own bytes, named by id."""
    from mlcseg_ray.core.run_dir import RunDir
    from mlcseg_ray.library.exports import export_run

    by_name = {p.name: p.read_bytes() for p in voc_photos}
    for run in ("tar", "parquet"):
        out = tmp_path / run
        export_run(RunDir(packed_runs[run]), "coco", str(out), copy_images=True)
        copied = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
        assert copied == by_name
        coco = json.loads((out / "annotations" / "instances_pseudo.json").read_text())
        assert sorted(im["file_name"] for im in coco["images"]) == sorted(by_name)
    export_run(RunDir(packed_runs["tar"]), "hf", str(tmp_path / "hf"))
    rows = [r for f in sorted((tmp_path / "hf" / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == len(voc_photos) and all(r["image"]["bytes"] == by_name[r["image"]["path"]] for r in rows)
