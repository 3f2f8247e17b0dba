"""Stage ``report``: one self-contained ``report.html`` (images inlined) for people to look at.

Sample overlays, one gallery per class cluster, stage timings and counts, metrics when ground truth was given,
where the features came from - and a loud banner when the backbone's weights were random.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Config
from ..core.errors import BadImage
from ..core.stage import MapFn, Stage, StageContext
from ..core.storage import read_metadata, read_table
from ..core.store import RunDir, atomic_write_text
from ..formats.images import load_rgb
from ..formats.masks import read_mask, voc_palette
from ..models.backbones import RANDOM_WEIGHTS_WARNING

THUMB = 320


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def overlay(rgb: np.ndarray, classes: np.ndarray, palette: list[int], alpha: float = 0.5) -> Image.Image:
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    color = pal[classes]
    fg = classes > 0
    out = rgb.astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * color[fg]
    img = Image.fromarray(out.astype(np.uint8))
    img.thumbnail((THUMB, THUMB))
    return img


def _data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    """An image inside the page: report.html is one file that can be mailed or attached."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _esc(x: object) -> str:
    return html.escape(str(x))


def _header(run: RunDir, rec: dict) -> list[str]:
    backbone = rec.get("backbone", {})
    parts = []
    if backbone.get("random_weights"):
        parts.append(f'<div class="banner">{_esc(RANDOM_WEIGHTS_WARNING)}</div>')
    parts.append(
        f"<h1>mlcseg_ray report</h1><p>run folder <code>{_esc(run.root)}</code>; input "
        f"{_esc(rec.get('input', '(brought-in feature store)'))}</p>"
    )
    parts.append(
        "<h2>Features</h2><table>"
        + "".join(
            f"<tr><th>{_esc(k)}</th><td>{_esc(backbone.get(k))}</td></tr>"
            for k in ("backbone", "weights", "random_weights", "patch_size", "embed_dim", "max_side")
        )
        + "</table>"
    )
    return parts


def _stages_section(rec: dict, status: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(s)}</td><td>{_esc(v.get('images', ''))}</td><td>{_esc(v.get('errors', ''))}</td>"
        f"<td>{v.get('seconds', 0):.1f}</td></tr>"
        for s, v in rec.get("stages", {}).items()
    )
    n_err = sum(1 for r in status if r["status"] != "ok")
    n_flag = sum(1 for r in status if r.get("flag"))
    return (
        f"<h2>Stages</h2><p>{len(status)} images, {n_err} errors, {n_flag} flagged "
        f"(empty or full pseudo-mask)</p><table><tr><th>stage</th><th>images</th><th>errors</th>"
        f"<th>seconds</th></tr>{rows}</table>"
    )


def _metrics_section(run: RunDir) -> str:
    m = json.loads(run.metrics.read_text())
    confusion = _data_uri(run.confusion.read_bytes(), "image/png") if run.confusion.exists() else ""
    per = "".join(
        f"<tr><td>{_esc(k)}</td><td>{'-' if v is None else f'{v:.2f}'}</td></tr>" for k, v in m["per_class_iou"].items()
    )
    return (
        f"<h2>Metrics ({_esc(m.get('protocol'))}, {_esc(m['matching'])} matching)</h2>"
        f"<p class='big'>mIoU {m['miou']:.2f} &middot; pixel accuracy {m['pixel_accuracy']:.2f} "
        f"&middot; {m['n_images']} images</p><div class='row'><table><tr><th>class</th><th>IoU</th>"
        f"</tr>{per}</table><img src='{confusion}' alt='confusion matrix'></div>"
    )


def _samples_section(run: RunDir, ok: list[dict], cfg: Config, palette: list[int]) -> str:
    """Overlays of the class masks on the first ``report_samples`` images."""
    tiles = []
    for r in ok[: cfg.report_samples]:
        try:
            rgb = load_rgb(r["uri"], cfg.max_pixels)
        except BadImage:
            continue
        name = _data_uri(_jpeg(overlay(rgb, read_mask(run.class_mask(r["image_id"])), palette)))
        tiles.append(
            f"<figure><img src='{name}' alt='{_esc(r['image_id'])}'><figcaption>{_esc(r['image_id'])}"
            f"{' (' + _esc(r['flag']) + ')' if r.get('flag') else ''}</figcaption></figure>"
        )
    return f"<h2>Samples</h2><div class='grid'>{''.join(tiles) or '<p>no masks</p>'}</div>"


GALLERY_SIZE = 6  # crops shown per class, the most confident first


