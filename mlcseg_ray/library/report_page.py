"""The report page: one self-contained ``report.html`` (images inlined, no script) for people to look at.

The page answers "where does it fail": per-image panels for a bounded choice of images (:mod:`.report_choice`,
:mod:`.report_panels`); the numbers as pictures (per-class IoU, the confusion matrix, the ablation, the
foreground-share histogram, time per stage); class galleries; the errors and skipped files with their reasons; and
a loud banner when the backbone's weights were random. Its size does not grow with the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.config import Config
from ..core.fanout import MapFn, serial_map
from ..core.run_dir import RunDir, StatusSummary
from ..core.storage import atomic_write_text
from ..core.tables import read_metadata
from ..formats.masks import voc_palette
from ..models.backbones import untrained_warning
from .report_choice import FG_BINS, REPORT_CHUNK, Choice, MaskFiles, bounded, choose_images, shard_candidates
from .report_panels import gallery_section, panel_inputs, panels_section
from .report_widgets import bar_chart, data_uri, esc, histogram, line_chart

TABLE_ROWS = 20  # error and flag rows listed (the counts by reason cover the rest)


def _header(run: RunDir, rec: dict) -> list[str]:
    backbone = rec.get("backbone", {})
    parts = []
    warning = untrained_warning(backbone)
    if warning:
        parts.append(f'<div class="banner">{esc(warning)}</div>')
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


def _fit_section(fitted: str, stages: dict) -> str:
    """How far the images are from the fit this run applied: what tells a user when to refit."""
    patches = stages.get("cluster", {}).get("drift", {})
    regions = stages.get("label", {}).get("drift", {})
    lines = [f"Levels and classes applied from <code>{esc(fitted)}</code>, nothing refitted."]
    if patches:
        lines.append(
            f"{patches['far_patches']:.1%} of the patches are far from every dataset centroid "
            f"({patches['far_patches_expected']:.0%} would be, with no drift)."
        )
    if regions:
        shares = ", ".join(
            f"{c}: {ours:.0%} ({theirs:.0%})"
            for c, (ours, theirs) in enumerate(
                zip(regions["class_shares"], regions["fitted_class_shares"], strict=True), 1
            )
        )
        lines.append(
            f"{regions['far_regions']:.1%} of the regions are far from their class "
            f"({regions['far_regions_expected']:.0%} with no drift). Regions per class, here (in the fitted run): "
            f"{esc(shares)}."
        )
    return "<h2>Fit applied</h2><p>" + " ".join(lines) + " Far above the no-drift share: time to refit.</p>"


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
    inp = panel_inputs(run, cfg, rec, metrics, palette)
    parts = _header(run, rec)
    parts.append(_summary_section(rec, status, choice))
    if metrics:
        parts.append(_metrics_section(run, metrics))
    if cfg.fit:
        parts.append(_fit_section(cfg.fit, rec.get("stages", {})))
    if run.ablation.exists():
        parts.append(ablation_section(json.loads(run.ablation.read_text())))
    if shards and cfg.report_samples:
        parts.append(panels_section(run, cfg, choice, inp, shards))
    if run.regions.exists() and read_metadata(run.regions).num_rows:
        parts.append(gallery_section(run, cfg, palette))
    parts += _problems_section(rec, status)
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
