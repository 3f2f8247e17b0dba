"""Evaluation, the standard unsupervised protocol: one confusion matrix over every valid pixel of the whole split
(ignore value skipped), computed per chunk of images in parallel (a map) and summed; predicted ids matched to
ground-truth classes with the Hungarian algorithm (scipy ``linear_sum_assignment``) or by majority vote; then mIoU,
pixel accuracy, per-class IoU. Used by the evaluate stage and by ``mlcseg eval``.

Protocols (``formats/datasets.py``): ``voc21`` (VOCdevkit layout), ``coco81`` (80 thing ids mapped to 1..80 in id
order, from category-id PNGs or an instances JSON), ``cocostuff27`` (stuffthingmaps, STEGO's 27-class mapping),
``binary`` (foreground IoU), ``folder`` (any folder of label PNGs with an ignore value).
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..core.fanout import serial_map
from ..core.run_dir import RunDir
from ..core.stage import MapFn
from ..core.storage import anchored, as_location, atomic_write_bytes, atomic_write_json, make_folder
from ..formats.datasets import (
    MASK_EXTENSIONS,
    EvalError,
    GroundTruth,
    load_ground_truth,
    read_binary_mask,
    read_label_png,
)
from ..ops.metrics import MAX_PRED, confusion, match, scores

EVAL_CHUNK = 64  # images per evaluation task: a task's confusion matrix is summed from this many
PER_IMAGE_KEPT = 12  # the worst and the best images by foreground IoU kept in metrics.json (the report shows them)
IOU_BINS = 10


def foreground_iou(pred: np.ndarray, gt: np.ndarray, ignore: int) -> float | None:
    """One image's class-agnostic foreground IoU (predicted id > 0 against ground truth > 0, ignored pixels left
    out); None where neither has foreground (nothing to get wrong)."""
    valid = gt != ignore
    p, g = (pred > 0) & valid, (gt > 0) & valid
    union = int((p | g).sum())
    return None if union == 0 else float((p & g).sum()) / union


def _per_image_summary(scored: list[tuple[float, str]]) -> dict:
    """What the report needs of the per-image scores, bounded whatever the split's size: the worst and best
    images, and a histogram."""
    scored = sorted(scored)
    hist = np.histogram([s for s, _ in scored], bins=IOU_BINS, range=(0, 1))[0] if scored else np.zeros(IOU_BINS)
    return {
        "worst": [[i, round(s, 4)] for s, i in scored[:PER_IMAGE_KEPT]],
        "best": [[i, round(s, 4)] for s, i in scored[::-1][:PER_IMAGE_KEPT]],
        "histogram": [int(c) for c in hist],
        "scored": len(scored),
        "sum": float(sum(s for s, _ in scored)),
    }


def _merge_per_image(parts: list[dict]) -> dict:
    scored = [(s, i) for p in parts for i, s in p["worst"] + p["best"]]
    merged = _per_image_summary(sorted(set(scored)))
    n = sum(p["scored"] for p in parts)
    merged.update(
        histogram=[int(c) for c in np.sum([p["histogram"] for p in parts], axis=0)] if parts else [0] * IOU_BINS,
        scored=n,
        mean=round(sum(p["sum"] for p in parts) / n, 4) if n else None,
    )
    merged.pop("sum")
    return merged


def _chunk_confusion(image_ids: list[str], gt: GroundTruth, pred_dir: str, binary_pred: bool) -> dict:
    conf = np.zeros((MAX_PRED, gt.n_classes), np.int64)
    missing, scored = [], []
    for i in image_ids:
        g = gt.read(i)
        p_path = as_location(pred_dir) / f"{i}.png"
        if binary_pred and not p_path.exists():
            p_path = next(
                (q for q in (as_location(pred_dir) / f"{i}{e}" for e in MASK_EXTENSIONS) if q.exists()), p_path
            )
        if p_path.exists():
            p = read_binary_mask(p_path) if binary_pred else read_label_png(p_path)
            if p.ndim == 3:
                raise EvalError(f"{p_path}: prediction must be a single-channel label PNG")
            if p.shape != g.shape:
                raise EvalError(
                    f"{i}: prediction is {p.shape[1]}x{p.shape[0]} but ground truth is {g.shape[1]}x{g.shape[0]}"
                )
        else:
            missing.append(i)  # counted as all background, and listed
            p = np.zeros_like(g, np.uint8)
        conf += confusion(p, g, gt.n_classes, gt.ignore)
        iou = foreground_iou(p, g, gt.ignore)
        if iou is not None:
            scored.append((iou, i))
    return {"conf": conf, "missing": missing, "per_image": _per_image_summary(scored)}


def evaluate(
    pred_dir: Path,
    gt: GroundTruth,
    matching: str = "hungarian",
    binary_pred: bool = False,
    chunk: int = EVAL_CHUNK,
    map_fn: MapFn | None = None,
) -> dict:
    """Confusion over the whole split (chunks of images as parallel tasks through ``map_fn``, the executor's map;
    a loop without one), matching, scores. ``binary_pred``: predictions are foreground where > 0 and foreground is
    matched to foreground."""
    chunks = [gt.image_ids[i : i + chunk] for i in range(0, len(gt.image_ids), chunk)]
    results = (map_fn or serial_map)(_chunk_confusion, chunks, gt, str(pred_dir), binary_pred)
    conf = sum(r["conf"] for r in results)
    missing = [m for r in results for m in r["missing"]]
    used = np.flatnonzero(conf.sum(1) > 0)
    n_pred = int(used.max()) + 1 if used.size else 1
    conf = conf[: max(n_pred, 1)]
    if binary_pred:
        mapping = np.arange(conf.shape[0]).clip(max=1)  # foreground is foreground: no matching
        mapping[2:] = -1
    else:
        mapping = match(conf, matching)
    out = scores(conf, mapping, gt.names)
    out.update(
        n_images=len(gt.image_ids),
        missing_predictions=missing,
        matching="none (foreground is foreground)" if binary_pred else matching,
        n_predicted_ids=int(used.size),
        notes=gt.notes,
        confusion=conf.tolist(),
        per_image_foreground_iou=_merge_per_image([r["per_image"] for r in results]),
    )
    if binary_pred:
        out["foreground_iou"] = out["per_class_iou"].get("foreground")
    return out


def evaluate_folder(
    pred: Path,
    gt: Path,
    protocol: str,
    split: str = "val",
    ignore: int | None = None,
    matching: str = "hungarian",
    out: Path | None = None,
    map_fn: MapFn | None = None,
    remember: bool = False,
) -> dict:
    """``mlcseg eval``: PRED is a run folder (its masks/ or, for binary, binary/) or a folder of label PNGs. With
    ``remember``, a run evaluated into its own folder records what it was evaluated against (``run.json``'s
    ``evaluation``): its report then shows the truth beside the masks, and a later run evaluates it again."""
    pred = anchored(pred)
    if not pred.exists():
        raise FileNotFoundError(f"predictions not found: {pred}")
    run = RunDir(pred)
    is_run = run.masks.is_dir() or run.binary.is_dir()
    if is_run:
        pred_dir = run.binary if protocol == "binary" or not run.masks.is_dir() else run.masks
    else:
        pred_dir = pred
    gt_def = load_ground_truth(gt, protocol, split, ignore)
    gt_def, left_out = _scored_images(gt_def, run.image_ids() if is_run else None, pred_dir, protocol)
    metrics = evaluate(pred_dir, gt_def, matching, binary_pred=protocol == "binary", map_fn=map_fn)
    metrics["ground_truth_outside_run"] = left_out
    if left_out:
        metrics["notes"] = [*metrics["notes"], f"{left_out} ground-truth image(s) outside the run left out"]
    # a run keeps its metrics; a plain folder's go beside it (never into it: confusion.png would read as a mask)
    out = as_location(out) if out else pred if is_run else pred.parent / f"{pred.name}_eval"
    metrics.update(
        protocol=protocol,
        predictions=str(pred_dir),
        ground_truth=str(gt),
        split=split,
        written_to=str(RunDir(out).metrics),
    )
    write_outputs(out, metrics, gt_def.names)
    if remember and is_run and anchored(out) == pred:
        evaluation = {"gt": str(anchored(gt)), "protocol": protocol, "split": split}
        evaluation.update(
            {k: v for k, v in (("ignore", ignore), ("matching", matching)) if v not in (None, "hungarian")}
        )
        run.update_record(evaluation=evaluation)
    return metrics


def _scored_images(
    gt: GroundTruth, run_images: set[str] | None, pred_dir: Path, protocol: str
) -> tuple[GroundTruth, int]:
    """The ground truth restricted to what is scored: a run's own images (a --limit or --sample run is scored on
    its images alone), and for a plain folder every ground-truth image (one without a prediction counts as
    background). No image to score is an error, raised before anything is written. Returns (ground truth, number
    of ground-truth images left out)."""
    if run_images is not None:
        kept = [i for i in gt.image_ids if i in run_images]
        if not kept:
            raise EvalError(
                f"none of the {len(gt.image_ids)} ground-truth images ({protocol}) is one of the run's "
                f"{len(run_images)} images: is it the right ground truth, with the same file names?"
            )
        return replace(gt, image_ids=kept), len(gt.image_ids) - len(kept)
    stems = {p.stem for p in pred_dir.iterdir() if p.suffix.lower() in MASK_EXTENSIONS} if pred_dir.is_dir() else set()
    if not stems & set(gt.image_ids):
        raise EvalError(
            f"no prediction in {pred_dir} has the name of one of the {len(gt.image_ids)} ground-truth "
            f"images ({protocol}); predictions and ground truth are matched by file name"
        )
    return gt, 0


def write_outputs(out: Path, metrics: dict, names: list[str]) -> None:
    run = RunDir(out)
    make_folder(run.root)
    atomic_write_json(run.metrics, metrics)
    atomic_write_bytes(run.confusion, confusion_png(np.asarray(metrics["confusion"]), names))


def confusion_png(conf: np.ndarray, names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = conf / np.maximum(conf.sum(0, keepdims=True), 1)  # share of each GT class
    fig, ax = plt.subplots(figsize=(max(4, conf.shape[1] * 0.35), max(3, conf.shape[0] * 0.3)), dpi=100)
    ax.imshow(norm, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel("predicted id")
    if len(names) == conf.shape[1] and len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
