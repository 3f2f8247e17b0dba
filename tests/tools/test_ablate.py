"""`mlcseg ablate` (issue 13): every level and combine rule scored against ground truth from one cluster run, for
the VOC, binary and COCO protocols, and the stored score of the configured rule reproduced exactly."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import COCO_SUBSET, TINY, VOC_MASKS, VOC_SUBSET, mlcseg, need
from helpers.planted import PlantedSpec, generate
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.formats.datasets import load_ground_truth
from mlcseg_ray.library.clustering import read_pseudo
from mlcseg_ray.tools.ablate import RULES, ablate, rule_score


def _run(out, **inputs):
    """A whole run in this process, on the session's embedded Ray: random weights, without the CRF (so that the
    refine stage's masks are the configured rule's score upsampled: what ablate scores at patch resolution)."""
    from mlcseg_ray.pipeline import Pipeline

    summary = Pipeline(out, Config.load(None, [*TINY, "crf=false"]), **inputs).run(print_summary=False)
    stages = [s["stage"] for s in summary]
    assert stages[-1] == "report" and ("evaluate" in stages) == ("voc" in inputs)  # only a --voc run scores itself
    return out


@pytest.fixture(scope="module")
def voc_run(ray_local, tmp_path_factory):
    """Five VOC photos through the whole pipeline."""
    out = _run(tmp_path_factory.mktemp("ablate") / "run", voc=str(need(VOC_SUBSET)), limit=5)
    assert json.loads(RunDir(out).metrics.read_text())["n_images"] == 5  # a --voc run scores itself
    return out


@pytest.mark.slow
def test_ablate_on_voc_photos(voc_run):
    r = mlcseg("ablate", voc_run, need(VOC_SUBSET), "--json", "--refine-top", 1)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "RANDOM WEIGHTS" in r.stderr  # said on every command that shows numbers from random weights
    assert res["random_weights"] and res["images"] == 5 and res["configured"] == "weighted"
    assert [x["rule"] for x in res["rules"]] == list(RULES)
    assert all(0 <= x["patch_iou"] <= 1 for x in res["rules"])
    assert all(x["refined_iou"] is None for x in res["rules"])  # the run's config has crf=false
    # the configured rule at patch resolution is exactly what the refine stage wrote (crf=false)
    run, truth = RunDir(voc_run), load_ground_truth(need(VOC_SUBSET), "binary")
    inter = union = 0
    for image_id in read_pseudo(run, ["image_id"]).column(0).to_pylist():
        pred, t = np.asarray(Image.open(run.binary_mask(image_id))) > 0, truth.read(image_id)
        inter += int((pred & (t == 1)).sum())
        union += int(((pred | (t == 1)) & (t != 255)).sum())
    configured = next(x for x in res["rules"] if x["rule"] == "weighted")
    assert configured["patch_iou"] == pytest.approx(inter / union, abs=1e-4)
    # the table, the file, and the report's section
    assert json.loads(RunDir(voc_run).ablation.read_text())["rules"] == res["rules"]
    page = RunDir(voc_run).report.read_text()
    assert "Which level and rule" in page and "<svg" in page
    table = mlcseg("ablate", voc_run, need(VOC_SUBSET), "--refine-top", 0)
    assert table.returncode == 0 and "vote 2 of 3" in table.stdout and "best single level" in table.stdout


@pytest.mark.slow
def test_ablate_refines_the_best_rules_with_the_crf(voc_run):
    run = RunDir(voc_run)
    truth = load_ground_truth(need(VOC_SUBSET), "voc21")
    res = ablate(run, truth, Config.load(run.config, ["crf=true"]), refine_top=2)
    refined = [x for x in res["rules"] if x["refined_iou"] is not None]
    best_two = sorted(res["rules"], key=lambda x: -x["patch_iou"])[:2]
    assert {x["rule"] for x in refined} == {x["rule"] for x in best_two}
    assert all(0 <= x["refined_iou"] <= 1 for x in refined)


@pytest.mark.slow
def test_ablate_binary_ground_truth_agrees_with_voc(voc_run, tmp_path):
    """The same truth as plain 0/255 PNGs (protocol binary) gives the same table as the VOC protocol."""
    seg = need(VOC_SUBSET) / "SegmentationClass"
    gt = tmp_path / "binary"
    gt.mkdir()
    for image_id in read_pseudo(RunDir(voc_run), ["image_id"]).column(0).to_pylist():
        a = np.asarray(Image.open(seg / f"{image_id}.png"))
        Image.fromarray(np.where(a == 255, 0, (a > 0) * 255).astype(np.uint8)).save(gt / f"{image_id}.png")
    binary = json.loads(mlcseg("ablate", voc_run, gt, "--protocol", "binary", "--json", "--refine-top", 0).stdout)
    voc = json.loads(RunDir(voc_run).ablation.read_text())
    # VOC ignores its object borders (255); the binary masks count them as background, so close but not equal
    for a, b in zip(binary["rules"], voc["rules"], strict=True):
        assert a["rule"] == b["rule"] and abs(a["patch_iou"] - b["patch_iou"]) < 0.1


@pytest.mark.slow
def test_ablate_on_coco_photos(ray_local, tmp_path):
    coco = need(COCO_SUBSET)
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((coco / "images").iterdir())[:4]:
        shutil.copy(p, images / p.name)
    out = _run(tmp_path / "run", images=str(images))
    r = mlcseg("ablate", out, coco / "masks", "--protocol", "coco81", "--json", "--refine-top", 0)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 4


def test_ablate_refuses_what_it_cannot_score(voc_run, tmp_path):
    r = mlcseg("ablate", tmp_path, need(VOC_SUBSET))
    assert r.returncode == 2 and "not a run folder" in r.stderr
    empty = tmp_path / "gt"
    empty.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(empty / "not_an_image_of_the_run.png")
    r = mlcseg("ablate", voc_run, empty, "--protocol", "binary")
    assert r.returncode == 2 and "none of the run's images has ground truth" in r.stderr
    # ground truth of the run's images, but at another size: the mismatch is named, as eval names it
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted((voc_run / "binary").glob("*.png")):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(small / p.name)
    r = mlcseg("ablate", voc_run, small, "--protocol", "binary")
    assert r.returncode == 2 and "ground truth is 4x4, the image" in r.stderr and r.stderr.count("\n") <= 2
    # a run folder where nothing was clustered: one line, not an IndexError
    run = RunDir(voc_run)
    hollow = tmp_path / "hollow"
    shutil.copytree(voc_run, hollow, ignore=shutil.ignore_patterns("pseudo"))
    r = mlcseg("ablate", hollow, need(VOC_SUBSET))
    assert r.returncode == 2 and "has no clustered image" in r.stderr and "Traceback" not in r.stderr
    assert run.pseudo.is_dir()


def test_rule_scores_reproduce_the_cluster_stage(tmp_path):
    """On a planted store: the configured rule's score is the stored one, bit for bit, and every single-level rule
    is that level's mask - so the ablation table shows what each rule would have written."""
    store = generate(
        tmp_path / "hard",
        PlantedSpec("hard", n_images=60, shard_size=30),
        mask_dir=need(VOC_MASKS) / "SegmentationClass",
    )
    from mlcseg_ray.pipeline import Pipeline

    for combine in ("weighted", "vote"):
        Pipeline(store.root, Config(combine=combine), backend="local").run(["cluster"], print_summary=False)
        name = "vote 2 of 3" if combine == "vote" else combine
        for row in read_pseudo(store).to_pylist():
            np.testing.assert_array_equal(rule_score(row, name), np.asarray(row["score"], np.float32))
            for level in ("dataset", "category", "image"):
                assert ((rule_score(row, level) > 0.5) == np.asarray(row[level], bool)).all()
    assert pq.read_schema(store.pseudo_part(0)).field("weights").type.value_type.bit_width == 32


