"""The run folder cannot lie (issue 11): fingerprints, the lock, file modes, shard-size independence, changed
inputs. Most runs here use the in-process backend (no Ray): the executor and the stages are the same."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import MLCSEG, TINY_CONFIG, copy_voc_images
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.errors import RunLocked
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.formats.manifest import manifest_fingerprint
from mlcseg_ray.pipeline import Pipeline

TINY = dict(TINY_CONFIG, shard_size=2)


def run_local(out, images=None, **overrides) -> dict:
    """A whole run in-process; returns {stage: skipped?}."""
    cfg = Config(**{**TINY, **overrides})
    summary = Pipeline(out, cfg, images=str(images) if images else None, backend="local").run()
    return {r["stage"]: r["skipped"] for r in summary}


def outputs(run: Path) -> dict:
    files = {f"{d}/{p.name}": p.read_bytes() for d in ("binary", "masks") for p in sorted((run / d).glob("*.png"))}
    files["pseudo_labels.json"] = (run / "pseudo_labels.json").read_bytes()
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return copy_voc_images(tmp_path_factory.mktemp("imgs") / "images", 5)


@pytest.fixture(scope="module")
def base_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    run_local(out, images)
    return out


def test_a_changed_key_recomputes_that_stage_and_what_follows(base_run, images, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(base_run, out)
    skipped = run_local(out, images, k_image=4)
    assert skipped == {
        "ingest": False,
        "extract": True,
        "cluster": False,
        "refine": False,
        "describe": False,
        "label": False,
        "report": False,
    }
    fresh = tmp_path / "fresh"
    run_local(fresh, images, k_image=4)
    assert outputs(out) == outputs(fresh)  # as if made from scratch with the new key
    assert outputs(out) != outputs(base_run)
    assert yaml.safe_load((out / "config.yaml").read_text())["k_image"] == 4
    rec = json.loads((out / "run.json").read_text())
    stage = json.loads((out / "_state" / "cluster" / "stage.json").read_text())
    assert rec["fingerprints"]["cluster"] == rec["stages"]["cluster"]["fingerprint"] == stage["fingerprint"]
    assert stage["basis"]["config"]["k_image"] == 4
    # the source's fingerprint, as ingest hashed it while writing, is the manifest's
    manifest = manifest_fingerprint(out / "manifest.parquet")
    assert rec["fingerprints"]["ingest"] == rec["stages"]["ingest"]["fingerprint"] == manifest


def test_num_classes_recomputes_only_label_and_report(base_run, images, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(base_run, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "binary").glob("*.png")}
    skipped = run_local(out, images, num_classes=2)
    assert [s for s, sk in skipped.items() if not sk] == ["ingest", "label", "report"]
    assert {p: p.stat().st_mtime_ns for p in (out / "binary").glob("*.png")} == before
    coco = json.loads((out / "pseudo_labels.json").read_text())
    assert {c["id"] for c in coco["categories"]} == {1, 2}


def test_another_backbone_or_weights_file_recomputes_from_extract(base_run, images, tmp_path):
    import torch
    from safetensors.torch import save_file

    from mlcseg_ray.formats.feature_store import read_store_metadata
    from mlcseg_ray.models.backbones import create_architecture

    out = tmp_path / "d"
    shutil.copytree(base_run, out)
    weights = tmp_path / "model.safetensors"

    def write_weights(seed):
        torch.manual_seed(seed)
        m = create_architecture("random-vit-tiny")
        save_file({k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in m.state_dict().items()}, str(weights))

    write_weights(1)
    skipped = run_local(out, images, weights=str(weights))
    assert not skipped["extract"] and not skipped["cluster"]
    meta = read_store_metadata(out / "features" / "shard-00000.parquet")
    rec = json.loads((out / "run.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert str(weights) in meta["weights"] and str(weights) in rec["backbone"]["weights"]
    assert cfg["weights"] == str(weights)
    assert json.loads((out / "pseudo_labels.json").read_text())["info"]["random_weights"] is False
    first = outputs(out)

    time.sleep(0.01)
    write_weights(2)  # the same path, another file: the fingerprint notices
    skipped = run_local(out, images, weights=str(weights))
    assert not skipped["extract"]
    assert outputs(out) != first

    skipped = run_local(out, images, backbone="random-vit-s16", weights=None)  # another model altogether
    assert not skipped["extract"]
    meta = read_store_metadata(out / "features" / "shard-00000.parquet")
    rec = json.loads((out / "run.json").read_text())
    assert (
        meta["backbone"]
        == rec["backbone"]["backbone"]
        == "random-vit-s16"
        == yaml.safe_load((out / "config.yaml").read_text())["backbone"]
    )


def test_a_stage_whose_upstream_is_stale_is_refused_and_nothing_is_removed(base_run, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(base_run, out)
    before = outputs(out)
    config = (out / "config.yaml").read_text()
    res = subprocess.run(
        MLCSEG + ["refine", "--out", str(out), "k_image=4"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "refine needs cluster" in res.stderr and "k_image 3 -> 4" in res.stderr
    assert outputs(out) == before and (out / "config.yaml").read_text() == config


def test_a_copied_run_folder_reports_its_own_outputs(base_run, images, tmp_path):
    """A rerun of a run folder copied elsewhere says where its outputs are now, not where they were made."""
    out = shutil.copytree(base_run, tmp_path / "moved")
    cfg = Config(**TINY)
    summary = Pipeline(out, cfg, images=str(images), backend="local").run(print_summary=False)
    skipped = [r for r in summary if r["skipped"]]
    assert skipped and all(r["output"].startswith(f"{out}/") for r in skipped), summary
    recorded = json.loads((out / "run.json").read_text())["stages"]
    assert all(not s["output"].startswith("/") for s in recorded.values() if s.get("output")), recorded


def test_outputs_do_not_depend_on_the_shard_size_the_batch_or_the_threads_ahead(images, tmp_path):
    """Images decoded and crops cut ahead of the model (issue 45), or not, in any shard size: the same bytes."""
    run_local(tmp_path / "s1", images, shard_size=1, decode_threads=0)
    run_local(tmp_path / "s4", images, shard_size=4, batch_size=2, decode_threads=2)
    assert outputs(tmp_path / "s1") == outputs(tmp_path / "s4")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask(images, tmp_path, umask, mode):
    out = tmp_path / "run"
    script = (
        f"import os; os.umask({umask}); from mlcseg_ray.core.config import Config; "
        f"from mlcseg_ray.pipeline import Pipeline; "
        f"Pipeline({str(out)!r}, Config(**{TINY!r}), backend='local', images={str(images)!r})"
        f".run(['ingest', 'extract', 'cluster', 'refine'])"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert {
        p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode
    } == {}


def test_an_image_swapped_between_stages_is_an_error_row_then_recomputed(images, tmp_path):
    imgs = tmp_path / "imgs"
    shutil.copytree(images, imgs)
    out = tmp_path / "run"
    cfg = Config(**TINY)
    pipe = Pipeline(out, cfg, images=str(imgs), backend="local")
    pipe.run(["ingest", "extract", "cluster"])
    victim, other = sorted(imgs.iterdir())[:2]
    size = Image.open(victim).size
    Image.open(other).convert("RGB").resize(size).save(victim, quality=90)  # same name, same size, other photo
    pipe.run(["refine", "label", "report"])
    status = {r["image_id"]: r for r in RunDir(out).read_status()}
    assert status[victim.stem]["status"] == "error" and status[victim.stem]["stage"] == "refine"
    assert "changed since ingest" in status[victim.stem]["error"]
    assert not (out / "binary" / f"{victim.stem}.png").exists()
    assert sum(r["status"] == "ok" for r in status.values()) == 4

    skipped = run_local(out)  # the next run notices the new file and recomputes with it
    assert not skipped["extract"]
    status = {r["image_id"]: r for r in RunDir(out).read_status()}
    assert all(r["status"] == "ok" for r in status.values())
    assert (out / "masks" / f"{victim.stem}.png").exists()


def test_a_content_hash_catches_a_change_that_keeps_size_and_mtime(images, tmp_path):
    imgs = tmp_path / "imgs"
    shutil.copytree(images, imgs)
    out = tmp_path / "run"
    pipe = Pipeline(out, Config(**TINY, verify_images="hash"), images=str(imgs), backend="local")
    pipe.run(["ingest", "extract", "cluster"])
    victim = sorted(imgs.iterdir())[0]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped in the middle of the JPEG's entropy-coded data
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    pipe.run(["refine"])
    status = {r["image_id"]: r for r in RunDir(out).read_status()}
    assert "content differs" in status[victim.stem]["error"]


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(images, tmp_path):
    out = tmp_path / "run"
    args = [
        "--images",
        str(images),
        "--out",
        str(out),
        "backbone=random-vit-tiny",
        "max_side=256",
        "num_categories=3",
        "num_classes=3",
        "shard_size=1",
        "min_region_area=16",
        "crop_size=32",
    ]
    # the first holds the folder while it extracts (the lock is the same for every command that writes)
    first = subprocess.Popen(MLCSEG + ["extract"] + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists():
            assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(
            MLCSEG + ["run"] + args + ["backbone=random-vit-s16"], capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 4, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=60)
    # the folder is the first run's alone: one backbone everywhere, and no lock left behind
    from mlcseg_ray.formats.feature_store import read_store_metadata

    assert not (out / ".lock").exists()
    assert read_store_metadata(out / "features" / "shard-00000.parquet")["backbone"] == "random-vit-tiny"
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone"] == "random-vit-tiny"
    assert json.loads((out / "run.json").read_text())["backbone"]["backbone"] == "random-vit-tiny"


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.root.mkdir()
    import socket

    (run.lock_file).write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": dead.pid,
                "started": time.time() - 5,
                "started_at": "earlier",
                "command": "mlcseg run",
            }
        )
    )
    with caplog.at_level("WARNING", logger="mlcseg_ray"):
        with run.lock("test"):
            assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and str(dead.pid) in caplog.text
    assert not run.lock_file.exists()


def test_a_live_holder_on_this_host_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from mlcseg_ray.core.run_dir import RunDir; "
            f"cm = RunDir({str(run.root)!r}).lock('holder'); cm.__enter__(); time.sleep(60)",
        ]
    )
    try:
        deadline = time.time() + 60
        while not run.lock_file.exists():
            assert time.time() < deadline
            time.sleep(0.05)
        with pytest.raises(RunLocked, match=f"pid {holder.pid} .*holder"):
            with run.lock("second"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_metrics_follow_the_masks(tmp_path):
    """Metrics are recomputed when the masks change, kept when they do not, and never left describing old masks."""
    from helpers import VOC_SUBSET, need

    voc = need(VOC_SUBSET)
    out = tmp_path / "run"
    cfg = Config(**{**TINY, "shard_size": 16, "max_side": 64})
    Pipeline(out, cfg, voc=str(voc), backend="local").run()
    first = json.loads((out / "metrics.json").read_text())
    assert first["n_images"] == 59 and first["protocol"] == "voc21"
    Pipeline(out, cfg, backend="local").run(["report"], print_summary=False)  # nothing changed: the metrics stay
    assert json.loads((out / "metrics.json").read_text()) == first
    fewer = cfg.model_copy(update={"num_classes": 2})
    Pipeline(out, fewer, backend="local").run(["label"])  # new masks: the old metrics go
    assert not (out / "metrics.json").exists()
    Pipeline(out, fewer, backend="local").run()  # a rerun evaluates again, against the ground truth it had
    again = json.loads((out / "metrics.json").read_text())
    assert again["n_images"] == 59 and again["n_predicted_ids"] <= 3
