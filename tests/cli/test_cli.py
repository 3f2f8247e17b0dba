"""The command line as users meet it (issue 12): binary ground truth as people store it, results on stdout,
one-line errors with documented exit codes, progress without a terminal, `errors`, `--limit` / `--sample`."""

import json
import shutil
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import MLCSEG, TINY, VOC_SUBSET, copy_voc_images, mlcseg, need
from helpers.badinputs import make_corpus
from mlcseg_ray.cli.errors import EXIT_CODES
from mlcseg_ray.library.evaluation import evaluate_folder


# ----------------------------------------------------------------------------------------------- binary formats
def _halves(h=32, w=32, top=8):
    """Foreground rows [0, top) of an h x w image."""
    a = np.zeros((h, w), bool)
    a[:top] = True
    return a


@pytest.mark.parametrize("fmt", ["png01", "png0255", "bool", "jpeg"])
def test_binary_ground_truth_in_every_common_format(tmp_path, fmt):
    """GT foreground rows 0-15, prediction rows 8-23 (32 x 32): foreground IoU 256 / 768 = 33.33 by hand, and the
    same for background; the prediction is the tool's own 0/255 PNG."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    g = _halves(top=16)
    p = np.zeros((32, 32), bool)
    p[8:24] = True
    Image.fromarray(p.astype(np.uint8) * 255).save(pred / "x.png")
    if fmt == "png01":
        Image.fromarray(g.astype(np.uint8)).save(gt / "x.png")
    elif fmt == "png0255":
        Image.fromarray(g.astype(np.uint8) * 255).save(gt / "x.png")
    elif fmt == "bool":
        Image.fromarray(g).save(gt / "x.png")  # mode "1"
    else:
        Image.fromarray(g.astype(np.uint8) * 255).save(gt / "x.jpg", quality=75)
    m = evaluate_folder(pred, gt, "binary", out=tmp_path / "m")
    assert round(m["foreground_iou"], 2) == 33.33 and round(m["per_class_iou"]["background"], 2) == 33.33, m
    assert m["matching"].startswith("none")
    assert ("JPEG mask(s) thresholded at 128" in "; ".join(m["notes"])) == (fmt == "jpeg")
    assert "nothing ignored" in m["notes"]


def test_binary_masks_against_themselves_score_100(tmp_path):
    masks = tmp_path / "binary"
    masks.mkdir()
    for i in range(3):
        Image.fromarray(_halves(top=4 + 4 * i).astype(np.uint8) * 255).save(masks / f"m{i}.png")
    res = subprocess.run(
        MLCSEG + ["eval", str(masks), str(masks), "--protocol", "binary", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["foreground_iou"] == 100.0 and m["miou"] == 100.0 and m["n_images"] == 3
    assert (tmp_path / "binary_eval" / "metrics.json").exists() and not (masks / "metrics.json").exists()


def test_a_vocs_split_is_the_one_evaluated(tmp_path):
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.pipeline import Pipeline

    src = need(VOC_SUBSET)
    voc = tmp_path / "VOC2012"
    ids = sorted(p.stem for p in (src / "JPEGImages").glob("*.jpg"))[:5]
    for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (voc / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(src / sub / f"{i}.{ext}", voc / sub / f"{i}.{ext}")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[2:]) + "\n")
    cfg = Config.load(None, TINY)
    Pipeline(tmp_path / "run", cfg, voc=str(voc), split="train", backend="local").run()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["n_images"] == 2 and m["split"] == "train"
    # a --limit run is scored on its own images, not on the whole split with the rest as background
    Pipeline(tmp_path / "run1", cfg, voc=str(voc), split="val", limit=1, backend="local").run()
    m = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert m["n_images"] == 1 and m["ground_truth_outside_run"] == 2 and not m["missing_predictions"]


# ----------------------------------------------------------------------------------------------- the CLI
def test_version_and_json_on_stdout():
    from mlcseg_ray import __version__

    res = mlcseg("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"mlcseg_ray {__version__}"
    res = mlcseg("info", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["version"] == __version__ and "random-vit-tiny" in info["backbones"]


def test_expected_failures_are_one_line_with_their_exit_code(tmp_path):
    images = copy_voc_images(tmp_path / "imgs", 2)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("k_image: 3\nvote: [2\n")
    out = tmp_path / "never"
    res = mlcseg("run", "--images", images, "--out", out, "--config", bad_yaml)
    assert res.returncode == 2 and "not valid YAML at line" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not out.exists()  # nothing is created before the configuration is valid
    res = mlcseg("run", "--images", images, "--out", out, "k_image=one")
    assert res.returncode == 2 and "k_image" in res.stderr and not out.exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = mlcseg("run", "--images", images, "--out", a_file, *TINY)
    assert res.returncode == 2 and "exists and is a file" in res.stderr and len(res.stderr.splitlines()) == 1
    res = mlcseg("run", "--images", tmp_path / "missing", "--out", out, *TINY)
    assert res.returncode == 2 and "no such file or folder" in res.stderr and not out.exists()
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 130}


def test_an_unreachable_address_fails_fast_naming_it():
    t0 = time.time()
    res = mlcseg("info", "--address", "127.0.0.1:1", timeout=60)
    assert res.returncode == 6 and "127.0.0.1:1" in res.stderr and "192.0.2" not in res.stderr
    assert time.time() - t0 < 30
    res = mlcseg("eval", "a", "b", "--address", "127.0.0.1:1", timeout=60)
    assert res.returncode == 6 and "127.0.0.1:1" in res.stderr


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """A run over photos, broken files, a .gif (an image) and a .txt (not one), without a terminal."""
    root = tmp_path_factory.mktemp("messy")
    images = copy_voc_images(root / "images", 4)
    corpus = make_corpus(root / "bad", with_bomb=False)
    for name in ("zero.jpg", "truncated.jpg"):
        shutil.copy(root / "bad" / name, images / name)
    (images / "notes.txt").write_text("not an image")
    Image.new("P", (40, 40)).save(images / "anim.gif")
    out = root / "run"
    res = mlcseg(
        "run", "--images", images, "--out", out, "--json", *TINY, "shard_size=3", env={"MLCSEG_PROGRESS_INTERVAL": "0"}
    )
    return images, out, res, corpus


@pytest.mark.slow
def test_run_prints_json_and_progress_lines_without_a_terminal(messy_run):
    images, out, res, _ = messy_run
    assert res.returncode == 3, res.stderr[-3000:]  # some images failed
    summary = json.loads(res.stdout)
    assert summary["failed"] == 2 and summary["images"] == 7 and summary["random_weights"] is True
    assert [s["stage"] for s in summary["stages"]][:3] == ["ingest", "extract", "cluster"]
    # progress as plain lines (stderr is a pipe here, as under nohup or in a cluster job's log)
    # counted in images (7, in shards of 3), as the workers finish them (issue 41)
    assert "refine: 7/7 images (100%)" in res.stderr and "extract: 7/7 images (100%)" in res.stderr
    assert "1 file(s) skipped" in res.stderr
    # the tool's own lines only: Ray's go to the run's log
    for ray_noise in ("core_worker", "Token authentication", "Progress bars disabled", "pid=", "\x1b["):
        assert ray_noise not in res.stderr, ray_noise
    assert res.stderr.count("RANDOM WEIGHTS") == 1  # each warning once (issue 41): at the end of the command
    logs = list((out / "logs").glob("*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0


@pytest.mark.slow
def test_errors_lists_failures_and_skipped_files(messy_run):
    images, out, _, _ = messy_run
    res = mlcseg("errors", out, "--json")
    assert res.returncode == 0, res.stderr
    e = json.loads(res.stdout)
    failed = {r["image_id"]: r for r in e["failed"]}
    assert set(failed) == {"zero", "truncated"} and failed["zero"]["stage"] == "ingest"
    assert failed["truncated"]["stage"] == "extract" and "truncated" in failed["truncated"]["error"]
    assert e["skipped_files"]["count"] == 1 and e["skipped_files"]["files"] == ["notes.txt"]
    assert e["images"] == 7  # the .gif is read as an image (and did not fail), not skipped
    table = mlcseg("errors", out)
    assert "truncated" in table.stdout and "notes.txt" in table.stdout


@pytest.mark.slow
def test_limit_and_sample_take_a_subset(messy_run, tmp_path):
    from mlcseg_ray.core.inputs import InputSpec
    from mlcseg_ray.library.listing import list_inputs

    images = messy_run[0]
    spec = InputSpec(images=str(images))
    all_ids = [r["image_id"] for r in list_inputs(spec)]
    assert [r["image_id"] for r in list_inputs(InputSpec(images=str(images), limit=2))] == all_ids[:2]
    a = [r["image_id"] for r in list_inputs(InputSpec(images=str(images), sample=3, sample_seed=1))]
    b = [r["image_id"] for r in list_inputs(InputSpec(images=str(images), sample=3, sample_seed=1))]
    c = [r["image_id"] for r in list_inputs(InputSpec(images=str(images), sample=3, sample_seed=2))]
    assert a == b and len(a) == 3 and set(a) <= set(all_ids) and (a != c or len(all_ids) <= 3)
    out = tmp_path / "run"
    res = mlcseg("extract", "--images", images, "--out", out, "--limit", "2", *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    assert pq.read_table(out / "manifest.parquet").num_rows == 2


@pytest.mark.slow
def test_report_is_one_file_naming_failed_images(messy_run):
    page = (messy_run[1] / "report.html").read_text()
    assert "data:image/jpeg;base64," in page and "report_assets" not in page
    assert "truncated" in page and "zero" in page


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_stage(tmp_path):
    images = copy_voc_images(tmp_path / "imgs", 6)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        res = mlcseg("run", "--images", images, "--out", mnt / "run", *TINY, "max_side=512", "shard_size=1")
        assert res.returncode == 5, res.stderr[-3000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "disk is full" in errors[0] and str(mnt) in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_a_rerun_starts_from_the_folders_config_and_missing_weights_remove_nothing(messy_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(messy_run[1], out)
    res = mlcseg("run", "--out", out, "--json")  # no input, no overrides: the folder's own config and input
    assert res.returncode == 3, res.stderr[-2000:]  # the same two images still fail
    assert all(s["skipped"] for s in json.loads(res.stdout)["stages"] if s["stage"] not in ("ingest", "report"))
    # nothing to compute: no Ray started (its record names no cluster address, and no Ray log was kept)
    assert json.loads((out / "run.json").read_text())["backend"] == {"name": "ray", "embedded": True}
    assert len(list((out / "logs").glob("*.log"))) == 1
    features = sorted(p.name for p in (out / "features").iterdir())
    config = (out / "config.yaml").read_text()
    res = mlcseg("run", "--out", out, "--backbone", "vit_small_patch16_224.dino", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "no weights for vit_small_patch16_224.dino" in res.stderr
    assert sorted(p.name for p in (out / "features").iterdir()) == features  # checked before anything is removed
    assert (out / "config.yaml").read_text() == config