def _gallery_section(run: RunDir, status: list[dict], cfg: Config, palette: list[int]) -> str:
    """One row of region crops per class cluster."""
    regions = read_table(run.regions).to_pylist()
    uris = {r["image_id"]: r["uri"] for r in status}
    by_class: dict[int, list] = {}
    for r in sorted(regions, key=lambda r: -r["score"]):
        by_class.setdefault(r["class_id"], []).append(r)
    gal = []
    for c in sorted(by_class):
        figs = []
        for r in by_class[c][:GALLERY_SIZE]:
            if r["image_id"] not in uris:
                continue
            try:
                rgb = load_rgb(uris[r["image_id"]], cfg.max_pixels)
            except BadImage:
                continue
            crop = Image.fromarray(rgb).crop((r["x0"], r["y0"], r["x1"], r["y1"]))
            crop.thumbnail((160, 160))
            figs.append(f"<img src='{_data_uri(_jpeg(crop))}' alt='class {c}' title='{_esc(r['image_id'])}'>")
        colour = "#{:02x}{:02x}{:02x}".format(*palette[3 * c : 3 * c + 3])
        gal.append(
            f"<div class='cls'><h3><span class='sw' style='background:{colour}'></span>class {c} "
            f"({_count(len(by_class[c]), 'region')})</h3>{''.join(figs)}</div>"
        )
    return f"<h2>Class clusters</h2>{''.join(gal)}"


def _problems_section(status: list[dict]) -> list[str]:
    parts = []
    flagged = [r for r in status if r.get("flag")]
    if flagged:
        rows = "".join(f"<tr><td>{_esc(r['image_id'])}</td><td>{_esc(r['flag'])}</td></tr>" for r in flagged)
        parts.append(
            f"<h2>Flagged images</h2><p>The pseudo-mask of these images is empty or covers the whole image: "
            f"kept, but worth a look.</p><table><tr><th>image</th><th>pseudo-mask</th></tr>{rows}</table>"
        )
    failed = [r for r in status if r["status"] != "ok"]
    if failed:
        errs = "".join(
            f"<tr><td>{_esc(r['image_id'])}</td><td>{_esc(r['stage'])}</td><td>{_esc(r['error'])}</td></tr>"
            for r in failed
        )
        parts.append(f"<h2>Errors</h2><table><tr><th>image</th><th>stage</th><th>reason</th></tr>{errs}</table>")
    return parts


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px} "
    "table{border-collapse:collapse;margin:.5em 0}\n"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} .banner{background:#c00;color:#fff;padding:1em;\n"
    "font-weight:bold;font-size:1.2em} .grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0}\n"
    "figcaption{font-size:.8em} .cls img{margin:2px;max-height:160px} .sw{display:inline-block;width:1em;height:1em;\n"
    "margin-right:.4em;vertical-align:middle} .row{display:flex;gap:2em;align-items:flex-start} .big{font-size:1.3em}\n"
)


def write_report(run: RunDir, cfg: Config) -> Path:
    """``report.html``: the sections in order, one self-contained page."""
    rec = run.read_record()
    palette = voc_palette()
    status = run.read_status()
    masked = run.mask_ids(run.masks)
    ok = [r for r in status if r["status"] == "ok" and r["image_id"] in masked]
    parts = _header(run, rec)
    parts.append(_stages_section(rec, status))
    if run.metrics.exists():
        parts.append(_metrics_section(run))
    if run.ablation.exists():
        parts.append(ablation_section(json.loads(run.ablation.read_text())))
    parts.append(_samples_section(run, ok, cfg, palette))
    if run.regions.exists() and read_metadata(run.regions).num_rows:
        parts.append(_gallery_section(run, status, cfg, palette))
    parts += _problems_section(status)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>mlcseg_ray report</title><style>\n{STYLE}'
        f"</style></head><body>{''.join(parts)}</body></html>"
    )
    atomic_write_text(run.report, page)
    return run.report


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
            f"<text x='0' y='{y + 15}' font-size='13'>{_esc(r['rule'])}</text>"
            f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{row_h - 6}' fill='{colour}'/>"
            f"<text x='{label_w + w + 6:.1f}' y='{y + 15}' font-size='12'>{r['patch_iou']:.3f}"
            + (f" / CRF {r['refined_iou']:.3f}" if r["refined_iou"] is not None else "")
            + "</text>"
        )
    svg.append("</svg>")
    warn = " <b>Random weights: these numbers say nothing about the method.</b>" if a.get("random_weights") else ""
    return (
        f"<h2>Which level and rule (mlcseg ablate)</h2><p>Foreground IoU on {a['images']} labelled images at "
        f"patch resolution (and after the DenseCRF for the best rules). Best: <b>{_esc(a['best'])}</b>; "
        f"configured: {_esc(a['configured'])} (consistency {_esc(a['consistency'])}); best single level: "
        f"{_esc(a['best_single_level'])}.{warn}</p>{''.join(svg)}"
    )


class ReportStage(Stage):
    """A view of the run folder, not a computation: written again on every run that includes it."""

    name = "report"
    after = ("label",)
    reads = ("status", "masks", "regions", "metrics", "confusion", "ablation", "run_record")
    writes = ("report",)
    config_keys = ("report_samples", "max_pixels")
    always_run = True

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        return {"output": str(write_report(ctx.run, ctx.cfg))}
