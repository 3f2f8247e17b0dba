"""Stage ``evaluate``: the standard unsupervised protocol (DESIGN §2 "Evaluation").

One confusion matrix over every valid pixel of the whole split (ignore value skipped), computed per chunk of images
in parallel (Ray tasks when Ray is up) and summed; predicted ids matched to ground-truth classes with the Hungarian
algorithm (scipy ``linear_sum_assignment``) or by majority vote; then mIoU, pixel accuracy, per-class IoU.

Protocols: ``voc21`` (VOCdevkit layout), ``coco81`` (80 thing ids mapped to 1..80 in id order, from category-id
PNGs or an instances JSON), ``cocostuff27`` (stuffthingmaps, STEGO's 27-class mapping), ``binary`` (foreground IoU),
``folder`` (any folder of label PNGs with an ignore value).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .stage import Stage, StageContext

MAX_PRED = 256  # predictions are 8-bit PNGs

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
# The 80 category ids COCO uses, in id order (the 91-id space has gaps).
COCO_THING_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                  32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                  58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                  88, 89, 90]
# stuffthingmaps fine id (0..181) -> 27 coarse classes, the mapping used by STEGO and later work.
COCOSTUFF27 = [9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6,
               6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
               3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20,
               22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14,
               15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26,
               21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18,
               18, 18, 18, 26, 26, 19, 19, 24]
PROTOCOLS = ("voc21", "coco81", "cocostuff27", "binary", "folder")


class EvalError(ValueError):
    pass


@dataclass
class GroundTruth:
    """What a protocol needs: the image ids, how to read one GT label map, class count, ignore value, names, and
    what was done to read it (said in the output)."""

    image_ids: list[str]
    read: Callable[[str], np.ndarray]
    n_classes: int
    ignore: int  # a value that never occurs (256) when nothing is ignored
    names: list[str]
    notes: list[str] = field(default_factory=list)


# Binary masks as people store them: PNG (0/1, 0/255, palette, bool), JPEG, BMP, TIFF, GIF.
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
LOSSY = (".jpg", ".jpeg")
NO_IGNORE = 256  # outside 0..255: no pixel is ignored


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def read_binary_mask(path: Path, ignore: int = NO_IGNORE) -> np.ndarray:
    """Foreground 1, background 0, ``ignore`` pixels 255. Any mode (1-bit, 8-bit, palette, RGB read as grey); JPEG
    (lossy: edges hold values between 0 and 255) thresholded at 128, everything else foreground where > 0."""
    from PIL import Image

    img = Image.open(path)
    a = np.asarray(img.convert("L") if img.mode not in ("1", "L", "P", "I", "I;16") else img)
    a = a.astype(np.int64) if a.dtype != bool else a.astype(np.uint8)
    fg = a >= 128 if Path(path).suffix.lower() in LOSSY else a > 0
    out = fg.astype(np.uint8)
    if ignore != NO_IGNORE:
        out[a == ignore] = 255
    return out


def _mask_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in MASK_EXTENSIONS}


def _lut(mapping: dict[int, int], ignore: int = 255) -> np.ndarray:
    lut = np.full(256, ignore, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _check_range(a: np.ndarray, n: int, ignore: int, where: str) -> np.ndarray:
    bad = (a >= n) & (a != ignore)
    if bad.any():
        raise EvalError(f"{where}: ground-truth class id {int(a[bad][0])} out of range 0..{n - 1} (ignore {ignore})")
    return a


def load_ground_truth(gt: Path, protocol: str, split: str = "val", ignore: Optional[int] = None) -> GroundTruth:
    """``ignore``: a label value to leave out (``folder`` and ``binary``; VOC and COCO always ignore 255)."""
    gt = Path(gt)
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not gt.exists():
        raise FileNotFoundError(f"ground truth not found: {gt}")
    if protocol == "voc21" or (protocol == "binary" and (gt / "SegmentationClass").is_dir()):
        from .ingest import find_voc_root

        voc = find_voc_root(gt) if (gt / "JPEGImages").is_dir() or (gt / "VOC2012").is_dir() else gt
        split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = [s.strip() for s in split_file.read_text().split()] if split_file.exists() else \
            sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
        seg = voc / "SegmentationClass"

        def read(i):
            return _check_range(_png(seg / f"{i}.png"), 21, 255, f"{seg / i}.png")

        if protocol == "binary":
            return _binary(GroundTruth(ids, read, 21, 255, VOC_CLASSES), "VOC classes 1-20 as foreground, "
                                                                         "255 (object borders) ignored")
        return GroundTruth(ids, read, 21, 255, VOC_CLASSES, ["255 (object borders) ignored"])
    if protocol == "coco81":
        lut = _lut({cid: i + 1 for i, cid in enumerate(COCO_THING_IDS)} | {0: 0})
        names = ["background"] + [f"coco_{c}" for c in COCO_THING_IDS]
        if gt.is_file() and gt.suffix == ".json":
            return _coco_json(gt, lut, names)
        files = {p.stem: p for p in sorted(gt.glob("*.png"))}

        def read(i):
            a = _png(files[i])
            unknown = (a != 0) & (lut[a] == 255) & (a != 255)
            if unknown.any():
                raise EvalError(f"{files[i]}: COCO category id {int(a[unknown][0])} is not one of the 80 used ids")
            return lut[a]

        return GroundTruth(sorted(files), read, 81, 255, names)
    if protocol == "cocostuff27":
        lut = _lut(dict(enumerate(COCOSTUFF27)))
        files = {p.stem: p for p in sorted(gt.glob("*.png"))}
        return GroundTruth(sorted(files), lambda i: lut[_png(files[i])], 27, 255, [f"stuff27_{i}" for i in range(27)])
    ignore = NO_IGNORE if ignore is None else ignore
    if protocol == "binary":
        files = _mask_files(gt)
        if not files:
            raise EvalError(f"no mask files ({', '.join(MASK_EXTENSIONS)}) under {gt}")
        notes = ["foreground where the mask is > 0"]
        lossy = sum(p.suffix.lower() in LOSSY for p in files.values())
        if lossy:
            notes.append(f"{lossy} JPEG mask(s) thresholded at 128")
        notes.append(f"value {ignore} ignored" if ignore != NO_IGNORE else "nothing ignored")
        return GroundTruth(sorted(files), lambda i: read_binary_mask(files[i], ignore), 2, 255,
                           ["background", "foreground"], notes)
    files = {p.stem: p for p in sorted(gt.rglob("*.png"))}
    if not files:
        raise EvalError(f"no label PNGs under {gt}")
    n = 1 + max(int(np.max(np.where(a == ignore, 0, a))) for a in (_png(p) for p in files.values()))
    return GroundTruth(sorted(files), lambda i: _png(files[i]), n, ignore, [f"class_{c}" for c in range(n)],
                       [f"value {ignore} ignored" if ignore != NO_IGNORE else "nothing ignored"])


def _binary(gt: GroundTruth, note: str) -> GroundTruth:
    def read(i):
        a = gt.read(i)
        return np.where(a == gt.ignore, 255, (a > 0).astype(np.uint8)).astype(np.uint8)

    return GroundTruth(gt.image_ids, read, 2, 255, ["background", "foreground"], [note])


def _coco_json(path: Path, lut: np.ndarray, names: list[str]) -> GroundTruth:
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    by_stem = {Path(im["file_name"]).stem: im["id"] for im in coco.dataset["images"]}

    def read(stem):
        im = coco.imgs[by_stem[stem]]
        sem = np.zeros((im["height"], im["width"]), np.uint8)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=im["id"], iscrowd=None)):
            m = coco.annToMask(a).astype(bool)
            sem[m] = 255 if a.get("iscrowd") else lut[a["category_id"]]
        return sem

    return GroundTruth(sorted(by_stem), read, 81, 255, names)


# ---------------------------------------------------------------------------------------------------------------
# confusion matrices (plain functions, summed over chunks)
# ---------------------------------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, gt: np.ndarray, n_gt: int, ignore: int) -> np.ndarray:
    """(MAX_PRED, n_gt) pixel counts over the valid pixels of one image."""
    valid = gt != ignore
    idx = pred[valid].astype(np.int64) * n_gt + gt[valid].astype(np.int64)
    return np.bincount(idx, minlength=MAX_PRED * n_gt).reshape(MAX_PRED, n_gt)


def _chunk_confusion(image_ids: list[str], gt: GroundTruth, pred_dir: str, binary_pred: bool) -> dict:
    conf = np.zeros((MAX_PRED, gt.n_classes), np.int64)
    missing = []
    for i in image_ids:
        g = gt.read(i)
        p_path = Path(pred_dir) / f"{i}.png"
        if binary_pred and not p_path.exists():
            p_path = next((q for q in (Path(pred_dir) / f"{i}{e}" for e in MASK_EXTENSIONS) if q.exists()), p_path)
        if p_path.exists():
            p = read_binary_mask(p_path) if binary_pred else _png(p_path)
            if p.ndim == 3:
                raise EvalError(f"{p_path}: prediction must be a single-channel label PNG")
            if p.shape != g.shape:
                raise EvalError(f"{i}: prediction is {p.shape[1]}x{p.shape[0]} but ground truth is "
                                f"{g.shape[1]}x{g.shape[0]}")
        else:
            missing.append(i)  # counted as all background, and listed
            p = np.zeros_like(g, np.uint8)
        conf += confusion(p, g, gt.n_classes, gt.ignore)
    return {"conf": conf, "missing": missing}


def match(conf: np.ndarray, matching: str = "hungarian") -> np.ndarray:
    """Predicted id -> GT class (-1: unmatched). conf: (n_pred, n_gt)."""
    from scipy.optimize import linear_sum_assignment

    mapping = np.full(conf.shape[0], -1, np.int64)
    if matching == "majority":
        used = conf.sum(1) > 0
        mapping[used] = conf[used].argmax(1)
        return mapping
    if matching != "hungarian":
        raise EvalError(f"unknown matching {matching!r}; use hungarian or majority")
    rows, cols = linear_sum_assignment(-conf)
    mapping[rows] = cols
    return mapping


def scores(conf: np.ndarray, mapping: np.ndarray, names: list[str]) -> dict:
    n_gt = conf.shape[1]
    matched = np.zeros((n_gt, n_gt), np.int64)  # (predicted-as class, gt class)
    for p, g in enumerate(mapping):
        if g >= 0:
            matched[g] += conf[p]
    tp = np.diag(matched).astype(np.float64)
    gt_total = conf.sum(0).astype(np.float64)
    pred_total = matched.sum(1).astype(np.float64)
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = gt_total > 0  # classes absent from the split's ground truth do not count
    per_class = {(names[c] if c < len(names) else str(c)): (round(float(iou[c]) * 100, 4) if present[c] else None)
                 for c in range(n_gt)}
    return {
        "miou": round(float(np.nanmean(np.where(present, iou, np.nan))) * 100, 4),
        "pixel_accuracy": round(float(tp.sum() / max(gt_total.sum(), 1)) * 100, 4),
        "per_class_iou": per_class,
        "assignment": {str(p): int(g) for p, g in enumerate(mapping) if conf[p].sum() > 0},
    }


def evaluate(pred_dir: Path, gt: GroundTruth, matching: str = "hungarian", binary_pred: bool = False,
             chunk: int = 64, map_fn=None) -> dict:
    """Confusion over the whole split (chunks of images as parallel tasks through ``map_fn``, the executor's map;
    a loop without one), matching, scores. ``binary_pred``: predictions are foreground where > 0 and foreground is
    matched to foreground."""
    from .kmeans import serial_map

    chunks = [gt.image_ids[i: i + chunk] for i in range(0, len(gt.image_ids), chunk)]
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
    out.update(n_images=len(gt.image_ids), missing_predictions=missing,
               matching="none (foreground is foreground)" if binary_pred else matching,
               n_predicted_ids=int(used.size), notes=gt.notes, confusion=conf.tolist())
    if binary_pred:
        out["foreground_iou"] = out["per_class_iou"].get("foreground")
    return out


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------


def evaluate_folder(pred: Path, gt: Path, protocol: str, split: str = "val", ignore: Optional[int] = None,
                    matching: str = "hungarian", out: Optional[Path] = None, address: Optional[str] = None,
                    map_fn=None) -> dict:
    """``mlcseg eval``: PRED is a run folder (its masks/ or, for binary, binary/) or a folder of label PNGs."""
    pred = Path(pred)
    if not pred.exists():
        raise FileNotFoundError(f"predictions not found: {pred}")
    is_run = (pred / "masks").is_dir() or (pred / "binary").is_dir()
    if is_run:
        pred_dir = pred / ("binary" if protocol == "binary" or not (pred / "masks").is_dir() else "masks")
    else:
        pred_dir = pred
    gt_def = load_ground_truth(gt, protocol, split, ignore)
    if address and map_fn is None:
        from .executor import ray_map
        from .raytools import init_ray

        init_ray(address)
        map_fn = ray_map
    metrics = evaluate(pred_dir, gt_def, matching, binary_pred=protocol == "binary", map_fn=map_fn)
    # a run keeps its metrics; a plain folder's go beside it (never into it: confusion.png would read as a mask)
    out = Path(out) if out else pred if is_run else pred.parent / f"{pred.name}_eval"
    metrics.update(protocol=protocol, predictions=str(pred_dir), ground_truth=str(gt), split=split,
                   written_to=str(out / "metrics.json"))
    write_outputs(out, metrics, gt_def.names)
    return metrics


class EvaluateStage(Stage):
    """Metrics of a run's masks against ground truth: the one given to this run, else the one the folder was last
    evaluated with (so a later `mlcseg label` re-evaluates, and a `mlcseg report` does not drop the metrics)."""

    name = "evaluate"
    after = ("label",)
    reads = ("masks", "binary")
    writes = ("metrics", "confusion")

    @staticmethod
    def ground_truth(ctx: StageContext) -> dict | None:
        if ctx.inputs.gt:
            return {"gt": ctx.inputs.gt, "protocol": ctx.inputs.protocol or "voc21", "split": ctx.inputs.split}
        return ctx.run.read_record().get("evaluation")

    def wanted(self, ctx: StageContext) -> bool:
        return self.ground_truth(ctx) is not None

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"ground_truth": self.ground_truth(ctx)}

    def run_whole(self, ctx: StageContext, map_fn) -> dict:
        gt = self.ground_truth(ctx)
        if gt is None:
            raise ValueError("evaluate needs ground truth: --voc ROOT, or `mlcseg eval RUN GT`")
        metrics = evaluate_folder(ctx.run.root, Path(gt["gt"]), gt["protocol"], split=gt["split"], out=ctx.run.root,
                                  map_fn=map_fn)
        ctx.run.update_record(evaluation=gt)
        return {"images": metrics["n_images"], "errors": len(metrics["missing_predictions"]),
                "miou": metrics["miou"], "output": str(ctx.run.metrics)}


def write_outputs(out: Path, metrics: dict, names: list[str]) -> None:
    from .store import RunDir, atomic_write_bytes, atomic_write_json

    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.metrics, metrics)
    atomic_write_bytes(run.confusion, confusion_png(np.asarray(metrics["confusion"]), names))


def confusion_png(conf: np.ndarray, names: list[str]) -> bytes:
    import io

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


def print_metrics(metrics: dict) -> None:
    """The metrics on stdout: what was measured and how, the score, per-class IoU, what was missing."""
    from rich.table import Table

    from .progress import out

    binary = metrics.get("protocol") == "binary"
    head = (f"foreground IoU {metrics['foreground_iou']:.2f}" if binary and metrics.get("foreground_iou") is not None
            else f"mIoU {metrics['miou']:.2f}")
    out.print(f"{metrics.get('protocol', '')}: {head}, pixel accuracy {metrics['pixel_accuracy']:.2f} "
              f"({metrics['n_images']} images; matching: {metrics['matching']}; "
              f"{'; '.join(metrics.get('notes', [])) or 'nothing ignored'})", highlight=False, soft_wrap=True)
    t = Table(title="per-class IoU")
    t.add_column("class")
    t.add_column("IoU", justify="right")
    for name, iou in metrics["per_class_iou"].items():
        t.add_row(name, "-" if iou is None else f"{iou:.2f}")
    out.print(t)
    if metrics["missing_predictions"]:
        out.print(f"{len(metrics['missing_predictions'])} image(s) had no prediction (counted as background): "
                  f"{', '.join(metrics['missing_predictions'][:10])}", highlight=False, soft_wrap=True)
    if metrics.get("written_to"):
        out.print(f"metrics written to {metrics['written_to']}", highlight=False, soft_wrap=True)
