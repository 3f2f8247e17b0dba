import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import COCO_SUBSET, VOC_SUBSET, mlcseg, need
from mlcseg_ray.cli import app
from mlcseg_ray.formats.class_tables import COCO_THING_IDS, COCOSTUFF27
from mlcseg_ray.formats.datasets import EvalError, load_ground_truth
from mlcseg_ray.library.evaluation import evaluate, evaluate_folder
from mlcseg_ray.ops.metrics import match, scores


def _save(folder, name, a):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(a, np.uint8)).save(folder / f"{name}.png")


def test_voc_ground_truth_against_itself_and_a_permutation(tmp_path):
    voc = need(VOC_SUBSET)
    m = evaluate_folder(voc / "SegmentationClass", voc, "voc21", out=tmp_path)
    assert m["miou"] == 100.0 and m["pixel_accuracy"] == 100.0 and m["n_images"] == 59
    assert m["per_class_iou"]["bird"] is None  # absent from the subset: not counted
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "confusion.png").exists()
    perm = np.random.default_rng(0).permutation(256).astype(np.uint8)
    for p in sorted((voc / "SegmentationClass").glob("*.png")):
        a = np.asarray(Image.open(p))
        _save(tmp_path / "perm", p.stem, np.where(a == 255, 0, perm[a]))  # relabelled; borders predicted as anything
    assert evaluate_folder(tmp_path / "perm", voc, "voc21")["miou"] == 100.0


def test_hand_computed_case(tmp_path):
    gt = tmp_path / "gt"
    pred = tmp_path / "pred"
    _save(gt, "a", [[0, 0, 1, 1], [0, 0, 1, 255]])
    _save(pred, "a", [[5, 5, 5, 7], [5, 5, 7, 7]])
    # valid pixels: gt0={4 px, pred 5}, gt1={3 px: pred 5,7,7}; Hungarian: 5->0, 7->1
    # class 0: tp 4, fp 1 (gt1 pixel predicted 5) -> 4/5; class 1: tp 2, fn 1 -> 2/3
    m = evaluate_folder(pred, gt, "folder", ignore=255)
    assert m["per_class_iou"] == {"class_0": 80.0, "class_1": pytest.approx(66.6667, abs=1e-3)}
    assert m["miou"] == pytest.approx((80 + 200 / 3) / 2, abs=1e-3)
    assert m["pixel_accuracy"] == pytest.approx(6 / 7 * 100, abs=1e-3)


def test_majority_matching_with_more_clusters_than_classes():
    conf = np.array([[10, 0], [8, 1], [0, 5]])
    assert match(conf, "majority").tolist() == [0, 0, 1]
    hung = match(conf, "hungarian")
    assert sorted(hung[hung >= 0].tolist()) == [0, 1] and (hung == -1).sum() == 1
    s = scores(conf, match(conf, "majority"), ["a", "b"])
    assert s["per_class_iou"]["a"] == pytest.approx(18 / 19 * 100, abs=1e-3)


def test_coco_id_mapping_and_real_masks(tmp_path):
    assert len(COCO_THING_IDS) == 80 and COCO_THING_IDS[-1] == 90 and 12 not in COCO_THING_IDS
    assert len(COCOSTUFF27) == 182 and max(COCOSTUFF27) == 26
    gt = tmp_path / "gt"
    _save(gt, "x", [[0, 90, 13, 1]])
    g = load_ground_truth(gt, "coco81")
    assert g.read("x").tolist() == [[0, 80, 12, 1]]  # 90 -> 80, 13 -> 12 (id 12 is a gap)
    _save(gt, "bad", [[12]])
    with pytest.raises(EvalError, match="12 is not one of the 80"):
        load_ground_truth(gt, "coco81").read("bad")
    coco = need(COCO_SUBSET)
    m = evaluate_folder(coco / "masks", coco / "masks", "coco81")
    assert m["miou"] == 100.0 and m["n_images"] == 66


def _instances_json(folder):
    """A COCO instances JSON of one 6x4 image with one toothbrush (id 90); returns (path, the object's mask)."""
    from pycocotools import mask as mu

    m = np.zeros((4, 6), np.uint8)
    m[1:3, 2:5] = 1
    rle = mu.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    ann = {
        "images": [{"id": 1, "file_name": "img.jpg", "width": 6, "height": 4}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 90,
                "segmentation": rle,
                "area": 6,
                "bbox": [2, 1, 3, 2],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 90, "name": "toothbrush"}],
    }
    (folder / "inst.json").write_text(json.dumps(ann))
    return folder / "inst.json", m


def test_coco_instances_json(tmp_path):
    path, m = _instances_json(tmp_path)
    g = load_ground_truth(path, "coco81")
    assert g.image_ids == ["img"] and (g.read("img") == m * 80).all()


def test_errors(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt, "a", np.zeros((4, 4)))
    _save(gt, "b", np.ones((4, 4)))
    _save(pred, "a", np.zeros((5, 4)))
    with pytest.raises(EvalError, match="a: prediction is 4x5 but ground truth is 4x4"):
        evaluate_folder(pred, gt, "folder")
    _save(pred, "a", np.zeros((4, 4)))
    m = evaluate_folder(pred, gt, "folder")  # b has no prediction: counted as background, listed
    assert m["missing_predictions"] == ["b"] and m["per_class_iou"]["class_1"] == 0.0
    with pytest.raises(EvalError, match="unknown protocol 'pascal'"):
        evaluate_folder(pred, gt, "pascal")
    voc = tmp_path / "voc"
    _save(voc / "SegmentationClass", "z", [[0, 30]])
    with pytest.raises(EvalError, match="class id 30 out of range"):
        evaluate_folder(voc / "SegmentationClass", voc, "voc21")


