"""Stage ``report``: one self-contained ``report.html`` (images inlined, no script) for people to look at.

The page answers "where does it fail": per-image panels (photo, the three levels, the combined patch mask, the
refined mask, the class mask with its legend, the ground truth on an evaluated run) for a bounded choice of images
(the worst and best by IoU, the flagged, those whose levels disagree most, a few at random); the numbers as
pictures (per-class IoU, the confusion matrix, the ablation, the foreground-share histogram, time per stage); class
galleries of the largest regions; the errors and skipped files with their reasons; and a loud banner when the
backbone's weights were random.

Its size does not grow with the dataset: the images shown are chosen from per-shard summaries (each shard task
returns a bounded list of candidates), and every thumbnail is small.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.config import Config
from ..core.errors import BadImage
from ..core.fanout import MapFn, serial_map
from ..core.stage import Stage, StageContext
from ..core.storage import iter_batches, read_metadata, read_table
from ..core.store import RunDir, StatusSummary, atomic_write_text
from ..formats.datasets import EvalError, load_ground_truth
from ..formats.feature_store import GEOMETRY_COLUMNS, first_store_metadata
from ..formats.html import bar_chart, data_uri, esc, hex_colour, histogram, jpeg_uri, line_chart, png_uri, swatch
from ..formats.images import load_rgb
from ..formats.masks import read_mask, voc_palette
from ..models.backbones import RANDOM_WEIGHTS_WARNING
from ..ops.kmeans import id_hash

PANEL = 150  # a panel's longest side in pixels: 8 panels of ~24 images stay well under a megabyte
CROP = 96  # a gallery crop's longest side
GALLERY_SIZE = 6  # crops per class: its largest regions
TABLE_ROWS = 20  # error and flag rows listed (the counts by reason cover the rest)
FG_BINS = 20
REPORT_CHUNK = 1024  # pseudo shards whose candidates are gathered, then bounded, at a time
LEVELS = ("dataset", "category", "image")
# Patch masks: background dark, foreground one colour per kind (palette index 1)
MASK_COLOURS = {"dataset": "#e8a33c", "category": "#4fb3d9", "image": "#9d6fd6", "combined": "#f0f0f0"}
MASK_BG = "#282828"


# --- choosing the images: per shard a bounded list of candidates, merged in the driver ---


def _disagreement(dataset: list, category: list, image: list) -> float:
    """The share of an image's patches on which its three levels do not all say the same."""
    d, c, i = np.asarray(dataset), np.asarray(category), np.asarray(image)
    return float(1.0 - np.mean((d == c) & (c == i))) if d.size else 0.0


def candidates(
    ids: list[str], flags: list, masks: list, levels: list[list], quota: int, confidence: list | None = None
) -> dict:
    """A shard's share of the choice: the images whose levels disagree most, the flagged, the ones that come
    first in a stable hash order (the random pick), and the foreground-share histogram; all bounded by ``quota``,
    so the merged choice does not depend on how the images were cut into shards."""
    share = np.array([np.mean(m) if len(m) else 0.0 for m in masks])
    disagree = [_disagreement(*lv) for lv in zip(*levels, strict=True)]
    hashes = id_hash(ids) if ids else np.zeros(0, np.uint64)
    return {
        "disagree": sorted(((-float(d), i) for d, i in zip(disagree, ids, strict=True)))[:quota],
        "random": sorted((int(h), i) for h, i in zip(hashes, ids, strict=True))[:quota],
        "flagged": sorted((i, f) for i, f in zip(ids, flags, strict=True) if f)[:quota],
        "doubtful": sorted((float(c), i) for c, i in zip(confidence or [], ids, strict=False) if c is not None)[:quota],
        "flag_counts": dict(Counter(f for f in flags if f)),
        "share_hist": np.histogram(share, bins=FG_BINS, range=(0, 1))[0].tolist(),
        "images": len(ids),
    }


