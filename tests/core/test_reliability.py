"""Issue 6 reliability tests, loopback only. Every process a test starts is ended by its PID."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from helpers import MLCSEG, TINY, copy_voc_images
from helpers.node_loss_run import NODE_LOSS_CONFIG
from helpers.ray_head import end, kill_driver, started_under

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _images(tmp_path, n):
    return copy_voc_images(tmp_path / "images", n)


def _outputs(run: Path) -> dict:
    files = {f"masks/{p.relative_to(run / 'masks')}": p.read_bytes() for p in sorted((run / "masks").rglob("*.png"))}
    files["pseudo_labels.json"] = (run / "pseudo_labels.json").read_bytes()
    return files


def _run_cmd(images, out, *extra):
    # max_side=320 gives each one-image shard enough work for the test to catch the run in the middle
    return MLCSEG + ["run", "--images", str(images), "--out", str(out), *TINY, "shard_size=1", "max_side=320", *extra]


def _reference_run(images, out, *overrides) -> Path:
    """The run that was never interrupted: the same config, in this process on the session's embedded Ray (the
    bytes do not depend on the backend)."""
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.pipeline import Pipeline

    cfg = Config.load(None, [*TINY, "shard_size=1", *overrides])
    Pipeline(out, cfg, images=str(images)).run(print_summary=False)
    return out


def test_driver_killed_then_resumed_gives_identical_outputs(ray_local, tmp_path):
    images = _images(tmp_path, 6)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = _reference_run(images, tmp_path / "reference", "max_side=320")

    out = tmp_path / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    proc = subprocess.Popen(
        _run_cmd(images, out),
        env={**env, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            markers = list((out / "_state" / "extract").glob("0*")) if (out / "_state" / "extract").is_dir() else []
            if len(markers) >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.01)
        kill_driver(proc, ray_tmp)
    finally:
        end(started_under(ray_tmp))
    done_before = len(list((out / "_state" / "extract").glob("0*")))
    assert 2 <= done_before < 6, done_before
    assert not (out / "pseudo_labels.json").exists()

    subprocess.run(_run_cmd(images, out), check=True, env=env, capture_output=True, timeout=600)
    rec = json.loads((out / "run.json").read_text())["stages"]["extract"]
    assert rec["shards_skipped"] == done_before and rec["shards_done"] == 6 - done_before
    # no duplicates, no partial files, identical bytes to the run that was never interrupted
    ids = [
        i
        for p in sorted((out / "features").glob("shard-*.parquet"))
        for i in set(pq.read_table(p, columns=["image_id"]).column(0).to_pylist())
    ]
    assert sorted(ids) == sorted(p.stem for p in images.iterdir())
    assert not list(out.rglob(".tmp-*"))
    assert _outputs(out) == _outputs(ref)


def test_failure_on_one_image_becomes_an_error_row(ray_local, tmp_path):
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.pipeline import Pipeline

    images = _images(tmp_path, 6)
    cfg = Config.load(None, TINY + ["shard_size=3"])
    pipe = Pipeline(tmp_path / "run", cfg, images=str(images))
    pipe.run(["ingest", "extract", "cluster"])
    victim = sorted(images.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:500])  # the file breaks between extraction and refinement
    pipe.run(["refine", "label", "report"])
    manifest = {r["image_id"]: r for r in pq.read_table(tmp_path / "run" / "status.parquet").to_pylist()}
    assert manifest[victim.stem]["status"] == "error" and "refine" in manifest[victim.stem]["error"]
    for image_id, r in manifest.items():
        if image_id != victim.stem:
            assert r["status"] == "ok" and (tmp_path / "run" / "masks" / f"{image_id}.png").exists()
    coco = json.loads((tmp_path / "run" / "pseudo_labels.json").read_text())
    assert victim.stem not in {im["mlcseg_image_id"] for im in coco["images"]} and len(coco["images"]) == 5


def test_worker_nodes_lost_mid_extraction_and_mid_refinement(ray_local, tmp_path):
    images = _images(tmp_path, 6)
    script = Path(__file__).parents[1] / "helpers" / "node_loss_run.py"
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    try:
        res = subprocess.run(
            [sys.executable, str(script), str(images), str(tmp_path / "remove"), "remove"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        end(started_under(ray_tmp))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "removed a node during extract" in res.stdout
    assert "removed a node during refine" in res.stdout
    reference = _reference_run(images, tmp_path / "reference", *NODE_LOSS_CONFIG)
    assert _outputs(tmp_path / "remove") == _outputs(reference)


def test_no_ray_process_outlives_a_killed_driver(tmp_path):
    """SIGKILL of the driver alone (not its process tree): the embedded Ray it started, agents and workers
    included, is gone shortly after."""
    images = _images(tmp_path, 4)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _run_cmd(images, out),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ours = []
    try:
        deadline = time.time() + 300
        while not list((out / "_state" / "extract").glob("0*")) if (out / "_state" / "extract").is_dir() else True:
            assert time.time() < deadline and proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
        driver = psutil.Process(proc.pid)
        ours = driver.children(recursive=True)
        names = {p.name() for p in ours}
        assert len(ours) >= 4, names  # gcs, raylet, agents, workers, the reaper
        driver.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(ours, timeout=15)  # left alone, the agents outlive it by 20-60 s
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        end(ours)
