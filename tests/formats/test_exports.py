"""``mlcseg export`` (issue 41): the session's tiny run as COCO, VOC, YOLO segmentation and Hugging Face datasets,
read back with pycocotools, PIL, Datumaro (CVAT's converter), Ultralytics' own dataset loader and ``datasets``, and
checked against the run's own masks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from helpers import mlcseg
from helpers.world import N_PHOTOS
from mlcseg_ray.library.exports import region_polygon

pytestmark = pytest.mark.slow  # the session's tiny run
# Datumaro pins older Pillow and pyarrow than the package: it runs from a venv of its own, which `make test` makes
DATUMARO = Path(__file__).resolve().parents[2] / ".venv-datumaro" / "bin" / "python"


def _export(run, fmt, out, *extra) -> dict:
    res = mlcseg("export", run, "--format", fmt, "--out", out, "--json", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def _class_mask(run, image_id) -> np.ndarray:
    return np.asarray(Image.open(f"{run}/masks/{image_id}.png"))


def test_coco_export_loads_in_pycocotools_and_matches_the_masks(tiny_run, tmp_path):
    done = _export(tiny_run.out, "coco", tmp_path / "coco", "--copy-images")
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_pseudo.json"))
    assert done["images"] == len(coco.imgs) == N_PHOTOS and done["annotations"] == len(coco.anns) > 0
    assert coco.dataset["info"]["image_root"] == "images" and coco.dataset["info"]["random_weights"]
    for image in coco.imgs.values():
        assert not image["file_name"].startswith("/") and (tmp_path / "coco" / "images" / image["file_name"]).is_file()
        classes = _class_mask(tiny_run.out, image["mlcseg_image_id"])
        for a in coco.imgToAnns[image["id"]]:
            region = coco.annToMask(a).astype(bool)
            assert region.any() and (classes[region] == a["category_id"]).all()
    assert sorted(a["id"] for a in coco.anns.values()) == list(range(1, len(coco.anns) + 1))


def test_voc_export_has_the_masks_one_index_per_region_and_a_labelmap(tiny_run, tmp_path):
    done = _export(tiny_run.out, "voc", tmp_path / "voc")
    voc = tmp_path / "voc"
    ids = (voc / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    assert len(ids) == done["images"] == N_PHOTOS
    coco = COCO(f"{tiny_run.out}/pseudo_labels.json")
    by_id = {im["mlcseg_image_id"]: im for im in coco.imgs.values()}
    for image_id in ids:
        assert (voc / "SegmentationClass" / f"{image_id}.png").read_bytes() == (
            open(f"{tiny_run.out}/masks/{image_id}.png", "rb").read()
        )
        objects = np.asarray(Image.open(voc / "SegmentationObject" / f"{image_id}.png"))
        anns = coco.imgToAnns[by_id[image_id]["id"]]
        assert objects.max() == len(anns)
        for index, a in enumerate(anns, start=1):
            assert ((objects == index) == coco.annToMask(a).astype(bool)).all()
    labelmap = (voc / "labelmap.txt").read_text().splitlines()
    assert labelmap[1] == "background:0,0,0::" and len(labelmap) == 2 + done["classes"]


# Ultralytics' own reading of a data.yaml and its labels, in a process of its own: importing ultralytics patches
# PIL.Image.open for the whole process (a file PIL cannot identify then raises ModuleNotFoundError for pi_heif), which
# would change what the other tests in this worker see.
READ_WITH_ULTRALYTICS = """
import json, sys
from pathlib import Path
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import check_det_dataset
data = check_det_dataset(sys.argv[1])
labels = {
    Path(lb["im_file"]).name: {
        "cls": lb["cls"].ravel().astype(int).tolist(), "segments": [s.tolist() for s in lb["segments"]]
    }
    for lb in YOLODataset(data["train"], data=data, task="segment").labels
}
print(json.dumps({"data": {"nc": data["nc"], "train": str(data["train"])}, "labels": labels}))
"""


def _datumaro(*args) -> dict:
    if not DATUMARO.exists():
        pytest.skip("Datumaro's venv is missing: `make test` (or `make datumaro`) makes it")
    helper = Path(__file__).resolve().parents[1] / "helpers" / "datumaro_check.py"
    res = subprocess.run([str(DATUMARO), str(helper), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_datumaro_imports_the_coco_file_and_the_coco_and_voc_exports(tiny_run, tmp_path):
    """CVAT's dataset framework imports the run's own COCO file (with its image root beside it, as CVAT takes an
    upload), the ``coco`` export, and the ``voc`` export, whose masks it reads back equal to ours pixel for pixel."""
    coco = json.loads((Path(tiny_run.out) / "pseudo_labels.json").read_text())
    regions = len(coco["annotations"])
    own = tmp_path / "own"
    (own / "annotations").mkdir(parents=True)
    shutil.copy(Path(tiny_run.out) / "pseudo_labels.json", own / "annotations" / "instances_default.json")
    (own / "images").symlink_to(coco["info"]["image_root"])
    read = _datumaro("coco", own)
    assert (read["items"], read["masks"]) == (N_PHOTOS, regions) and regions > 0

    _export(tiny_run.out, "coco", tmp_path / "coco", "--copy-images")
    read = _datumaro("coco", tmp_path / "coco")
    assert (read["items"], read["masks"]) == (N_PHOTOS, regions)

    _export(tiny_run.out, "voc", tmp_path / "voc")
    read = _datumaro("voc", tmp_path / "voc", Path(tiny_run.out) / "masks")
    assert (read["items"], read["masks"], read["differing_pixels"]) == (N_PHOTOS, regions, 0)
    assert read["compared_pixels"] > 0


def _ultralytics_reads(data_yaml) -> tuple[dict, dict]:
    res = subprocess.run(
        [sys.executable, "-c", READ_WITH_ULTRALYTICS, str(data_yaml)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    read = json.loads(res.stdout.strip().splitlines()[-1])
    return read["data"], read["labels"]


def test_yolo_seg_loads_in_ultralytics_and_its_polygons_fill_back_to_the_regions(tiny_run, tmp_path):
    done = _export(tiny_run.out, "yolo-seg", tmp_path / "yolo")
    data, labels = _ultralytics_reads(tmp_path / "yolo" / "data.yaml")
    assert data["nc"] == done["classes"] and data["train"] == str(tmp_path / "yolo" / "images")
    coco = COCO(f"{tiny_run.out}/pseudo_labels.json")
    assert set(labels) == {image["file_name"] for image in coco.imgs.values()}
    rows = 0
    for image in coco.imgs.values():
        label, anns = labels[image["file_name"]], coco.imgToAnns[image["id"]]
        assert label["cls"] == [a["category_id"] - 1 for a in anns]
        for segment, a in zip(label["segments"], anns, strict=True):  # normalised (x, y), as Ultralytics holds them
            points = (np.asarray(segment) * [image["width"], image["height"]]).ravel().tolist()
            drawn = Image.new("L", (image["width"], image["height"]))
            ImageDraw.Draw(drawn).polygon(points, fill=1)
            region, filled = coco.annToMask(a).astype(bool), np.asarray(drawn).astype(bool)
            assert (region & filled).sum() / (region | filled).sum() >= 0.9
            rows += 1
    assert rows == done["annotations"] > 0


def test_a_region_in_pieces_with_a_hole_is_one_polygon():
    mask = np.zeros((60, 80), np.uint8)
    mask[5:40, 5:40] = 1
    mask[15:25, 15:25] = 0  # a hole
    mask[45:55, 50:75] = 1  # a second piece
    polygon = region_polygon(mask)
    drawn = Image.new("L", (80, 60))
    ImageDraw.Draw(drawn).polygon(polygon.ravel().tolist(), fill=1)
    filled = np.asarray(drawn).astype(bool)
    iou = (filled & mask.astype(bool)).sum() / (filled | mask.astype(bool)).sum()
    assert iou >= 0.9 and not filled[20, 20]  # the hole stays a hole
    assert mask_utils.area(mask_utils.encode(np.asfortranarray(mask))) == mask.sum()


def test_a_confidence_range_exports_the_sure_or_the_doubtful_and_bad_input_is_one_line(tiny_run, tmp_path):
    confidence = {r["image_id"]: r["confidence"] for r in pq.read_table(f"{tiny_run.out}/status.parquet").to_pylist()}
    middle = float(np.median(list(confidence.values())))
    sure = _export(tiny_run.out, "coco", tmp_path / "sure", "--min-confidence", middle)
    doubtful = _export(tiny_run.out, "coco", tmp_path / "doubtful", "--max-confidence", middle)
    assert sure["images"] == sum(c >= middle for c in confidence.values())
    assert doubtful["images"] == sum(c <= middle for c in confidence.values())
    shown = json.loads((tmp_path / "sure" / "annotations" / "instances_pseudo.json").read_text())["images"]
    assert all(confidence[im["mlcseg_image_id"]] >= middle for im in shown)
    for args, words in (
        (["--format", "tiff"], "unknown export format"),
        (["--format", "coco", "--out", tmp_path / "x"], "not a run folder"),
    ):
        run = tmp_path if "not a run folder" in words else tiny_run.out
        res = mlcseg("export", run, *args, *([] if "--out" in args else ["--out", tmp_path / "y"]))
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and words in res.stderr, res.stderr


def test_hf_export_loads_with_datasets_and_its_masks_are_the_runs(tiny_run, tmp_path):
    import datasets

    done = _export(tiny_run.out, "hf", tmp_path / "hf")
    hf = tmp_path / "hf"
    cache = str(tmp_path / "cache")
    images = datasets.load_dataset("parquet", data_files=str(hf / "data" / "*.parquet"), split="train", cache_dir=cache)
    assert len(images) == done["images"] == N_PHOTOS
    assert isinstance(images.features["image"], datasets.Image) and isinstance(images.features["mask"], datasets.Image)
    for row in images:
        assert (np.asarray(row["mask"]) == _class_mask(tiny_run.out, row["image_id"])).all()
        assert row["image"].size == (row["width"], row["height"]) and 0 <= row["confidence"] <= 1
    regions = datasets.load_dataset(
        "parquet", data_files=str(hf / "regions" / "*.parquet"), split="train", cache_dir=cache
    )
    assert len(regions) == done["annotations"] and set(regions["image_id"]) <= set(images["image_id"])
    assert all(len(b) == 4 for b in regions["bbox"]) and set(regions["class_id"]) <= set(range(1, done["classes"] + 1))
    card = (hf / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "RANDOM WEIGHTS" in card and "backbone: random-vit-tiny" in card


def test_the_classes_are_read_from_the_coco_files_tail_however_many(tmp_path):
    from mlcseg_ray.core.run_dir import RunDir
    from mlcseg_ray.library.exports import _classes

    run = RunDir(tmp_path)
    categories = [{"id": c, "name": f"cluster_{c}", "supercategory": "object"} for c in range(1, 5001)]
    head = '{"info": {},\n"images": [],\n"annotations": [],\n"categories": '
    run.coco.write_text(f"{head}{json.dumps(categories)}}}\n")  # as the label stage writes it
    assert len(json.dumps(categories)) > 4 * 65536 and _classes(run) == categories
