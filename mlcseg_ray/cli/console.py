"""What the commands print on stdout: metrics and the ablation table (logs and progress: ``core/progress.py``)."""

from __future__ import annotations

from rich.table import Table

from ..core.progress import out
from ..core.run_dir import printable


def print_metrics(metrics: dict) -> None:
    """The metrics on stdout: what was measured and how, the score, per-class IoU, what was missing."""
    binary = metrics.get("protocol") == "binary"
    head = (
        f"foreground IoU {metrics['foreground_iou']:.2f}"
        if binary and metrics.get("foreground_iou") is not None
        else f"mIoU {metrics['miou']:.2f}"
    )
    out.print(
        f"{metrics.get('protocol', '')}: {head}, pixel accuracy {metrics['pixel_accuracy']:.2f} "
        f"({metrics['n_images']} images; matching: {metrics['matching']}; "
        f"{'; '.join(metrics.get('notes', [])) or 'nothing ignored'})",
        highlight=False,
        soft_wrap=True,
    )
    t = Table(title="per-class IoU")
    t.add_column("class")
    t.add_column("IoU", justify="right")
    for name, iou in metrics["per_class_iou"].items():
        t.add_row(name, "-" if iou is None else f"{iou:.2f}")
    out.print(t)
    if metrics["missing_predictions"]:
        out.print(
            f"{len(metrics['missing_predictions'])} image(s) had no prediction (counted as background): "
            f"{printable(', '.join(metrics['missing_predictions'][:10]))}",
            highlight=False,
            soft_wrap=True,
        )
    if metrics.get("written_to"):
        out.print(f"metrics written to {printable(str(metrics['written_to']))}", highlight=False, soft_wrap=True)


def print_ablation(result: dict, protocol: str) -> None:
    """``mlcseg ablate``'s table: foreground IoU of every rule, at patch resolution and after the CRF."""
    t = Table(title=f"foreground IoU on {result['images']} images ({protocol})")
    empty = result.get("empty_images", 0)
    cols = ("rule", "patch resolution", "after CRF") + (("empty kept clean",) if empty else ())
    for col in cols:
        t.add_column(col, justify="left" if col == "rule" else "right")
    for r in result["rules"]:
        mark = " (configured)" if r["rule"] == result["configured"] else ""
        refined = "-" if r["refined_iou"] is None else f"{r['refined_iou']:.3f}"
        clean = (f"{r['empty_kept_clean']:.0%}",) if empty else ()
        t.add_row(r["rule"] + mark, f"{r['patch_iou']:.3f}", refined, *clean)
    out.print(t)
    if empty:
        out.print(
            f"{empty} empty scenes in the ground truth: 'empty kept clean' is the share of them a rule calls "
            "at most 5% foreground",
            highlight=False,
            soft_wrap=True,
        )
    curve = [c for c in result.get("confidence_curve", []) if c["precision"] is not None]
    if curve:
        out.print(
            "confidence >= t as a test of a good pseudo-mask (IoU >= 0.5, or an empty scene kept clean): "
            + ", ".join(
                f"t {c['threshold']:.1f}: precision {c['precision']:.2f} recall {c['recall'] or 0:.2f}"
                for c in curve[::3]
            ),
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"best: {result['best']}; best single level: {result['best_single_level']}; "
        f"notes: {'; '.join(result['notes']) or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    if result["skipped"]:
        out.print(
            f"{len(result['skipped'])} image(s) skipped: {printable('; '.join(result['skipped'][:5]))}",
            highlight=False,
            soft_wrap=True,
        )