def shard_candidates(shard: int, run_root: str, quota: int, wanted: frozenset[str] = frozenset()) -> dict:
    """:func:`candidates` of one pseudo shard (a task: the driver gets back only the bounded lists), with the
    shard's number and which of ``wanted`` (the evaluation's worst and best) it holds: the second pass then reads
    only the shards of the images shown."""
    t = read_table(RunDir(run_root).pseudo_part(shard), columns=["image_id", "mask", "flag", "confidence", *LEVELS])
    ids = t.column("image_id").to_pylist()
    out = candidates(
        ids,
        t.column("flag").to_pylist(),
        t.column("mask").to_pylist(),
        [t.column(lv).to_pylist() for lv in LEVELS],
        quota,
        t.column("confidence").to_pylist(),
    )
    return {**out, "shard": shard, "held": sorted(wanted.intersection(ids))}


CANDIDATE_LISTS = ("disagree", "random", "flagged", "doubtful")


def bounded(parts: list[dict], keep: int) -> list[dict]:
    """Shards' candidates reduced to what a choice of at most ``keep // 4`` images can use: in each list the
    ``keep`` best items over all the parts; the parts left holding none of them (and none of the evaluation's
    images), folded into one part of totals (histogram, flag counts). The driver then holds O(keep) candidates
    whatever the number of shards (exact while fewer than ``3 * keep // 4`` of the best lack a mask)."""
    best = {k: set(heapq.nsmallest(keep, (x for p in parts for x in p[k]))) for k in CANDIDATE_LISTS}
    totals = {k: [] for k in CANDIDATE_LISTS} | {"share_hist": [0] * FG_BINS, "flag_counts": Counter(), "images": 0}
    kept = []
    for p in parts:
        q = {**p, **{k: [x for x in p[k] if x in best[k]] for k in CANDIDATE_LISTS}}
        if any(q[k] for k in CANDIDATE_LISTS) or q.get("held"):
            kept.append(q)
            continue
        totals["share_hist"] = [a + b for a, b in zip(totals["share_hist"], p["share_hist"], strict=True)]
        totals["flag_counts"].update(p["flag_counts"])
        totals["images"] += p["images"]
    return [*kept, {**totals, "flag_counts": dict(totals["flag_counts"])}]


class MaskFiles:
    """``image_id in MaskFiles(run)``: whether the image has a class mask, asked of its one file (a choice looks at
    a few dozen images; a listing of every mask would hold every image's id)."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.seen = run, {}

    def __contains__(self, image_id: object) -> bool:
        if image_id not in self.seen:
            self.seen[image_id] = (self.run.masks / f"{image_id}.png").exists()
        return self.seen[image_id]


@dataclass
class Choice:
    """The images shown, each under the first heading that chose it, and the run-wide summaries."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # image id -> caption of why it is shown
    share_hist: list[int] = field(default_factory=lambda: [0] * FG_BINS)
    flag_counts: dict[str, int] = field(default_factory=dict)
    shard_of: dict[str, int] = field(default_factory=dict)  # image id -> its pseudo shard, where a task said it


def choose_images(parts: list[dict], n: int, metrics: dict | None, masked: Container[str]) -> Choice:
    """At most ``n`` images: on an evaluated run the worst and best by foreground IoU first, then the flagged,
    the least confident, the most disagreeing between levels, and the rest at random (a stable hash order: the
    same run shows the same images)."""
    ch = Choice()
    for p in parts:
        ch.share_hist = [a + b for a, b in zip(ch.share_hist, p["share_hist"], strict=True)]
        for f, c in p["flag_counts"].items():
            ch.flag_counts[f] = ch.flag_counts.get(f, 0) + c
        if "shard" in p:
            listed = [x[1] for k in ("disagree", "random", "doubtful") for x in p[k]] + [i for i, _ in p["flagged"]]
            ch.shard_of.update(dict.fromkeys(listed + p["held"], p["shard"]))
    per_image = (metrics or {}).get("per_image_foreground_iou") or {}
    disagree = sorted(x for p in parts for x in p["disagree"])  # (-share, id): the most disagreeing first
    sources = [
        ("Worst by foreground IoU", [(i, f"foreground IoU {s:.2f}") for i, s in per_image.get("worst", [])], 5),
        ("Best by foreground IoU", [(i, f"foreground IoU {s:.2f}") for i, s in per_image.get("best", [])], 6),
        ("Flagged", [(i, f"flag: {f}") for i, f in sorted(x for p in parts for x in p["flagged"])], 6),
        ("Least confident", [(i, "least confident") for _, i in sorted(x for p in parts for x in p["doubtful"])], 6),
        ("Levels disagree most", [(i, f"levels disagree on {-d:.0%} of patches") for d, i in disagree], 6),
        ("At random", [(i, "at random") for _, i in sorted(x for p in parts for x in p["random"])], 1),
    ]
    shown: set[str] = set()
    for title, items, share in sources:
        quota = max(1, n // share) if share > 1 else n - len(shown)
        picked = []
        for image_id, why in items:
            if len(picked) >= quota or len(shown) >= n:
                break
            if image_id in shown or image_id not in masked:
                continue
            picked.append(image_id)
            shown.add(image_id)
            ch.why[image_id] = why
        if picked:
            ch.groups[title] = picked
    return ch


# --- per-image panels ---


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


def _panels_section(run: RunDir, cfg: Config, choice: Choice, inp: PanelInputs, shards: list[int]) -> str:
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


# --- run-wide sections ---


def _header(run: RunDir, rec: dict) -> list[str]:
    backbone = rec.get("backbone", {})
    parts = []
    if backbone.get("random_weights"):
        parts.append(f'<div class="banner">{esc(RANDOM_WEIGHTS_WARNING)}</div>')
    parts.append(
        f"<h1>mlcseg_ray report</h1><p>run folder <code>{esc(run.root)}</code>; input "
        f"{esc(rec.get('input', '(brought-in feature store)'))}</p>"
    )
    parts.append(
        "<details><summary>Features</summary><table>"
        + "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(backbone.get(k))}</td></tr>"
            for k in ("backbone", "weights", "random_weights", "patch_size", "embed_dim", "max_side")
        )
        + "</table></details>"
    )
    return parts


