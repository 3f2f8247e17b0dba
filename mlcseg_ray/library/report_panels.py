"""The report's pictures: each chosen image's panels (photo, the three levels, the combined patch mask, the refined
mask, the class mask, the ground truth on an evaluated run) and the class galleries of the largest regions; every
thumbnail small and inlined."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.config import Config
from ..core.errors import BadImage
from ..core.run_dir import RunDir
from ..core.tables import iter_batches, read_table
from ..formats.datasets import EvalError, load_ground_truth
from ..formats.feature_store import GEOMETRY_COLUMNS, first_store_metadata
from ..formats.images import load_rgb
from ..formats.masks import read_mask, voc_palette
from .report_choice import LEVELS, Choice
from .report_widgets import esc, hex_colour, jpeg_uri, png_uri, swatch

PANEL = 150  # a panel's longest side in pixels: 8 panels of ~24 images stay well under a megabyte
CROP = 96  # a gallery crop's longest side
GALLERY_SIZE = 6  # crops per class: its largest regions
# Patch masks: background dark, foreground one colour per kind (palette index 1)
MASK_COLOURS = {"dataset": "#e8a33c", "category": "#4fb3d9", "image": "#9d6fd6", "combined": "#f0f0f0"}
MASK_BG = "#282828"


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    s = PANEL / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _labels_thumb(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize(size, Image.NEAREST))


def _patch_thumb(mask: np.ndarray, geom: dict, patch: int, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid mask in the photo's frame: each patch a block, the bottom/right padding cut off."""
    grid = np.asarray(mask, np.uint8).reshape(geom["grid_h"], geom["grid_w"])
    rh, rw = geom.get("resized_h") or grid.shape[0] * patch, geom.get("resized_w") or grid.shape[1] * patch
    canvas = np.kron(grid, np.ones((patch, patch), np.uint8))[:rh, :rw]
    return _labels_thumb(canvas, size)


def _two_colours(colour: str) -> list[int]:
    fg = [int(colour[k : k + 2], 16) for k in (1, 3, 5)]
    bg = [int(MASK_BG[k : k + 2], 16) for k in (1, 3, 5)]
    return [*bg, *fg] + [0] * (3 * 254)


