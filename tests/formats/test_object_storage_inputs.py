"""Images in a bucket, read through a real S3 API server on loopback (moto's server mode, what s3fs tests
against): a folder prefix lists like a folder, a manifest of s3:// URIs works, and the masks equal a local run's."""

import json
import os

import pyarrow.parquet as pq
import pytest

from helpers import TINY, copy_voc_images, mlcseg
from helpers.world import BUCKET_PHOTOS, BUCKET_RUN, N_PHOTOS, local_files

pytestmark = pytest.mark.s3


def test_a_bucket_prefix_is_an_image_folder(s3, bucket_run, tiny_run, tmp_path):
    """The session's bucket run read its images from a prefix: the note beside them skipped, as in a folder, and
    the masks those of the same images in a local folder (``tiny_run``)."""
    assert "1 file(s) skipped" in bucket_run.stderr
    assert bucket_run.summary["images"] == N_PHOTOS and bucket_run.summary["failed"] == 0  # the note is no image
    masks = {
        k: v for k, v in s3.objects("runs", BUCKET_RUN.removeprefix("s3://runs/")).items() if k.startswith("masks/")
    }
    local = {k: v for k, v in local_files(tiny_run.out).items() if k.startswith("masks/")}
    assert len(masks) == N_PHOTOS and masks == local

    manifest = tmp_path / "list.csv"  # a manifest of object URIs, and a local run folder
    names = sorted(k.removeprefix("masks/").replace(".png", ".jpg") for k in masks)[:2]
    manifest.write_text("uri\n" + "".join(f"{BUCKET_PHOTOS}{n}\n" for n in names))
    out = tmp_path / "from_manifest"
    res = mlcseg("extract", "--manifest", manifest, "--out", out, *TINY, env=s3.env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert pq.read_table(out / "manifest.parquet").column("image_id").to_pylist() == [n[:-4] for n in names]
    assert len(list((out / "features").glob("shard-*.parquet"))) == 1


def test_a_missing_bucket_or_prefix_is_one_line_and_creates_nothing(s3, bucket_photos, tmp_path):
    env = s3.env
    for uri in ("s3://no-such-bucket/x/", "s3://photos/no-such-prefix/"):
        res = mlcseg("run", "--images", uri, "--out", tmp_path / "run", *TINY, env=env)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and uri in errors[0], res.stderr[-2000:]
        assert not (tmp_path / "run").exists()
    unreachable = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_MAX_ATTEMPTS": "1"}
    res = mlcseg("run", "--images", bucket_photos, "--out", tmp_path / "run", *TINY, env=unreachable, timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 5 and len(errors) == 1, res.stderr[-2000:]
    assert "cannot reach the object store at http://127.0.0.1:1/photos" in errors[0], errors
    assert os.environ.get("AWS_ENDPOINT_URL") is None  # the tests' own environment is untouched


def test_a_remote_manifest_and_a_remote_coco_root_and_annotations(s3, tmp_path, monkeypatch):
    from mlcseg_ray.core.inputs import InputSpec
    from mlcseg_ray.library.listing import list_inputs

    client, env = s3.client, s3.env
    client.create_bucket(Bucket="lists")
    client.put_object(Bucket="lists", Key="m/images.csv", Body=b"uri\ns3://photos/set/a.jpg\nb.jpg\n")
    ann = {"images": [{"id": 7, "file_name": "x/cat.jpg"}, {"id": 9, "file_name": "dog.jpg"}], "annotations": []}
    client.put_object(Bucket="lists", Key="coco/ann.json", Body=json.dumps(ann).encode())
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rows = list_inputs(InputSpec(manifest="s3://lists/m/images.csv"))
    # a relative path in a remote manifest is relative to the manifest's prefix, as for a local one
    assert sorted(r["uri"] for r in rows) == ["s3://lists/m/b.jpg", "s3://photos/set/a.jpg"]
    rows = list_inputs(InputSpec(coco="s3://lists/coco/train/", ann="s3://lists/coco/ann.json"))
    assert [(r["image_id"], r["uri"], r["coco_id"]) for r in rows] == [
        ("dog", "s3://lists/coco/train/dog.jpg", 9),
        ("x/cat", "s3://lists/coco/train/x/cat.jpg", 7),
    ]


def test_the_endpoint_config_key_reaches_the_store_without_the_variables(s3, tmp_path, monkeypatch):
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.pipeline import Pipeline

    client, env = s3.client, s3.env
    images = copy_voc_images(tmp_path / "images", 2)
    client.create_bucket(Bucket="keyed")
    for p in sorted(images.iterdir()):
        client.upload_file(str(p), "keyed", f"in/{p.name}")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, env[k])
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # set, then unset: restored to unset afterwards
        monkeypatch.setenv(k, "unused")
        monkeypatch.delenv(k)
    cfg = Config(s3_endpoint_url=env["AWS_ENDPOINT_URL"], shard_size=1)
    Pipeline("s3://keyed/run", cfg, images="s3://keyed/in/", backend="local").run(["ingest"], print_summary=False)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="keyed", Prefix="run/")["Contents"]]
    assert "run/manifest.parquet" in keys and "run/.lock" not in keys
