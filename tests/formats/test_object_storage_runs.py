"""A whole run with its images and its run folder in a bucket, against a real S3 API server on loopback (moto's
server mode): the same bytes as a local run, resume, reruns, the lock, the store going away and coming back, a
killed driver, and each storage mistake as one line."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import psutil
import pytest

from helpers import MLCSEG, TINY, VOC_MASKS, mlcseg, need
from helpers.ray_head import end, kill_driver, started_under
from helpers.world import BUCKET_RUN, N_PHOTOS, RUN_CONFIG, comparable, local_files

pytestmark = [pytest.mark.s3, pytest.mark.slow]

CONFIG = RUN_CONFIG
BUCKET_OUT = BUCKET_RUN.removeprefix("s3://runs/")


def _coco(data: bytes) -> dict:
    """The COCO JSON without its image root (the one thing that names the store: file names are below it)."""
    coco = json.loads(data)
    coco["info"].pop("image_root")
    return coco


def _stages(stdout: str) -> dict[str, bool]:
    return {s["stage"]: s["skipped"] for s in json.loads(stdout)["stages"]}


def test_a_run_in_a_bucket_equals_a_local_run_and_reruns_like_one(s3, bucket_photos, bucket_run, tiny_run, tmp_path):
    def work(made) -> list:
        return [(s["stage"], s.get("images"), s.get("errors"), s["skipped"]) for s in made.summary["stages"]]

    assert work(bucket_run) == work(tiny_run)  # the same stages did the same work
    remote, local = s3.objects("runs", BUCKET_OUT), local_files(tiny_run.out)
    assert comparable(remote) == comparable(local) and len(comparable(remote)) > 4 * N_PHOTOS
    assert _coco(remote["pseudo_labels.json"]) == _coco(local["pseudo_labels.json"])
    assert json.loads(remote["pseudo_labels.json"])["info"]["image_root"] == bucket_photos.rstrip("/")
    for name in ("config.yaml", "run.json", "status.parquet", "manifest.parquet", "report.html"):
        assert name in remote
    assert not [k for k in remote if ".tmp-" in k or k == ".lock"]  # nothing partial, the lock released

    # the session's runs are shared: what this test writes (evaluation, reruns) goes to copies of them
    s3.copy("runs", BUCKET_OUT, "voc")
    out, local_run = "s3://runs/voc", shutil.copytree(tiny_run.out, tmp_path / "local")
    # the commands that read a run folder work on a bucket one
    for cmd in (["verify", out], ["errors", out, "--json"]):
        res = mlcseg(*cmd, env=s3.env)
        assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(mlcseg("errors", out, "--json", env=s3.env).stdout)["images"] == N_PHOTOS
    gt = need(VOC_MASKS)
    metrics = {}
    for run in (out, local_run):
        res = mlcseg("eval", run, gt, "--protocol", "voc21", "--json", env=s3.env)
        assert res.returncode == 0, res.stderr[-2000:]
        metrics[str(run)] = json.loads(res.stdout)
    assert metrics[out]["miou"] == metrics[str(local_run)]["miou"]
    assert metrics[out]["per_class_iou"] == metrics[str(local_run)]["per_class_iou"]
    assert s3.keys("runs", "voc/metrics.json") and s3.keys("runs", "voc/confusion.png")
    res = mlcseg("ablate", out, gt, "--protocol", "voc21", "--refine-top", "1", "--json", env=s3.env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(s3.read("runs", "voc/ablation.json")) == json.loads(res.stdout)

    # a rerun does what a local rerun does (nothing but what the evaluation touched); so does a changed key
    for overrides in ([], ["num_classes=2"]):
        stages = {}
        for run in (out, local_run):
            res = mlcseg("run", "--out", run, *CONFIG, *overrides, "--json", env=s3.env)
            assert res.returncode == 0, res.stderr[-2000:]
            stages[str(run)] = _stages(res.stdout)
        assert stages[out] == stages[str(local_run)], (overrides, stages)
        assert stages[out]["extract"] and stages[out]["cluster"] and stages[out]["label"] == (not overrides)
    assert comparable(s3.objects("runs", "voc")) == comparable(local_files(local_run))


def test_two_runs_on_one_bucket_folder_the_second_is_refused(s3, bucket_photos):
    from mlcseg_ray.core.storage import as_location, create_exclusive

    # a live holder (this test process, on this host) holds the folder
    holder = {"host": socket.gethostname(), "pid": psutil.Process().pid, "started": time.time()}
    s3.client.put_object(Bucket="runs", Key="held/.lock", Body=json.dumps({**holder, "command": "holder"}))
    res = mlcseg("run", "--images", bucket_photos, "--out", "s3://runs/held", *CONFIG, env=s3.env)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 4 and len(errors) == 1 and "in use by another run" in errors[0], res.stderr[-2000:]
    assert s3.keys("runs", "held/") == ["held/.lock"]  # nothing else written

    # of many runs creating the lock at once, the store lets exactly one through (a conditional PUT)
    os.environ.update(s3.env)
    try:
        target = as_location("s3://runs/race/.lock")
        start = threading.Barrier(8)

        def create(i: int) -> bool:
            start.wait()
            return create_exclusive(target, b"%d" % i)

        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(create, range(8)))  # an exception in a thread is raised here
        assert sorted(won) == [False] * 7 + [True]
    finally:
        for k in s3.env:
            os.environ.pop(k, None)


def _wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_killed_driver_and_the_store_going_away_are_each_resumed_to_the_same_bytes(s3, bucket_photos, tiny_run):
    """One run in the bucket, interrupted twice and resumed each time by the next command: its driver killed
    mid-extraction (the lock it leaves is taken over), then the store going away mid-refinement (one line, exit 5)."""
    out, prefix = "s3://runs/interrupted", "interrupted/"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    proc = subprocess.Popen(
        MLCSEG + ["run", "--images", bucket_photos, "--out", out, *CONFIG],
        env={**os.environ, **s3.env, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len(s3.keys("runs", f"{prefix}_state/extract/0")) >= 2, proc, "two extracted shards")
        kill_driver(proc, ray_tmp)
    finally:
        end(started_under(ray_tmp))
    assert f"{prefix}pseudo_labels.json" not in s3.keys("runs", prefix)
    assert s3.keys("runs", f"{prefix}.lock")  # the dead driver's lock is still there ...

    # the next command takes the lock over and goes on; the store goes away once refine has begun (refine,
    # describe and label still need it)
    env = {**os.environ, **s3.env, "AWS_MAX_ATTEMPTS": "2"}
    proc = subprocess.Popen(
        MLCSEG + ["run", "--out", out, *CONFIG], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: s3.keys("runs", f"{prefix}_state/refine/0"), proc, "refine's first shard")
        s3.stop()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        s3.start()
    assert "taking over the lock" in stderr  # ... and taken over: its holder is gone
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 5 and len(errors) == 1, stderr[-3000:]
    assert s3.url in errors[0] and "cannot reach the object store" in errors[0], errors
    assert f"{prefix}pseudo_labels.json" not in s3.keys("runs", prefix)  # it did stop mid-run

    res = mlcseg("run", "--out", out, *CONFIG, "--json", env=s3.env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _stages(res.stdout)["extract"] is True  # resumed: extraction was not redone
    assert comparable(s3.objects("runs", "interrupted")) == comparable(local_files(tiny_run.out))


def test_a_failure_while_the_store_is_down_is_named_so_whatever_the_client_made_of_it(s3, monkeypatch, capfd):
    """s3fs makes a listing cut off by an outage a bare FileNotFoundError (the CI run that met it exited 2):
    the store is asked once more before the one line is chosen."""
    from mlcseg_ray.cli.errors import exit_code
    from mlcseg_ray.core.errors import StageFailed

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)

    def failed() -> StageFailed:
        cause = FileNotFoundError("runs/probe/images/shard-00002.parquet")
        e = StageFailed("refine", cause)
        e.__cause__ = cause
        return e

    assert exit_code(failed(), "s3://runs/probe") == 2  # the store answers: a missing input, as it says
    assert "error: refine: runs/probe/images/shard-00002.parquet" in capfd.readouterr().err
    s3.stop()
    try:
        started = time.time()
        assert exit_code(failed(), "s3://runs/probe") == 5
        took = time.time() - started
    finally:
        s3.start()
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and s3.url in errors[0] and "cannot reach the object store" in errors[0], errors
    assert "while refine ran" in errors[0] and took < 10  # one attempt, not the client's retries
    assert exit_code(failed(), "/tmp/not-a-bucket") == 2  # a local folder is not probed


def test_storage_mistakes_are_one_line_each_and_create_nothing(s3, photos, tmp_path):
    from moto import settings

    iam = boto3.client(
        "iam", endpoint_url=s3.url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    iam.create_user(UserName="reader")
    read_only = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(read_only))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3.client.create_bucket(Bucket="readonly")
    reader = {**s3.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    wrong = {**s3.env, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "wrong"}
    cases = [  # (what, --out, environment, exit code, words in the line)
        ("missing bucket", "s3://no-such-bucket/run", s3.env, 2, "no such bucket"),
        ("wrong credentials", "s3://runs/wrong", wrong, 5, "refused access to s3://runs/wrong"),
        ("read-only bucket", "s3://readonly/run", reader, 5, "object store refused"),
    ]
    try:
        for what, out, env, code, words in cases:
            if what == "wrong credentials":  # from now on the server checks credentials and policies
                settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
            res = mlcseg("run", "--images", photos, "--out", out, *CONFIG, env=env, timeout=120)
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            assert (res.returncode, len(errors)) == (code, 1), (what, res.stderr[-2000:])
            assert words in errors[0], (what, errors[0])
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    assert s3.keys("readonly") == [] and s3.keys("runs", "wrong/") == []
    assert "no-such-bucket" not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


def test_throttling_is_retried_with_backoff_and_changes_nothing(s3, bucket_photos, tiny_run):
    """Every 40th request answered 503 SlowDown: the run retries (botocore's standard mode, with backoff) and
    ends with the same masks. (One shard, about 600 requests: each retry waits, about 0.6 s on average.)"""
    from helpers.s3 import FlakyProxy

    with FlakyProxy(s3.port, every=40) as proxy:
        env = {**s3.env, "AWS_ENDPOINT_URL": proxy.url}
        res = mlcseg(
            "run",
            "--images",
            bucket_photos,
            "--out",
            "s3://runs/throttled",
            *CONFIG,
            "shard_size=4",
            env=env,
            timeout=600,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert proxy.refused > 10  # the store really did refuse, many times
    masks = {k: v for k, v in s3.objects("runs", "throttled").items() if k.startswith(("masks/", "binary/"))}
    assert len(masks) == 2 * N_PHOTOS
    assert masks == {k: v for k, v in local_files(tiny_run.out).items() if k.startswith(("masks/", "binary/"))}


def test_a_bucket_run_exports_to_a_bucket(s3, bucket_run, tiny_run, tmp_path):
    """`mlcseg export` reads a run in the bucket and writes the dataset there: the same files as a local export of
    the same run (issue 41)."""
    res = mlcseg("export", BUCKET_RUN, "--format", "voc", "--out", "s3://runs/exported", "--json", env=s3.env)
    assert res.returncode == 0, res.stderr[-2000:]
    local = mlcseg("export", tiny_run.out, "--format", "voc", "--out", tmp_path / "voc", "--json")
    assert local.returncode == 0, local.stderr[-2000:]
    assert json.loads(res.stdout)["images"] == json.loads(local.stdout)["images"] == N_PHOTOS
    assert s3.objects("runs", "exported") == local_files(tmp_path / "voc")


def test_a_fit_in_a_bucket_labels_a_local_run(s3, bucket_run, tiny_run, photos, tmp_path, monkeypatch):
    """Issue 43: ``--fit`` names a run folder in a bucket: a local run of the same photos, cut into other shards,
    applies its levels and classes and gets its class masks, byte for byte."""
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.core.run_dir import RunDir
    from mlcseg_ray.pipeline import Pipeline

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    cfg = Config.load(None, [*TINY, "shard_size=3", f"fit={BUCKET_RUN}"])
    out = RunDir(tmp_path / "applied")
    Pipeline(out.root, cfg, backend="local", images=str(photos)).run(print_summary=False)
    masks = {k: v for k, v in local_files(out.root).items() if k.startswith("masks/")}
    assert len(masks) == N_PHOTOS and masks == {k: v for k, v in local_files(tiny_run.out).items() if k in masks}
    assert json.loads(out.level_fit.read_text())["applied_from"] == BUCKET_RUN
    assert out.classes.read_bytes() == s3.objects("runs", BUCKET_OUT)["classes.parquet"]
