"""report.html as a user sees it: rendered by headless Chromium (installed by `make browser`), every panel decoded,
the legends telling the colours the masks really hold, the images chosen the same however the run was sharded,
and the page small for a run of a few hundred images."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import VOC_SUBSET, need
from helpers.browser import probe, screenshot
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.library.report_choice import bounded, candidates, choose_images
from mlcseg_ray.library.report_panels import CROP, GALLERY_SIZE, PANEL
from mlcseg_ray.pipeline import Pipeline

PANELS = {"photo", "level-dataset", "level-category", "level-image", "combined", "refined", "classes"}
TRUTH_PANELS = {"matched", "truth"}
CFG = dict(backbone="random-vit-tiny", num_categories=3, min_region_area=16, crop_size=32)


def synthetic_photos(dest: Path, n: int, seed: int = 0) -> Path:
    """``n`` small photos: a bright disc on a noisy background of its own colour each."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:48, :64]
    for k in range(n):
        img = rng.integers(0, 60, (48, 64, 3)).astype(np.uint8) + rng.integers(0, 120, 3).astype(np.uint8)
        cy, cx, r = rng.integers(12, 36), rng.integers(12, 52), rng.integers(6, 14)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(120, 255, 3)
        Image.fromarray(img).save(dest / f"img{k:04d}.png")
    return dest


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory, ray_local):
    """An evaluated run: 12 VOC photos with their ground truth."""
    root = tmp_path_factory.mktemp("voc_report")
    cfg = Config(**CFG, max_side=128, shard_size=5, num_classes=6, report_samples=10)
    Pipeline(root / "run", cfg, voc=str(need(VOC_SUBSET)), limit=12).run()
    return RunDir(root / "run"), cfg


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("big_report")
    cfg = Config(**CFG, max_side=64, shard_size=64, num_classes=4)
    Pipeline(root / "run", cfg, images=str(synthetic_photos(root / "images", 300))).run()
    return RunDir(root / "run"), cfg


def _decode(src: str) -> Image.Image:
    assert src.startswith("data:image/"), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def _rgb(palette: list[int], c: int) -> str:
    return "rgb({}, {}, {})".format(*palette[3 * c : 3 * c + 3])


@pytest.mark.browser
def test_evaluated_report_in_chromium(voc_run, tmp_path):
    run, cfg = voc_run
    seen = probe(run.report, tmp_path)
    assert seen["banner"] and "RANDOM WEIGHTS" in seen["banner"]
    broken = [(i["panel"], i["image"]) for i in seen["images"] if not i["decoded"]]
    assert not broken, f"images Chromium could not decode: {broken}"
    by_image: dict[str, dict[str, dict]] = {}
    for i in seen["images"]:
        if i["image"]:
            by_image.setdefault(i["image"], {})[i["panel"]] = i
    assert 0 < len(by_image) <= cfg.report_samples
    for image_id, panels in by_image.items():  # every panel type, for every image shown
        assert set(panels) == PANELS | TRUTH_PANELS, image_id
        assert max(panels["photo"]["width"], panels["photo"]["height"]) <= PANEL
        sizes = {(p["width"], p["height"]) for k, p in panels.items() if k != "photo"}
        assert len(sizes) == 1, (image_id, sizes)  # every mask panel in the photo's frame, at one size
    assert {i["panel"] for i in seen["images"]} >= PANELS | TRUTH_PANELS | {"confusion", "crop"}

    # the legend beside each class mask names exactly the classes in that image's mask, in the mask's colours
    palette = Image.open(next(run.masks.glob("*.png"))).getpalette()
    for image_id, panels in by_image.items():
        ids = {int(c) for c in np.unique(np.asarray(Image.open(run.class_mask(image_id)))) if c}
        legend = {s["cls"]: s["colour"] for s in seen["swatches"] if s["image"] == image_id}
        assert set(legend) == ids, image_id
        assert all(colour == _rgb(palette, c) for c, colour in legend.items()), image_id
        shown = _decode(panels["classes"]["src"]).convert("RGB")
        colours = {"rgb({}, {}, {})".format(*c) for _, c in shown.getcolors(1 << 16)}
        assert colours <= {*legend.values(), _rgb(palette, 0)}, image_id
    gallery = {s["cls"]: s["colour"] for s in seen["swatches"] if s["panel"] == "gallery"}
    assert set(gallery) == set(range(1, cfg.num_classes + 1))  # every class said, the empty ones too
    assert all(colour == _rgb(palette, c) for c, colour in gallery.items())

    # the worst and best by IoU, and the numbers as pictures
    import json

    metrics = json.loads(run.metrics.read_text())
    worst = metrics["per_image_foreground_iou"]["worst"]
    assert seen["headings"][seen["headings"].index("Images, level by level") + 1].startswith("Worst by foreground IoU")
    first_block = next(i["image"] for i in seen["images"] if i["image"])
    assert first_block == worst[0][0]
    charts = {c["label"]: c for c in seen["charts"]}
    scored = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert charts["IoU per class"]["rects"] == len(scored)
    assert {"seconds per stage", "images by foreground share", "images by foreground IoU"} <= set(charts)
    assert all(c["width"] > 100 for c in charts.values())