def test_ablate_scores_empty_scenes_and_the_confidence(voc_run, tmp_path):
    """Ground truth with empty scenes (two images' objects removed): each rule's share of them kept clean, and the
    precision and recall of the run's confidence as a test of a good mask, in the JSON and the report."""
    seg = need(VOC_SUBSET) / "SegmentationClass"
    gt = tmp_path / "binary"
    gt.mkdir()
    ids = read_pseudo(RunDir(voc_run), ["image_id"]).column(0).to_pylist()
    for k, image_id in enumerate(ids):
        a = np.asarray(Image.open(seg / f"{image_id}.png"))
        fg = (a > 0) & (a != 255) & (k >= 2)  # the first two: nothing there
        Image.fromarray((fg * 255).astype(np.uint8)).save(gt / f"{image_id}.png")
    r = mlcseg("ablate", voc_run, gt, "--protocol", "binary", "--json", "--refine-top", 0)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["empty_images"] == 2
    assert all(x["empty_kept_clean"] in (0.0, 0.5, 1.0) for x in res["rules"])
    curve = res["confidence_curve"]
    assert [c["threshold"] for c in curve] == [round(0.1 * k, 2) for k in range(10)]
    assert curve[0]["kept"] == 5 and all(a["kept"] >= b["kept"] for a, b in zip(curve, curve[1:], strict=False))
    recalls = [c["recall"] for c in curve if c["recall"] is not None]
    assert all(a >= b for a, b in zip(recalls, recalls[1:], strict=False))
    table = mlcseg("ablate", voc_run, gt, "--protocol", "binary", "--refine-top", 0)
    assert "2 empty scenes in the ground truth" in table.stdout
    assert "The confidence against the truth" in RunDir(voc_run).report.read_text()
