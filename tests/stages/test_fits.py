"""Issue 43: what a run learned is a fit, as files, and another run applies it to new images: no refit, each image's
masks and class ids those the fitted run gives it, and how far the new images are from the fit said."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from helpers import TINY, TINY_CONFIG, VOC_MASKS, VOC_SUBSET, copy_voc_images, mlcseg, need
from helpers.planted import PlantedSpec, foreground_iou, generate
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir, list_shards, shard_index
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
    assert stages["cluster"]["fit"] == f"applied from {a.root}"
    assert json.loads(a.run_record.read_text())["stages"]["cluster"]["fit"] == "refitted"
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


def test_a_fit_on_one_half_labels_the_other_half_as_well_as_a_fit_on_all(tmp_path):
    """On planted stores with known truth (the easy family): the second half's foreground IoU under a fit made on
    the first half alone is at most 0.01 below its IoU when the levels are fitted on both halves. (On the hard
    family the fit's own variance is larger than that, either way: the closing note of issue 43.)"""
    spec = PlantedSpec("easy", n_images=256, shard_size=32)
    full = generate(tmp_path / "full", spec, mask_dir=need(VOC_MASKS) / "SegmentationClass")
    halves = {}
    for name, keep in (("first", range(0, 4)), ("second", range(4, 8))):
        half = RunDir(shutil.copytree(full.root, tmp_path / name))
        for folder in (half.features, half.image_tables):
            for shard in list_shards(folder):
                if shard_index(shard) not in keep:
                    shard.unlink()
        halves[name] = half
    Pipeline(full.root, Config(), backend="local").run(["cluster"], print_summary=False)
    Pipeline(halves["first"].root, Config(), backend="local").run(["cluster"], print_summary=False)
    applied = Config(fit=str(halves["first"].root))
    Pipeline(halves["second"].root, applied, backend="local").run(["cluster"], print_summary=False)
    second = halves["second"].image_ids()
    assert len(second) == 128
    gt = full.root / "gt.parquet"
    on_all = foreground_iou(full, images=second)["mask"]
    from_first = foreground_iou(halves["second"], gt, images=second)["mask"]
    assert from_first >= on_all - 0.01, (from_first, on_all)


# what a frozen run rewrites when it grows: the merged files and the records, never an image's outputs or a marker
MERGED = {"pseudo_labels.json", "regions.parquet", "status.parquet", "report.html", "run.json", "config.yaml"}
MERGED |= {"manifest.parquet"}


def test_a_frozen_run_grows_without_moving(tmp_path, caplog):
    """refit=false: 5 images added to 8 cost their own 2 shards in every stage; every existing image's outputs
    and every marker stay as they were (bytes and times), and the COCO file gains the new images, the old ones
    keeping their ids."""
    images = copy_voc_images(tmp_path / "images", 8)
    cfg = Config(**CONFIG, refit=False)
    run = RunDir(tmp_path / "run")
    Pipeline(run.root, cfg, backend="local", images=str(images)).run(print_summary=False)

    def files():
        return {
            p.relative_to(run.root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run.root.rglob("*")
            if p.is_file() and not p.name.endswith("stage.json")
        }

    def coco_ids():
        return {im["mlcseg_image_id"]: im["id"] for im in json.loads(run.coco.read_text())["images"]}

    before, ids_before = files(), coco_ids()
    for p in sorted((need(VOC_SUBSET) / "JPEGImages").iterdir())[8:13]:
        shutil.copy(p, images / p.name)
    with caplog.at_level("INFO", logger="mlcseg_ray"):
        Pipeline(run.root, cfg, backend="local", images=str(images)).run(print_summary=False)
    for stage in ("extract", "cluster", "refine", "describe", "label"):
        assert f"{stage}: 2 of 4 shards new or changed; the others kept" in caplog.text, stage
    after = files()
    assert {k for k in before if after.get(k) != before[k]} <= MERGED
    assert len(after) > len(before) and len(run.read_status()) == 13
    assert json.loads(run.run_record.read_text())["stages"]["cluster"]["fit"] == "kept (frozen)"
    ids_after = coco_ids()
    assert len(ids_after) == 13 and {i: ids_after[i] for i in ids_before} == ids_before


@pytest.mark.slow
def test_a_fit_applied_to_new_photos_labels_them_as_the_frozen_run_that_grew_to_them(tmp_path):
    """The VOC photos (random-weight backbone): a frozen run fitted on the first 40 that then grew to all 59, and a
    run applying its fit to the other 19 alone, give those 19 the same class masks, byte for byte."""
    voc = sorted((need(VOC_SUBSET) / "JPEGImages").iterdir())
    assert len(voc) == 59
    grown, rest = tmp_path / "grown", tmp_path / "rest"
    for folder, photos in ((grown, voc[:40]), (rest, voc[40:])):
        folder.mkdir()
        for p in photos:
            shutil.copy(p, folder / p.name)
    frozen = RunDir(tmp_path / "frozen")
    cfg = Config(**CONFIG, refit=False)
    Pipeline(frozen.root, cfg, backend="local", images=str(grown)).run(print_summary=False)
    applied = RunDir(tmp_path / "applied")
    Pipeline(applied.root, Config(**CONFIG, fit=str(frozen.root)), backend="local", images=str(rest)).run(
        print_summary=False
    )
    for p in voc[40:]:
        shutil.copy(p, grown / p.name)
    Pipeline(frozen.root, cfg, backend="local", images=str(grown)).run(print_summary=False)
    new = sorted(applied.image_ids())
    assert len(new) == 19 and set(new) < frozen.image_ids()
    for image_id in new:
        assert applied.class_mask(image_id).read_bytes() == frozen.class_mask(image_id).read_bytes(), image_id