@pytest.mark.browser
def test_report_screenshot_is_a_page_of_pictures(voc_run, tmp_path):
    run, _ = voc_run
    img = np.asarray(Image.open(screenshot(run.report, tmp_path / "shot.png", (1400, 3000))).convert("RGB"))
    assert img.shape[:2] == (3000, 1400)
    assert ((img[..., 0] > 180) & (img[..., 1] < 40) & (img[..., 2] < 40)).sum() > 1000  # the red banner
    colourful = (img.max(-1).astype(int) - img.min(-1)) > 60
    assert colourful[1000:].mean() > 0.05  # panels below the charts, not text alone


@pytest.mark.slow
def test_report_of_a_few_hundred_images_stays_small(big_run, tmp_path):
    run, cfg = big_run
    page = run.report.read_text()
    assert len(page.encode()) < 1_000_000
    seen = probe(run.report, tmp_path)
    assert all(i["decoded"] for i in seen["images"])
    shown = {i["image"] for i in seen["images"] if i["image"]}
    assert len(shown) == cfg.report_samples
    crops = [i for i in seen["images"] if i["panel"] == "crop"]
    assert 0 < len(crops) <= cfg.num_classes * GALLERY_SIZE
    assert all(max(c["width"], c["height"]) <= CROP for c in crops)
    assert any(h.startswith("Foreground share of the patch masks (300 images)") for h in seen["headings"])
    assert re.search(r"300 images &middot; 300 with masks", page)


def _rows(n: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        levels = [rng.random(12) < 0.5 for _ in range(3)]
        flag = "empty" if k % 17 == 0 else None
        out.append((f"im{k:03d}", flag, levels[0] & levels[1], levels))
    return out


def test_images_chosen_do_not_depend_on_the_sharding():
    rows = _rows(120)

    def parts(shard_size):
        out = []
        for s in range(0, len(rows), shard_size):
            chunk = rows[s : s + shard_size]
            out.append(
                candidates(
                    [r[0] for r in chunk],
                    [r[1] for r in chunk],
                    [r[2] for r in chunk],
                    [[r[3][lv] for r in chunk] for lv in range(3)],
                    quota=24,
                )
            )
        return out

    ids = {r[0] for r in rows}
    metrics = {"per_image_foreground_iou": {"worst": [["im005", 0.0], ["im007", 0.1]], "best": [["im009", 0.9]]}}
    a, b = (choose_images(parts(s), 24, metrics, ids) for s in (7, 64))
    assert a.groups == b.groups and a.share_hist == b.share_hist and a.flag_counts == b.flag_counts == {"empty": 8}
    assert list(a.groups)[:3] == ["Worst by foreground IoU", "Best by foreground IoU", "Flagged"]
    assert a.groups["Worst by foreground IoU"] == ["im005", "im007"]
    chosen = [i for g in a.groups.values() for i in g]
    assert len(chosen) == len(set(chosen)) == 24  # each image once, the budget filled
    assert sum(a.share_hist) == 120
    # an image without a mask (it failed after clustering) is never shown
    c = choose_images(parts(64), 24, metrics, ids - {"im005"})
    assert "im005" not in {i for g in c.groups.values() for i in g}


def test_least_confident_lists_only_images_the_run_is_unsure_of():
    """A run sure of every image shows none under "Least confident" (issue 41: a demo run listed all four of its
    images there at confidence 0.98); a doubtful image is shown with its confidence."""
    rows = _rows(8)

    def choice(confidence):
        part = candidates(
            [r[0] for r in rows],
            [None] * len(rows),
            [r[2] for r in rows],
            [[r[3][lv] for r in rows] for lv in range(3)],
            quota=24,
            confidence=confidence,
        )
        return choose_images([part], 24, None, {r[0] for r in rows})

    sure = choice([0.98] * len(rows))
    assert "Least confident" not in sure.groups and sum(len(g) for g in sure.groups.values()) == len(rows)
    unsure = choice([0.98] * 5 + [0.3, 0.1, 0.49])
    assert unsure.groups["Least confident"] == ["im006", "im005", "im007"]
    assert unsure.why["im006"] == "confidence 0.10"


def test_candidates_bounded_as_they_come_choose_the_same_images():
    """The report gathers shards' candidates a chunk at a time and keeps only what a choice can use: with every
    image its own shard, the driver ends with a few hundred candidates of 2,000 images, and the same choice."""
    rows = _rows(2000, seed=1)
    parts = [candidates([r[0]], [r[1]], [r[2]], [[r[3][lv]] for lv in range(3)], quota=24) for r in rows]
    everyone = {r[0] for r in rows}
    victim = next(iter(choose_images(parts, 24, None, everyone).groups.values()))[0]
    ids = everyone - {victim}  # a chosen image loses its mask: another takes its place
    keep = 4 * 24 + 16
    few: list[dict] = []
    for start in range(0, len(parts), 300):
        few = bounded(few + parts[start : start + 300], keep)
    assert len(few) <= 4 * keep + 1
    a, b = choose_images(parts, 24, None, ids), choose_images(few, 24, None, ids)
    assert a.groups == b.groups and a.share_hist == b.share_hist and a.flag_counts == b.flag_counts
    assert sum(b.share_hist) == 2000 and sum(len(g) for g in b.groups.values()) == 24
    assert victim not in {i for g in b.groups.values() for i in g}
