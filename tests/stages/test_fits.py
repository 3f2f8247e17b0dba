"""Issue 43: what a run learned is a fit, as files, and another run applies it to new images: no refit, each image's
masks and class ids those the fitted run gives it, and how far the new images are from the fit said."""

import json

import pyarrow.parquet as pq
import pytest

from helpers import TINY, TINY_CONFIG, copy_voc_images, mlcseg
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.library.fits import FIT_SCHEMA, LEVEL_FILES
from mlcseg_ray.pipeline import Pipeline

CONFIG = dict(TINY_CONFIG, region_descriptor="masked_mean", shard_size=4)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Run A on 8 VOC photos; run B applies A's fit to those 8 and 4 more, cut into other shards."""
    root = tmp_path_factory.mktemp("fits")
    first, more = copy_voc_images(root / "first", 8), copy_voc_images(root / "more", 12)
    a, b = RunDir(root / "A"), RunDir(root / "B")
    Pipeline(a.root, Config(**CONFIG), backend="local", images=str(first)).run(print_summary=False)
    applied = Config(**{**CONFIG, "shard_size": 5}, fit=str(a.root))
    Pipeline(b.root, applied, backend="local", images=str(more)).run(print_summary=False)
    return a, b, root


def test_a_fit_is_files_that_say_what_they_hold(fitted):
    a, b, _ = fitted
    record = json.loads(a.level_fit.read_text())
    assert record["schema"] == FIT_SCHEMA and record["feature_space"]["backbone"] == "random-vit-tiny"
    dim = record["feature_space"]["embed_dim"]
    assert record["feature_space"]["max_side"] == CONFIG["max_side"] and len(record["direction"]) == dim
    assert record["keys"] == {k: CONFIG.get(k, getattr(Config(), k)) for k in record["keys"]}
    assert 0 < record["far_below"] < 1
    groups = pq.read_table(a.level_groups)
    assert groups.num_rows == CONFIG["num_categories"] and groups.schema.field("centroid").type.list_size == dim
    assert pq.read_table(a.classes).column("class_id").to_pylist() == [1, 2, 3]
    # the applied run keeps the fit it applied, byte for byte, and says where it came from
    for name in (*LEVEL_FILES, "classes"):
        assert getattr(b, name).read_bytes() == getattr(a, name).read_bytes(), name
    copied = json.loads(b.level_fit.read_text())
    assert copied.pop("applied_from") == str(a.root) and copied.pop("levels_id") and copied == record


def test_an_applied_fit_gives_the_fitted_runs_masks_and_class_ids(fitted):
    a, b, _ = fitted
    ids = sorted(a.image_ids())
    assert len(ids) == 8 and set(ids) < b.image_ids()
    for image_id in ids:
        assert b.class_mask(image_id).read_bytes() == a.class_mask(image_id).read_bytes(), image_id
        assert b.binary_mask(image_id).read_bytes() == a.binary_mask(image_id).read_bytes(), image_id

    def classes(run):
        coco = json.loads(run.coco.read_text())
        name = {im["id"]: im["mlcseg_image_id"] for im in coco["images"]}
        return {(name[x["image_id"]], x["region"]): x["category_id"] for x in coco["annotations"]}

    theirs, ours = classes(a), classes(b)
    assert theirs and {key: ours[key] for key in theirs} == theirs  # the same class id for the same region
    assert len(ours) > len(theirs)  # and the new images are labelled too


def test_the_applied_run_says_how_far_its_images_are_from_the_fit(fitted):
    a, b, root = fitted
    stages = json.loads(b.run_record.read_text())["stages"]
    patches, regions = stages["cluster"]["drift"], stages["label"]["drift"]
    assert 0 <= patches["far_patches"] <= 1 and patches["far_patches_expected"] == 0.05
    assert 0 <= regions["far_regions"] <= 1 and len(regions["class_shares"]) == 3
    assert abs(sum(regions["fitted_class_shares"]) - 1) < 1e-3
    assert "drift" not in json.loads(a.run_record.read_text())["stages"]["cluster"]  # a run that fits itself
    page = b.report.read_text()
    assert f"{patches['far_patches']:.1%}" in page and str(a.root) in page


@pytest.mark.parametrize(
    "change,named", [("k_dataset=7", "k_dataset"), ("max_side=64", "max_side"), ("num_classes=5", "num_classes")]
)
def test_a_fit_of_another_shape_is_refused_naming_the_key(fitted, change, named):
    a, _, root = fitted
    out = root / f"refused_{named}"
    res = mlcseg("run", "--images", root / "more", "--out", out, "--fit", a.root, *TINY, change, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert named in line and str(a.root) in line and not out.exists()


def test_a_folder_without_a_fit_is_refused(fitted):
    _, _, root = fitted
    res = mlcseg("run", "--images", root / "more", "--out", root / "c", "--fit", root / "first", *TINY, timeout=120)
    assert res.returncode == 2 and "no fit there" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
