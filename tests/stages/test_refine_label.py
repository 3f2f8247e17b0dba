import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from helpers import VOC_MASKS, copy_voc_images, mlcseg, need
from helpers.badinputs import make_corpus
from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.masks import voc_palette
from mlcseg_ray.ops.crf import CrfParams, crf_refine, local_crf_batch, upsample_score
from mlcseg_ray.ops.regions import find_regions
from mlcseg_ray.pipeline import Pipeline


def test_upsample_undoes_padding_and_resize():
    # a 500x375 image at scale 1 with patch 8: grid 47x63, padding 1 row / 4 columns
    score = np.zeros((47, 63), np.float32)
    score[:, -1] = 1.0  # last patch column (half of it is padding)
    prob = upsample_score(score.ravel(), (47, 63), 8, (375, 500), (375, 500))
    assert prob.shape == (375, 500)
    assert prob[:, -1].mean() > 0.5 and prob[:, :480].max() < 0.01
    # resized by 0.5: the map comes back at the original size
    prob = upsample_score(np.ones(12, np.float32), (3, 4), 8, (24, 32), (48, 64))
    assert prob.shape == (48, 64) and np.allclose(prob, 1)


@pytest.mark.parametrize("refiner", ["densecrf", "torch"])
def test_crf_raises_boundary_agreement(refiner):
    rng = np.random.default_rng(0)
    H, W = 120, 160
    yy, xx = np.mgrid[:H, :W]
    truth = (yy - 60) ** 2 + (xx - 85) ** 2 < 40**2
    rgb = np.where(truth[..., None], [200, 60, 40], [40, 90, 200]).astype(np.float64)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    # a coarse, shifted, blurred soft mask, like an upsampled patch score
    coarse = Image.fromarray((np.roll(truth, 6, axis=1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(10))
    prob = np.asarray(coarse, np.float32) / 255 * 0.7 + 0.15
    before = prob > 0.5
    if refiner == "densecrf":
        after = crf_refine(rgb, prob, CrfParams.of(Config()))
    else:
        after = local_crf_batch([(rgb, prob)], CrfParams.of(Config()), "cpu")[0]

    def iou(a):
        return (a & truth).sum() / (a | truth).sum()

    assert iou(after) > iou(before) + 0.05 and iou(after) > 0.9, (iou(before), iou(after))


def test_regions():
    m = np.zeros((20, 20), bool)
    m[2:8, 2:8] = True  # 36 px
    m[15:17, 15:17] = True  # 4 px: below min area
    comp, regions = find_regions(m, "component", min_area=10)
    assert len(regions) == 1 and regions[0]["area"] == 36 and (regions[0]["x0"], regions[0]["x1"]) == (2, 8)
    assert comp.max() == 1 and comp[16, 16] == 0
    _, regions = find_regions(m, "image", min_area=1)
    assert len(regions) == 1 and regions[0]["area"] == 40
    assert find_regions(np.zeros((5, 5), bool), "component", 1)[1] == []
    assert voc_palette()[3:6] == [128, 0, 0]


def test_regions_beyond_max_regions_join_their_nearest_kept_region():
    m = np.zeros((40, 40), bool)
    m[1:11, 1:11] = True  # 100 px, kept
    m[1:6, 20:26] = True  # 30 px: joins the nearer kept region (the first)
    m[25:39, 25:39] = True  # 196 px, kept
    m[30:34, 5:9] = True  # 16 px: nearer the first region than the 196 px one? no: distance decides
    m[0, 39] = True  # 1 px: below min_area, background
    comp, regions = find_regions(m, "component", min_area=10, max_regions=2)
    assert [r["area"] for r in regions] == [100, 196]  # the two largest, numbered in scan order
    assert (comp[1:6, 20:26] == 1).all() and comp[0, 39] == 0
    from scipy import ndimage

    d1 = ndimage.distance_transform_edt(comp != 1)[30:34, 5:9].min()
    d2 = ndimage.distance_transform_edt(comp != 2)[30:34, 5:9].min()
    assert d1 == 0 or d2 == 0  # the 16 px component took a kept region's label
    assert sum(r["joined"] for r in regions) == 30 + 16
    assert ((comp > 0) == (m & ~np.isin(np.arange(40 * 40).reshape(40, 40), [39]))).all()  # no foreground lost
    same, unbounded = find_regions(m, "component", min_area=10)[1], find_regions(m, "component", 10, max_regions=0)[1]
    assert len(same) == len(unbounded) == 4 and all(r["joined"] == 0 for r in same)


def test_crf_at_a_bounded_resolution(tmp_path):
    """The CRF at a smaller size, the mask brought back: full-size output, nearly the same pixels."""
    from helpers import VOC_SUBSET, need
    from mlcseg_ray.ops.crf import crf_size, refine_image

    assert crf_size(375, 500, 512) == (375, 500) and crf_size(480, 640, 512) == (384, 512)
    photo = sorted((need(VOC_SUBSET) / "JPEGImages").iterdir())[0]
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    H, W = rgb.shape[:2]
    gh, gw = H // 16, W // 16
    yy, xx = np.mgrid[:gh, :gw]
    score = (((yy - gh / 2) ** 2 + (xx - gw / 2) ** 2) < (min(gh, gw) / 3) ** 2).astype(np.float32).ravel()
    geom = {"width": W, "height": H, "grid_h": gh, "grid_w": gw, "resized_h": gh * 16, "resized_w": gw * 16}
    full = refine_image(rgb, score, geom, 16, CrfParams.of(Config(crf_max_side=0)))
    small = refine_image(rgb, score, geom, 16, CrfParams.of(Config(crf_max_side=max(H, W) // 2)))
    assert small.shape == full.shape == (H, W)
    assert (small != full).mean() < 0.05


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("e2e")
    images = copy_voc_images(root / "images", 8)
    corpus = make_corpus(root / "bad", with_bomb=False)
    for name in ("exif_rotated.jpg", "zero.jpg", "truncated.jpg", "cmyk.jpg"):
        shutil.copy(root / "bad" / name, images / name)
    cfg = Config(
        backbone="random-vit-tiny",
        shard_size=4,
        max_side=160,
        num_classes=4,
        num_categories=3,
        min_region_area=16,
        crop_size=32,
    )
    pipe = Pipeline(root / "run", cfg, images=str(images))
    pipe.run()
    return pipe, images, corpus


def _copy(e2e, tmp_path, **changes) -> Pipeline:
    """A pipeline over a copy of the fixture's run, its config changed by ``changes``: the fixture stays as made."""
    root = shutil.copytree(e2e[0].run_dir.root, tmp_path / "run")
    return Pipeline(root, e2e[0].cfg.model_copy(update=changes))


def test_end_to_end_outputs(e2e):
    pipe, images, _ = e2e
    run = pipe.run_dir
    manifest = {r["image_id"]: r for r in run.read_status()}
    assert manifest["zero"]["status"] == "error" and "empty" in manifest["zero"]["error"]
    assert manifest["truncated"]["status"] == "error" and "truncated" in manifest["truncated"]["error"]
    ok = [i for i, r in manifest.items() if r["status"] == "ok"]
    assert len(ok) == 10
    for image_id in ok:
        src = next(images.glob(f"{image_id}.*"))
        with Image.open(src) as im:
            from PIL import ImageOps

            size = ImageOps.exif_transpose(im).size
        for folder in (run.binary, run.masks):
            m = Image.open(folder / f"{image_id}.png")
            assert m.size == size, (image_id, folder)
        assert Image.open(run.masks / f"{image_id}.png").mode == "P"
    assert Image.open(run.masks / "exif_rotated.png").size == (32, 64)  # the rotated photo's shape
    for bad in ("zero", "truncated"):  # failed images: an error row, and no output file pretending otherwise
        assert not (run.masks / f"{bad}.png").exists()
    rec = json.loads(run.run_record.read_text())
    assert rec["backbone"]["random_weights"] is True


def test_coco_json_round_trips_to_the_masks(e2e):
    from pycocotools import mask as mu
    from pycocotools.coco import COCO

    run = e2e[0].run_dir
    coco = COCO(str(run.coco))
    assert len(coco.dataset["images"]) == 10 and coco.dataset["info"]["random_weights"] is True
    assert coco.dataset["annotations"], "the random backbone still finds some regions"
    ids = {im["id"]: im["mlcseg_image_id"] for im in coco.dataset["images"]}
    for image_id, coco_id in ((v, k) for k, v in ids.items()):
        cls = np.asarray(Image.open(run.masks / f"{image_id}.png"))
        rebuilt = np.zeros_like(cls)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=coco_id)):
            m = mu.decode(a["segmentation"]).astype(bool)
            assert m.sum() == a["area"] and 1 <= a["category_id"] <= 4
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert not (rebuilt[m] > 0).any()  # regions do not overlap
            rebuilt[m] = a["category_id"]
        np.testing.assert_array_equal(rebuilt, cls)
    regions = pq.read_table(run.regions).to_pylist()
    assert len(regions) == len(coco.dataset["annotations"])


def test_each_label_shard_finds_its_own_coco_ids(e2e, tmp_path):
    """A label task reads its images' COCO ids itself (no map of every image shipped to every task): together the
    shards give each image its position in the sorted manifest; a brought-in store, its position among its ids."""
    from mlcseg_ray.core.run_dir import RunDir
    from mlcseg_ray.library.labelling import coco_image_ids

    run = e2e[0].run_dir
    manifest = pq.read_table(run.manifest).to_pylist()
    assert [r["image_id"] for r in manifest] == sorted(r["image_id"] for r in manifest)
    got = {}
    for n in run.pseudo_shards():
        part = coco_image_ids(run, n)
        assert set(part) == {r["image_id"] for r in manifest if r["shard"] == n}
        got.update(part)
    assert got == {r["image_id"]: i + 1 for i, r in enumerate(manifest) if r["image_id"] in got}

    brought = RunDir(tmp_path / "brought")  # image tables alone, as a store made elsewhere
    shutil.copytree(run.image_tables, brought.image_tables)
    ids = sorted(
        i for p in sorted(brought.image_tables.iterdir()) for i in pq.read_table(p).column("image_id").to_pylist()
    )
    got = {}
    for n in run.pseudo_shards():
        got.update(coco_image_ids(brought, n))
    assert got == {i: k + 1 for k, i in enumerate(ids)}


def test_coco_json_and_regions_streamed_from_fragments_equal_the_ones_built_in_memory(e2e):
    """finish streams the shards' fragments into one file: the result is the COCO dict an in-memory merge makes
    (every ok image with a class mask, ids as the manifest gives them, annotations numbered in shard order), and
    the regions table is the parts concatenated. Images are named below the image folder, as COCO readers expect."""
    run, folder = e2e[0].run_dir, e2e[1]
    manifest = pq.read_table(run.manifest).to_pylist()  # sorted by id: positions are the ids where none is given
    ids = {r["image_id"]: r["coco_id"] if r["coco_id"] is not None else i + 1 for i, r in enumerate(manifest)}
    masked = run.mask_ids(run.masks)
    shards = run.pseudo_shards()
    assert len(shards) > 2  # several fragments: the stream crosses parts
    images, annotations = [], []
    for n in shards:
        for r in pq.read_table(run.image_table(n)).to_pylist():
            if r["status"] == "ok" and r["image_id"] in masked:
                images.append(
                    {
                        "id": ids[r["image_id"]],
                        "file_name": Path(r["uri"]).relative_to(folder).as_posix(),
                        "width": r["width"],
                        "height": r["height"],
                        "mlcseg_image_id": r["image_id"],
                    }
                )
        annotations += json.loads(run.coco_part(n).read_text())["annotations"]
    streamed = json.loads(run.coco.read_text())
    assert streamed["images"] == sorted(images, key=lambda x: x["id"])
    assert streamed["annotations"] == [{**a, "id": i + 1} for i, a in enumerate(annotations)]
    assert [c["id"] for c in streamed["categories"]] == [1, 2, 3, 4] and streamed["info"]["random_weights"] is True
    assert streamed["info"]["image_root"] == str(folder.absolute())
    assert all((folder / im["file_name"]).is_file() for im in streamed["images"])  # what detectron2 would open
    parts = pa.concat_tables([pq.read_table(run.labelled_part(n)) for n in shards])
    assert pq.read_table(run.regions).equals(parts)


def test_eval_after_the_run_is_remembered_and_the_report_shows_the_truth(e2e, tmp_path):
    """Issue 41 item 3: `mlcseg eval RUN GT` on a run folder records what it evaluated against, so the report shows
    the truth beside the masks as it does for a run evaluated in place; metrics written elsewhere record nothing."""
    from mlcseg_ray.library.report_page import write_report

    run, gt = _copy(e2e, tmp_path).run_dir, need(VOC_MASKS)
    res = mlcseg("eval", run.root, gt, "--out", tmp_path / "elsewhere", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "evaluation" not in run.read_record()
    res = mlcseg("eval", run.root, gt, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert run.read_record()["evaluation"] == {"gt": str(gt.absolute()), "protocol": "voc21", "split": "val"}
    write_report(run, e2e[0].cfg)
    page = run.report.read_text()
    assert page.count("data-panel='truth'") >= 1 and page.count("data-panel='matched'") >= 1


def test_report_renders_with_its_images(e2e):
    run = e2e[0].run_dir
    page = run.report.read_text()
    assert "RANDOM WEIGHTS" in page and "Class clusters" in page and "Errors" in page
    import re

    srcs = re.findall(r"src='([^']+)'", page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # one self-contained file
    assert not (run.root / "report_assets").exists()


@pytest.mark.slow
def test_empty_foreground_gives_background_and_no_region(e2e, tmp_path):
    pipe = _copy(e2e, tmp_path, min_region_area=10**9)
    run = pipe.run_dir
    pipe.run(["label"])
    coco = json.loads(run.coco.read_text())
    assert coco["annotations"] == [] and len(coco["images"]) == 10
    for p in run.masks.glob("*.png"):
        assert np.asarray(Image.open(p)).max() == 0


def test_confidence_reaches_the_coco_json_and_min_confidence_drops_doubtful_images(e2e, tmp_path):
    """Each image's confidence (cluster) is its annotations' COCO score and its regions' confidence; with
    min_confidence, the images below it keep a mask (all background), lose their annotations and are flagged."""
    pipe = e2e[0]
    run = pipe.run_dir
    conf = {r["image_id"]: r["confidence"] for r in run.read_status() if r["status"] == "ok"}
    assert all(c is not None and 0 <= c <= 1 for c in conf.values())
    coco = json.loads(run.coco.read_text())
    ids = {im["id"]: im["mlcseg_image_id"] for im in coco["images"]}
    annotated = {ids[a["image_id"]] for a in coco["annotations"]}
    for a in coco["annotations"]:
        assert a["score"] == pytest.approx(conf[ids[a["image_id"]]], abs=1e-4) and -1 <= a["class_score"] <= 1
    for r in pq.read_table(run.regions).to_pylist():
        assert r["confidence"] == pytest.approx(conf[r["image_id"]], abs=1e-4)
    threshold = float(np.median([conf[i] for i in annotated])) + 1e-6
    low = {i for i in annotated if conf[i] < threshold}
    assert low and low != annotated
    per_image = {i: sum(ids[a["image_id"]] == i for a in coco["annotations"]) for i in annotated}
    changed = _copy(e2e, tmp_path, min_confidence=threshold)
    changed.run(["label"])
    run = changed.run_dir
    after = json.loads(run.coco.read_text())
    kept = [ids[a["image_id"]] for a in after["annotations"]]
    assert not set(kept) & low and len(after["images"]) == len(coco["images"])
    assert all(kept.count(i) == per_image[i] for i in annotated - low)
    status = {r["image_id"]: r for r in run.read_status()}
    for i in low:
        assert np.asarray(Image.open(run.class_mask(i))).max() == 0 and status[i]["flag"] == "doubtful"


@pytest.mark.browser
def test_report_renders_in_headless_chromium(e2e, tmp_path):
    """The report as a user sees it, with the run's error rows: Debian's Chromium renders it headless."""
    from helpers.browser import probe, screenshot

    pipe = e2e[0]
    run = pipe.run_dir
    Pipeline(run.root, pipe.cfg).run(["report"])  # the fixture's report, whatever the tests before did to the run
    img = np.asarray(Image.open(screenshot(run.report, tmp_path / "report.png")).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    assert (np.abs(img.astype(int) - 255).sum(-1) > 30).mean() > 0.02  # not a blank page: text, banner, overlays
    assert ((img[..., 0] > 180) & (img[..., 1] < 40) & (img[..., 2] < 40)).sum() > 1000  # the red random-weights banner
    seen = probe(run.report, tmp_path)
    assert seen["images"] and all(i["decoded"] for i in seen["images"])
    assert "Errors (2)" in seen["headings"]
    page = run.report.read_text()
    assert "zero" in page and "truncated" in page  # the failed images, with their reasons


@pytest.mark.slow
def test_max_regions_bounds_the_work_and_labels_all_foreground(e2e, tmp_path):
    """At most one described region per image; the other components still get a class, and the COCO file still
    rebuilds every class mask."""
    from scipy import ndimage

    pipe = _copy(e2e, tmp_path, max_regions=1)
    run = pipe.run_dir
    pipe.run(["label"])
    regions = pq.read_table(run.regions).to_pylist()
    per_image = {}
    for r in regions:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert per_image and max(per_image.values()) == 1
    for image_id in per_image:
        binary = np.asarray(Image.open(run.binary_mask(image_id))) > 0
        comp, n = ndimage.label(binary, structure=np.ones((3, 3), int))
        big = np.isin(comp, [c for c in range(1, n + 1) if (comp == c).sum() >= pipe.cfg.min_region_area])
        classes = np.asarray(Image.open(run.masks / f"{image_id}.png"))
        assert ((classes > 0) == big).all()  # every component above min_region_area is labelled
    test_coco_json_round_trips_to_the_masks((pipe,))


def test_crops_are_the_configured_size():
    """crop_size is what the network sees."""
    from mlcseg_ray.ops.regions import crop_batch

    rgb = np.zeros((50, 80, 3), np.uint8)
    regions = [{"x0": 0, "y0": 0, "x1": 10, "y1": 20}, {"x0": 30, "y0": 5, "x1": 80, "y1": 50}]
    batch = crop_batch(rgb, regions, 48, [0.5] * 3, [0.25] * 3)
    assert batch.shape == (2, 3, 48, 48) and np.allclose(batch, -2.0)  # (0 - 0.5) / 0.25
    assert crop_batch(rgb, [], 48, [0] * 3, [1] * 3).shape == (0, 3, 48, 48)


def test_a_shards_crops_go_to_the_embedder_together(e2e):
    from mlcseg_ray.core.run_dir import shard_index
    from mlcseg_ray.library.region_descriptors import describe_shard

    pipe = e2e[0]
    run = pipe.run_dir
    calls = []

    def embed(batch):
        calls.append(batch.shape)
        return np.zeros((len(batch), 48), np.float32)

    shard = shard_index(sorted(run.pseudo.glob("part-*.parquet"))[0])
    table, _ = describe_shard(run, shard, pipe.cfg, embed)
    # full batches across the shard's images, handed over as they fill (issue 45), the rest at the end
    bs = pipe.cfg.batch_size
    assert sum(c[0] for c in calls) == table.num_rows > 1 and all(c[0] % bs == 0 for c in calls[:-1])
    assert len(calls) <= -(-table.num_rows // bs) and all(c[2:] == (pipe.cfg.crop_size,) * 2 for c in calls)


def test_label_takes_describes_regions_and_leaves_out_an_image_it_failed_on(e2e, tmp_path, monkeypatch):
    """Label never finds the regions again: it paints describe's RLEs, and an image describe failed on (absent
    from the part's ``described`` list) gets no class mask and no COCO entry, while the others are as before."""
    from mlcseg_ray.core.errors import BadImage
    from mlcseg_ray.core.run_dir import RunDir, shard_index
    from mlcseg_ray.core.tables import atomic_write_table, read_table
    from mlcseg_ray.library import region_descriptors
    from mlcseg_ray.library.labelling import ClassFit, write_shard_labels

    run = RunDir(shutil.copytree(e2e[0].run_dir.root, tmp_path / "run"))
    cfg = e2e[0].cfg
    shard = shard_index(sorted(run.region_parts.glob("part-*.parquet"))[0])
    part = read_table(run.region_part(shard))
    described = region_descriptors.described_images(part)
    with_regions = sorted(set(part.column("image_id").to_pylist()))
    assert len(with_regions) >= 2 and set(with_regions) <= set(described)
    victim, kept = with_regions[0], with_regions[1]
    masks_before = {i: run.class_mask(i).read_bytes() for i in described}
    coco_before = json.loads(run.coco_part(shard).read_text())
    run.class_mask(victim).unlink()

    real = region_descriptors.read_binary

    def failing(path):
        if Path(path) == run.binary_mask(victim):
            raise BadImage("cannot read this mask")
        return real(path)

    monkeypatch.setattr(region_descriptors, "read_binary", failing)
    table, errors = region_descriptors.describe_shard(run, shard, cfg, lambda b: np.zeros((len(b), 192), np.float32))
    assert set(errors) == {victim} and victim not in region_descriptors.described_images(table)
    assert victim not in table.column("image_id").to_pylist()
    atomic_write_table(run.region_part(shard), table)
    centroids = np.random.default_rng(0).normal(size=(cfg.num_classes, 192)).astype(np.float32)
    write_shard_labels(run, shard, ClassFit(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), 4), 0.0)

    assert not run.class_mask(victim).exists()
    coco = json.loads(run.coco_part(shard).read_text())
    assert victim not in {im["mlcseg_image_id"] for im in coco["images"]}
    assert {im["mlcseg_image_id"] for im in coco["images"]} == set(described) - {victim}
    # the kept image's class mask: its regions' pixels painted from the RLEs, the same pixels as before
    before = np.asarray(Image.open(io.BytesIO(masks_before[kept]))) > 0
    assert ((np.asarray(Image.open(run.class_mask(kept))) > 0) == before).all()
    victim_coco_id = next(im["id"] for im in coco_before["images"] if im["mlcseg_image_id"] == victim)
    assert len(coco["annotations"]) == sum(a["image_id"] != victim_coco_id for a in coco_before["annotations"])