def _summary_section(rec: dict, status: StatusSummary, choice: Choice) -> str:
    n_err = status.failed
    skipped = rec.get("skipped_files", {}).get("count", 0)
    flags = ", ".join(f"{c} {f}" for f, c in sorted(choice.flag_counts.items())) or "none"
    stages = rec.get("stages", {})
    bars = bar_chart(
        [(s, float(v.get("seconds", 0)), f"{v.get('seconds', 0):.1f} s") for s, v in stages.items()],
        "seconds per stage",
    )
    n_hist = sum(choice.share_hist)
    edges = [i / FG_BINS for i in range(FG_BINS + 1)]
    return (
        f"<h2>Summary</h2><p class='big'>{status.images} images &middot; {status.images - n_err} with masks &middot; "
        f"{n_err} errors &middot; flagged: {esc(flags)} &middot; {skipped} files skipped</p>"
        f"<div class='row'><div><h3>Time per stage</h3>{bars}</div>"
        f"<div><h3>Foreground share of the patch masks ({n_hist} images)</h3>"
        f"{histogram(choice.share_hist, edges, 'images by foreground share')}</div></div>"
    )


def _metrics_section(run: RunDir, metrics: dict) -> str:
    m = metrics
    confusion = data_uri(run.confusion.read_bytes(), "image/png") if run.confusion.exists() else ""
    per = [(k, float(v), f"{v:.1f}") for k, v in m["per_class_iou"].items() if v is not None]
    per_image = m.get("per_image_foreground_iou") or {}
    hist = ""
    if per_image.get("scored"):
        edges = [i / len(per_image["histogram"]) for i in range(len(per_image["histogram"]) + 1)]
        hist = (
            f"<div><h3>Images by foreground IoU (mean {per_image['mean']:.2f})</h3>"
            f"{histogram(per_image['histogram'], edges, 'images by foreground IoU', '#c83')}</div>"
        )
    img = f"<div><h3>Confusion</h3><img data-panel='confusion' src='{confusion}' alt='confusion matrix'></div>"
    return (
        f"<h2>Metrics ({esc(m.get('protocol'))}, {esc(m['matching'])} matching)</h2>"
        f"<p class='big'>mIoU {m['miou']:.2f} &middot; pixel accuracy {m['pixel_accuracy']:.2f} "
        f"&middot; {m['n_images']} images</p><div class='row'><div><h3>IoU per class</h3>"
        f"{bar_chart(per, 'IoU per class', vmax=100)}</div>{img if confusion else ''}{hist}</div>"
    )


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


def _gallery_section(run: RunDir, cfg: Config, palette: list[int]) -> str:
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


