"""Images in a bucket, read through a real S3 API server on loopback (moto's server mode, what s3fs tests
against): a folder prefix lists like a folder, a manifest of s3:// URIs works, and the masks equal a local run's."""

import os

import boto3
import pytest
from moto.server import ThreadedMotoServer

from helpers import TINY, copy_voc_images, mlcseg


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server and the environment a client reaches it with (the standard variables)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    yield client, env
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
    assert res.returncode == 2 and "cannot list s3://photos/set/" in res.stderr, res.stderr[-2000:]
    assert os.environ.get("AWS_ENDPOINT_URL") is None  # the tests' own environment is untouched