def _panel(kind: str, src: str, caption: str) -> str:
    return (
        f"<figure class='panel'><img data-panel='{kind}' src='{src}' alt='{esc(kind)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


@dataclass
class PanelInputs:
    """What every image's panels read, resolved once."""

    run: RunDir
    cfg: Config
    palette: list[int]
    patch: int
    gt: object | None  # a GroundTruth where the run was evaluated
    gt_palette: list[int]
    gt_names: list[str]
    matched: dict[int, str]  # predicted class id -> the name of the ground-truth class it was matched to
    lut: np.ndarray | None  # predicted class id -> ground-truth class index (unmatched: background)


def _image_panels(image_id: str, row: dict, geom: dict, why: str, inp: PanelInputs) -> str:
    run, cfg = inp.run, inp.cfg
    w, h = int(geom.get("width") or 0), int(geom.get("height") or 0)
    classes = read_mask(run.class_mask(image_id))
    if not (w and h):
        h, w = classes.shape
    size = _thumb_size(w, h)
    panels = []
    try:
        photo = Image.fromarray(load_rgb(geom["uri"], cfg.max_pixels))
        photo.thumbnail((PANEL, PANEL))
        panels.append(_panel("photo", jpeg_uri(photo), esc(image_id)))
    except (BadImage, OSError, KeyError, TypeError):
        panels.append("<figure class='panel missing'>photo not readable</figure>")
    weights = np.asarray(row["weights"], np.float64)
    shares = weights / weights.sum() if weights.sum() > 0 else np.full(len(LEVELS), 1 / len(LEVELS))
    for k, lv in enumerate(LEVELS):
        thumb = _patch_thumb(row[lv], geom, inp.patch, size)
        panels.append(
            _panel(
                f"level-{lv}",
                png_uri(thumb, _two_colours(MASK_COLOURS[lv])),
                f"{lv} level &middot; weight {shares[k]:.0%}",
            )
        )
    mask = np.asarray(row["mask"], np.uint8)
    panels.append(
        _panel(
            "combined",
            png_uri(_patch_thumb(mask, geom, inp.patch, size), _two_colours(MASK_COLOURS["combined"])),
            f"combined ({cfg.combine}) &middot; {mask.mean():.0%} fg",
        )
    )
    binary = read_mask(run.binary_mask(image_id)) > 0 if run.binary_mask(image_id).exists() else None
    if binary is not None:
        panels.append(
            _panel(
                "refined",
                png_uri(_labels_thumb(binary, size), _two_colours(MASK_COLOURS["combined"])),
                f"refined{' (CRF)' if cfg.crf else ''} &middot; {binary.mean():.0%} fg",
            )
        )
    present = [int(c) for c in np.unique(classes) if c > 0]
    legend = "".join(
        swatch(hex_colour(inp.palette, c), f"{c}" + (f" {inp.matched[c]}" if c in inp.matched else ""), c)
        for c in present
    )
    panels.append(
        _panel("classes", png_uri(_labels_thumb(classes, size), inp.palette), f"classes {legend or '(none)'}")
    )
    if inp.gt is not None and image_id in inp.gt.image_ids:
        truth = inp.gt.read(image_id)
        panels.append(
            _panel(
                "matched",
                png_uri(_labels_thumb(inp.lut[classes], size), inp.gt_palette),
                "classes matched to the truth's",
            )
        )
        names = [
            inp.gt_names[c] if c < len(inp.gt_names) else str(c) for c in np.unique(truth) if 0 < c < len(inp.gt_names)
        ]
        panels.append(
            _panel(
                "truth",
                png_uri(_labels_thumb(truth, size), inp.gt_palette),
                "ground truth " + esc(", ".join(names) or "(background)"),
            )
        )
    flag = row.get("flag")
    caption = f"<b>{esc(image_id)}</b>: {esc(why)} &middot; confidence {row['confidence']:.2f}" + (
        f" &middot; flag <b>{esc(flag)}</b>" if flag else ""
    )
    return (
        f"<div class='image' data-image='{esc(image_id)}'><p>{caption}</p>"
        f"<div class='panels'>{''.join(panels)}</div></div>"
    )


def _read_chosen(run: RunDir, shards: list[int], chosen: set[str], shard_of: dict[str, int]) -> tuple[dict, dict]:
    """The pseudo rows and geometry of the chosen images, from the shards that hold them (all shards for an image
    whose shard no task named)."""
    rows, geoms = {}, {}
    if chosen <= set(shard_of):
        shards = sorted({shard_of[i] for i in chosen})
    for s in shards:
        columns = ["image_id", "grid_h", "grid_w", "mask", "weights", "flag", "confidence", *LEVELS]
        t = read_table(run.pseudo_part(s), columns=columns).to_pylist()
        hits = [r for r in t if r["image_id"] in chosen]
        if not hits:
            continue
        rows.update({r["image_id"]: r for r in hits})
        if run.image_table(s).exists():
            g = read_table(run.image_table(s), columns=GEOMETRY_COLUMNS).to_pylist()
            geoms.update({r["image_id"]: r for r in g if r["image_id"] in chosen})
    return rows, geoms


def panels_section(run: RunDir, cfg: Config, choice: Choice, inp: PanelInputs, shards: list[int]) -> str:
    chosen = {i for ids in choice.groups.values() for i in ids}
    rows, geoms = _read_chosen(run, shards, chosen, choice.shard_of)
    key = "".join(swatch(MASK_COLOURS[k], f"{k} foreground") for k in (*LEVELS, "combined")) + swatch(
        MASK_BG, "background"
    )
    out = [
        "<h2>Images, level by level</h2><p>Each row: the photo; the dataset, category and image levels' patch masks "
        "(each with its weight in this image); their combination; the refined mask; the class mask; the ground "
        f"truth where the run was evaluated. {key}</p>"
    ]
    for title, ids in choice.groups.items():
        # a brought-in store may have no image table: then the grid alone places the patch masks
        blocks = [_image_panels(i, rows[i], geoms.get(i, rows[i]), choice.why[i], inp) for i in ids if i in rows]
        if blocks:
            out.append(f"<h3>{esc(title)} ({len(blocks)})</h3>{''.join(blocks)}")
    if len(out) == 1:
        out.append("<p>no image has a mask</p>")
    return "".join(out)


def largest_regions(run: RunDir, num_classes: int, k: int) -> tuple[dict[int, int], dict[int, int], dict[int, list]]:
    """Per class, its regions' count, their total area, and its ``k`` largest regions (largest first, ties in table
    order) as (image id, box): read a batch of the regions table at a time."""
    counts, totals = dict.fromkeys(range(1, num_classes + 1), 0), dict.fromkeys(range(1, num_classes + 1), 0)
    top: dict[int, list] = {c: [] for c in counts}  # (-area, row, image id, box)
    row = 0
    columns = ["image_id", "class_id", "area", "x0", "y0", "x1", "y1"]
    for batch in iter_batches(run.regions, columns=columns):
        cls, area = batch.column("class_id").to_numpy(), batch.column("area").to_numpy()
        for c in counts:
            members = np.flatnonzero(cls == c)
            counts[c] += len(members)
            totals[c] += int(area[members].sum())
            for j in members[np.argsort(-area[members], kind="stable")][:k]:
                box = tuple(int(batch.column(n)[j].as_py()) for n in ("x0", "y0", "x1", "y1"))
                top[c].append((-int(area[j]), row + int(j), batch.column("image_id")[j].as_py(), box))
            top[c] = sorted(top[c])[:k]
        row += batch.num_rows
    return counts, totals, {c: [(i, box) for _, _, i, box in v] for c, v in top.items()}


def gallery_section(run: RunDir, cfg: Config, palette: list[int]) -> str:
    """The largest regions of each class, classes by their total area, empty classes said so."""
    counts, totals, top = largest_regions(run, cfg.num_classes, GALLERY_SIZE)
    shown = sorted({i for regions in top.values() for i, _ in regions})
    found = read_table(run.status, columns=["image_id", "uri"], filters=[("image_id", "in", shown)])
    uris = dict(zip(found.column("image_id").to_pylist(), found.column("uri").to_pylist(), strict=True))
    rows = []
    for c in sorted(totals, key=lambda c: (-totals[c], c)):
        colour = hex_colour(palette, c)
        head = f"<h3>{swatch(colour, f'class {c}', c)} {counts[c]} regions, {totals[c]:,} px</h3>"
        if not counts[c]:
            rows.append(f"<div class='cls'>{head.replace(' 0 regions, 0 px', ' no region')}</div>")
            continue
        figs = []
        for image_id, box in top[c]:
            try:
                rgb = load_rgb(uris.get(image_id), cfg.max_pixels)
            except (BadImage, OSError, TypeError):
                continue
            crop = Image.fromarray(rgb).crop(box)
            crop.thumbnail((CROP, CROP))
            figs.append(f"<img data-panel='crop' src='{jpeg_uri(crop)}' alt='class {c}' title='{esc(image_id)}'>")
        rows.append(f"<div class='cls'>{head}<div class='crops'>{''.join(figs)}</div></div>")
    return f"<h2>Class clusters, largest first</h2>{''.join(rows)}"


def panel_inputs(run: RunDir, cfg: Config, rec: dict, metrics: dict | None, palette: list[int]) -> PanelInputs:
    try:
        patch = int(first_store_metadata(run).get("patch_size", 1))
    except FileNotFoundError:
        patch = int(rec.get("backbone", {}).get("patch_size", 1))
    gt, names, matched, lut = None, [], {}, None
    evaluation = rec.get("evaluation")
    if metrics and evaluation:
        try:
            gt = load_ground_truth(
                Path(evaluation["gt"]), evaluation["protocol"], evaluation.get("split", "val"), evaluation.get("ignore")
            )
        except (EvalError, OSError):
            gt = None  # the truth moved since: the page says what metrics.json says, without the truth panels
        names = list(metrics["per_class_iou"])
        assignment = {int(p): int(g) for p, g in metrics.get("assignment", {}).items() if 0 <= g < len(names)}
        matched = {p: names[g] for p, g in assignment.items() if p > 0}
        lut = np.zeros(256, np.uint8)
        lut[list(assignment)] = list(assignment.values())
    return PanelInputs(run, cfg, palette, patch, gt, voc_palette(), names, matched, lut)
