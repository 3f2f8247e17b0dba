"""Failures a user meets in passing, each one line and its exit code, with nothing left behind."""

import os
import shutil
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import MLCSEG, TINY, copy_voc_images, mlcseg
from mlcseg_ray.core.inputs import InputSpec
from mlcseg_ray.library.listing import list_inputs


def _one_line(res, code, words):
    """Exit ``code``, and the failure said in one ``error:`` line holding ``words``, no traceback."""
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in res.stderr, res.stderr


def test_an_empty_folder_creates_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    # (a random backbone: the weights are checked first, before the input is listed)
    _one_line(mlcseg("run", "--images", tmp_path / "empty", "--out", tmp_path / "run", *TINY), 2, "no images found")
    assert not (tmp_path / "run").exists()


def test_every_image_failing_at_ingest_stops_before_extraction(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.png"):
        (images / name).write_bytes(b"")
    res = mlcseg("run", "--images", images, "--out", tmp_path / "run", *TINY)
    _one_line(res, 3, "all 2 images failed at ingest")
    assert not (tmp_path / "run" / "features").exists()
    status = pq.read_table(tmp_path / "run" / "status.parquet").to_pylist()
    assert [r["status"] for r in status] == ["error", "error"] and all("empty file" in r["error"] for r in status)


@pytest.mark.slow
def test_a_new_limit_needs_the_input_again(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run.out, tmp_path / "run")
    status = (run / "status.parquet").read_bytes()
    _one_line(mlcseg("run", "--out", run, "--limit", "1"), 2, "give the input again")
    assert (run / "status.parquet").read_bytes() == status  # refused before anything was written


def test_ctrl_c_says_how_to_resume(tmp_path):
    images = copy_voc_images(tmp_path / "images", 4)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*MLCSEG, "run", "--images", str(images), "--out", str(out), *TINY, "shard_size=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLCSEG_PROGRESS_INTERVAL": "0"},
    )
    deadline = time.time() + 240
    while not (out / "_state" / "extract").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err


def test_manifest_paths_are_relative_to_the_manifest_and_http_is_refused(tmp_path):
    images = copy_voc_images(tmp_path / "data" / "images", 2)
    names = sorted(p.name for p in images.iterdir())
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("uri\n" + "".join(f"images/{n}\n" for n in names))
    rows = list_inputs(InputSpec(manifest=str(manifest)))
    assert [r["uri"] for r in rows] == [str(images / n) for n in names]
    web = tmp_path / "web.parquet"
    pq.write_table(pa.table({"uri": ["http://example.invalid/a.jpg"]}), web)
    res = mlcseg("extract", "--manifest", web, "--out", tmp_path / "run", *TINY)
    _one_line(res, 2, "URIs of scheme http are not read")
    assert not (tmp_path / "run").exists()


def test_a_ray_data_failure_names_the_error_not_its_empty_marker(capfd):
    # Ray Data raises a failure of its own machinery "from SystemException()": the line once read
    # "error: in extract: SystemException: " and said nothing
    from ray.data.exceptions import SystemException
    from ray.exceptions import RaySystemError

    from mlcseg_ray.cli.errors import exit_code
    from mlcseg_ray.core.errors import StageFailed

    inner = RaySystemError("the actor on 127.0.0.1 died\n  Traceback (most recent call last): ...")
    inner.__cause__ = SystemException()
    failed = StageFailed("extract", inner)
    failed.__cause__ = inner
    assert exit_code(failed) == 1
    err = capfd.readouterr().err.strip()
    assert "in extract: RaySystemError:" in err and "the actor on 127.0.0.1 died" in err
    assert "SystemException" not in err and "Traceback" not in err and len(err.splitlines()) == 1
