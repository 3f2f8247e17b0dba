"""Images in a bucket, read through a real S3 API server on loopback (moto's server mode, what s3fs tests
against): a folder prefix lists like a folder, a manifest of s3:// URIs works, and the masks equal a local run's."""

import json
import os

import pytest

from helpers import TINY, copy_voc_images, mlcseg
from helpers.s3 import S3Server

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server (client, environment a client reaches it with: the standard variables)."""
    server = S3Server()
    server.start()
    yield server.client, server.env
    server.stop()


def test_a_bucket_prefix_is_an_image_folder(s3, tmp_path):
    client, env = s3
    images = copy_voc_images(tmp_path / "images", 3)
    (images / "notes.txt").write_text("not an image")
    client.create_bucket(Bucket="photos")
    for p in sorted(images.iterdir()):
        client.upload_file(str(p), "photos", f"set/{p.name}")
    remote = mlcseg("run", "--images", "s3://photos/set/", "--out", tmp_path / "remote", *TINY, env=env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "1 file(s) skipped" in remote.stderr
    local = mlcseg("run", "--images", images, "--out", tmp_path / "local", *TINY)
    assert local.returncode == 0, local.stderr[-3000:]
    masks = sorted(p.name for p in (tmp_path / "local" / "masks").glob("*.png"))
    assert len(masks) == 3 and masks == sorted(p.name for p in (tmp_path / "remote" / "masks").glob("*.png"))
    for name in masks:
        assert (tmp_path / "remote" / "masks" / name).read_bytes() == (tmp_path / "local" / "masks" / name).read_bytes()

    manifest = tmp_path / "list.csv"  # a manifest of object URIs
    manifest.write_text("uri\n" + "".join(f"s3://photos/set/{n.replace('.png', '.jpg')}\n" for n in masks[:2]))
    res = mlcseg("extract", "--manifest", manifest, "--out", tmp_path / "from_manifest", *TINY, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_missing_bucket_or_prefix_is_one_line_and_creates_nothing(s3, tmp_path):
    _, env = s3
    for uri in ("s3://no-such-bucket/x/", "s3://photos/no-such-prefix/"):
        res = mlcseg("run", "--images", uri, "--out", tmp_path / "run", *TINY, env=env)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and uri in errors[0], res.stderr[-2000:]
        assert not (tmp_path / "run").exists()
    unreachable = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_MAX_ATTEMPTS": "1"}
    res = mlcseg("run", "--images", "s3://photos/set/", "--out", tmp_path / "run", *TINY, env=unreachable, timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 5 and len(errors) == 1, res.stderr[-2000:]
    assert "cannot reach the object store at http://127.0.0.1:1/photos" in errors[0], errors
    assert os.environ.get("AWS_ENDPOINT_URL") is None  # the tests' own environment is untouched


def test_a_remote_manifest_and_a_remote_coco_root_and_annotations(s3, tmp_path, monkeypatch):
    from mlcseg_ray.core.inputs import InputSpec
    from mlcseg_ray.stages.ingest import list_inputs

    client, env = s3
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
    from mlcseg_ray.config import Config
    from mlcseg_ray.pipeline import Pipeline

    client, env = s3
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