def _problems_section(rec: dict, status: StatusSummary) -> list[str]:
    parts = []
    if status.failed:
        counts = "".join(
            f"<tr><td>{esc(s)}</td><td>{esc(e)}</td><td>{n}</td></tr>" for (s, e), n in status.reasons.most_common(10)
        )
        errs = "".join(
            f"<tr><td>{esc(r['image_id'])}</td><td>{esc(r['stage'])}</td><td>{esc(r['error'])}</td></tr>"
            for r in status.failed_rows[:TABLE_ROWS]
        )
        more = (
            f"<p>and {status.failed - TABLE_ROWS} more: <code>mlcseg errors RUN</code></p>"
            if status.failed > TABLE_ROWS
            else ""
        )
        parts.append(
            f"<h2>Errors ({status.failed})</h2><table><tr><th>stage</th><th>reason</th><th>images</th></tr>{counts}"
            f"</table><table><tr><th>image</th><th>stage</th><th>reason</th></tr>{errs}</table>{more}"
        )
    skipped = rec.get("skipped_files", {})
    if skipped.get("count"):
        by_ext = ", ".join(f"{k}: {v}" for k, v in skipped.get("by_extension", {}).items())
        files = ", ".join(skipped.get("files", [])[:TABLE_ROWS])
        parts.append(
            f"<h2>Skipped files ({skipped['count']})</h2><p>Not images by their extension ({esc(by_ext)}): "
            f"{esc(files)}</p>"
        )
    return parts


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px} "
    "table{border-collapse:collapse;margin:.5em 0}\n"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} .banner{background:#c00;color:#fff;padding:1em;\n"
    "font-weight:bold;font-size:1.2em} figure{margin:0} figcaption{font-size:.75em;max-width:150px}\n"
    ".panels{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start} .image{margin:.6em 0 1.2em}\n"
    ".image p{margin:.2em 0} .panel img{display:block;width:150px;height:auto;image-rendering:pixelated}\n"
    ".crops{display:grid;grid-template-columns:repeat(6,100px);gap:4px} .crops img{max-width:96px;max-height:96px}\n"
    ".sw{display:inline-block;width:.9em;height:.9em;margin:0 .25em 0 .4em;vertical-align:middle;\n"
    "border:1px solid #888}\n"
    ".key{white-space:nowrap} .row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start} .big{font-size:1.2em}\n"
    ".cls h3{font-size:1em;margin:.8em 0 .3em} .missing{width:150px;font-size:.8em;color:#888}\n"
)


def write_report(run: RunDir, cfg: Config, map_fn: MapFn | None = None) -> Path:
    """``report.html``: the sections in order, one self-contained page."""
    rec = run.read_record()
    palette = voc_palette()
    status = run.status_summary(examples=TABLE_ROWS)
    metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() else None
    shards = run.shards_of(run.pseudo, "part")
    per_image = (metrics or {}).get("per_image_foreground_iou") or {}
    wanted = frozenset(i for i, _ in per_image.get("worst", []) + per_image.get("best", []))
    quota, keep, found = max(cfg.report_samples, 1), 4 * max(cfg.report_samples, 1) + 16, []
    for start in range(0, len(shards), REPORT_CHUNK):  # the candidates stay bounded however many shards come
        chunk = shards[start : start + REPORT_CHUNK]
        found = bounded(found + (map_fn or serial_map)(shard_candidates, chunk, str(run.root), quota, wanted), keep)
    choice = choose_images(found, cfg.report_samples, metrics, MaskFiles(run))
    inp = _panel_inputs(run, cfg, rec, metrics, palette)
    parts = _header(run, rec)
    parts.append(_summary_section(rec, status, choice))
    if metrics:
        parts.append(_metrics_section(run, metrics))
    if run.ablation.exists():
        parts.append(ablation_section(json.loads(run.ablation.read_text())))
    if shards and cfg.report_samples:
        parts.append(_panels_section(run, cfg, choice, inp, shards))
    if run.regions.exists() and read_metadata(run.regions).num_rows:
        parts.append(_gallery_section(run, cfg, palette))
    parts += _problems_section(rec, status)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>mlcseg_ray report</title><style>\n{STYLE}'
        f"</style></head><body>{''.join(parts)}</body></html>"
    )
    atomic_write_text(run.report, page)
    return run.report