def test_binary_protocol(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt, "a", [[0, 3, 3, 255]])
    _save(pred, "a", [[0, 255, 0, 255]])
    m = evaluate_folder(pred, gt, "binary")  # nothing ignored unless asked: 255 is foreground
    assert round(m["foreground_iou"], 2) == 66.67 and m["per_class_iou"]["background"] == 50.0
    m = evaluate_folder(pred, gt, "binary", ignore=255)
    assert m["foreground_iou"] == 50.0 and m["per_class_iou"]["background"] == 50.0


def test_cli_eval_prints_100():
    voc = need(VOC_SUBSET)
    res = CliRunner().invoke(app, ["eval", str(voc / "SegmentationClass"), str(voc), "--protocol", "voc21"])
    assert res.exit_code == 0, res.output
    assert "mIoU 100.00" in res.output


def test_confusions_summed_on_ray_equal_local(ray_local, tmp_path):
    voc = need(VOC_SUBSET)
    g = load_ground_truth(voc, "voc21")
    pred = tmp_path / "p"
    rng = np.random.default_rng(1)
    for i in g.image_ids:
        a = g.read(i)
        _save(pred, i, rng.integers(0, 4, a.shape))
    from mlcseg_ray.backends.ray import ray_map

    local = evaluate(pred, g, chunk=7)
    remote = evaluate(pred, g, chunk=7, map_fn=ray_map)
    assert local["confusion"] == remote["confusion"] and local["miou"] == remote["miou"]


def _run_folder(root, image_ids, masks):
    """A run folder as evaluation sees it: the manifest's image ids and the class masks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": image_ids}), root / "manifest.parquet")
    for name, a in masks.items():
        _save(root / "masks", name, a)
    return root


def test_a_run_is_scored_on_its_own_images_alone(tmp_path):
    """A --limit run over a labelled split: the ground truth outside the run is left out and said so."""
    gt = tmp_path / "gt"
    for name in ("a", "b", "c"):
        _save(gt, name, np.ones((4, 4)))
    run = _run_folder(tmp_path / "run", ["a", "b"], {"a": np.ones((4, 4))})  # b failed: no mask
    m = evaluate_folder(run, gt, "folder")
    assert m["n_images"] == 2 and m["ground_truth_outside_run"] == 1 and m["missing_predictions"] == ["b"]
    assert "1 ground-truth image(s) outside the run left out" in m["notes"]


def test_ground_truth_matching_nothing_is_an_error_that_writes_nothing(tmp_path):
    gt = tmp_path / "gt"
    _save(gt, "a", np.ones((4, 4)))
    run = _run_folder(tmp_path / "run", ["x"], {"x": np.ones((4, 4))})
    with pytest.raises(EvalError, match="none of the 1 ground-truth images"):
        evaluate_folder(run, gt, "folder")
    assert not (run / "metrics.json").exists()
    pred = tmp_path / "pred"
    _save(pred, "q", np.ones((4, 4)))
    with pytest.raises(EvalError, match="no prediction in"):
        evaluate_folder(pred, gt, "folder")
    assert not (tmp_path / "pred_eval").exists()
    res = mlcseg("eval", run, gt, "--protocol", "folder")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "none of the" in res.stderr


def test_eval_json_with_an_instances_json_is_json(tmp_path):
    """pycocotools prints its progress: on stderr, so that --json parses."""
    path, m = _instances_json(tmp_path)
    _save(tmp_path / "pred", "img", m)
    res = mlcseg("eval", tmp_path / "pred", path, "--protocol", "coco81", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n_images"] == 1 and "annotations" in res.stderr  # the chatter went to stderr


def test_per_image_foreground_iou_worst_and_best_whatever_the_chunking(tmp_path):
    """Each image's foreground IoU (what the report ranks images by), kept bounded: the worst and best images
    and a histogram, the same for any chunking of the split."""
    from mlcseg_ray.library.evaluation import PER_IMAGE_KEPT, foreground_iou

    voc = need(VOC_SUBSET)
    g = load_ground_truth(voc, "voc21")
    pred = tmp_path / "p"
    rng = np.random.default_rng(3)
    expected = {}
    for k, i in enumerate(g.image_ids):
        truth = g.read(i)
        fg = (truth > 0) & (truth != 255)
        p = np.where(rng.random(truth.shape) < k / len(g.image_ids), fg, ~fg)  # worse for earlier images
        _save(pred, i, p.astype(np.uint8) * 3)
        valid = truth != 255
        expected[i] = ((p & fg) & valid).sum() / ((p | fg) & valid).sum()
    assert foreground_iou(np.zeros((2, 2)), np.zeros((2, 2)), 255) is None  # nothing to get wrong: not ranked
    ranked = sorted((v, i) for i, v in expected.items())
    for chunk in (5, 64):
        m = evaluate(pred, g, chunk=chunk)["per_image_foreground_iou"]
        assert [i for i, _ in m["worst"]] == [i for _, i in ranked[:PER_IMAGE_KEPT]]
        assert [i for i, _ in m["best"]] == [i for _, i in ranked[::-1][:PER_IMAGE_KEPT]]
        assert m["worst"][0][1] == pytest.approx(ranked[0][0], abs=1e-4)
        assert m["scored"] == sum(m["histogram"]) == len(g.image_ids)
        assert m["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-4)