def _panel_inputs(run: RunDir, cfg: Config, rec: dict, metrics: dict | None, palette: list[int]) -> PanelInputs:
    try:
        patch = int(first_store_metadata(run).get("patch_size", 1))
    except FileNotFoundError:
        patch = int(rec.get("backbone", {}).get("patch_size", 1))
    gt, names, matched, lut = None, [], {}, None
    evaluation = rec.get("evaluation")
    if metrics and evaluation:
        try:
            gt = load_ground_truth(Path(evaluation["gt"]), evaluation["protocol"], evaluation.get("split", "val"))
        except (EvalError, OSError):
            gt = None  # the truth moved since: the page says what metrics.json says, without the truth panels
        names = list(metrics["per_class_iou"])
        assignment = {int(p): int(g) for p, g in metrics.get("assignment", {}).items() if 0 <= g < len(names)}
        matched = {p: names[g] for p, g in assignment.items() if p > 0}
        lut = np.zeros(256, np.uint8)
        lut[list(assignment)] = list(assignment.values())
    return PanelInputs(run, cfg, palette, patch, gt, voc_palette(), names, matched, lut)


def ablation_section(a: dict) -> str:
    """``mlcseg ablate``'s table as horizontal bars (inline SVG): foreground IoU of every level and rule."""
    rows = a["rules"]
    bar_w, row_h, label_w = 360, 22, 190
    svg = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{label_w + bar_w + 150}' height='{row_h * len(rows) + 10}'"
        f" role='img' aria-label='foreground IoU per rule'>"
    ]
    for i, r in enumerate(rows):
        y = 5 + i * row_h
        colour = "#2a7" if r["rule"] == a["best"] else "#c83" if r["rule"] == a["configured"] else "#69c"
        w = bar_w * r["patch_iou"]
        svg.append(
            f"<text x='0' y='{y + 15}' font-size='13'>{esc(r['rule'])}</text>"
            f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{row_h - 6}' fill='{colour}'/>"
            f"<text x='{label_w + w + 6:.1f}' y='{y + 15}' font-size='12'>{r['patch_iou']:.3f}"
            + (f" / CRF {r['refined_iou']:.3f}" if r["refined_iou"] is not None else "")
            + (f" / empty clean {r['empty_kept_clean']:.0%}" if r.get("empty_kept_clean") is not None else "")
            + "</text>"
        )
    svg.append("</svg>")
    warn = " <b>Random weights: these numbers say nothing about the method.</b>" if a.get("random_weights") else ""
    return (
        f"<h2>Which level and rule (mlcseg ablate)</h2><p>Foreground IoU on {a['images']} labelled images at "
        f"patch resolution (and after the DenseCRF for the best rules). Best: <b>{esc(a['best'])}</b>; "
        f"configured: {esc(a['configured'])} (consistency {esc(a['consistency'])}); best single level: "
        f"{esc(a['best_single_level'])}.{warn}</p>{''.join(svg)}{_confidence_chart(a)}"
    )


def _confidence_chart(a: dict) -> str:
    """Precision and recall of "confidence >= t" against the truth, as t goes from 0 to 0.9."""
    curve = [c for c in a.get("confidence_curve", []) if c["precision"] is not None]
    if not curve:
        return ""
    chart = line_chart(
        {
            "precision": [(c["threshold"], c["precision"]) for c in curve],
            "recall": [(c["threshold"], c["recall"] or 0.0) for c in curve],
        },
        "confidence threshold: precision and recall",
        "threshold",
        "share",
    )
    return (
        f"<h3>The confidence against the truth</h3><p>An image's pseudo-mask counts as good when its foreground IoU "
        f"is at least 0.5, or, for one of the {a.get('empty_images', 0)} empty scenes, it is kept clean; keeping "
        f"the images whose confidence is at least the threshold gives this precision and recall.</p>{chart}"
    )


class ReportStage(Stage):
    """A view of the run folder, not a computation: written again on every run that includes it."""

    name = "report"
    after = ("label",)
    reads = (
        "status",
        "masks",
        "binary",
        "pseudo",
        "image_tables",
        "features",
        "regions",
        "metrics",
        "confusion",
        "ablation",
        "run_record",
    )
    writes = ("report",)
    config_keys = ("report_samples", "max_pixels", "num_classes", "combine", "crf")
    always_run = True

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        return {"output": str(write_report(ctx.run, ctx.cfg, map_fn))}
