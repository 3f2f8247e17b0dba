"""Dataset layouts on disk and their ground truth: VOCdevkit, COCO (category PNGs or an instances JSON),
COCO-Stuff, folders of binary or label masks. One :class:`GroundTruth` per protocol: its image ids, how to read one
label map, the class count and what is ignored."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.storage import as_location
from .class_tables import COCO_THING_IDS, COCOSTUFF27, VOC_CLASSES

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


def read_label_png(path: Path) -> np.ndarray:
    with as_location(path).open("rb") as f:  # a prediction may be in a bucket
        return np.asarray(Image.open(f))


def read_binary_mask(path: Path, ignore: int = NO_IGNORE) -> np.ndarray:
    """Foreground 1, background 0, ``ignore`` pixels 255. Any mode (1-bit, 8-bit, palette, RGB read as grey); JPEG
    (lossy: edges hold values between 0 and 255) thresholded at 128, everything else foreground where > 0."""
    with as_location(path).open("rb") as f:
        img = Image.open(f)
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


def load_ground_truth(gt: Path, protocol: str, split: str = "val", ignore: int | None = None) -> GroundTruth:
    """``ignore``: a label value to leave out (``folder`` and ``binary``; VOC and COCO always ignore 255)."""
    gt = Path(gt).absolute()  # read by tasks in workers, whose working directory is not this one
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not gt.exists():
        raise FileNotFoundError(f"ground truth not found: {gt}")
    if protocol == "voc21" or (protocol == "binary" and (gt / "SegmentationClass").is_dir()):
        voc = _voc_truth(gt, split)
        if protocol == "binary":
            return _binary(voc, "VOC classes 1-20 as foreground, 255 (object borders) ignored")
        return voc
    if protocol == "coco81":
        return _coco81_truth(gt)
    if protocol == "cocostuff27":
        lut = _lut(dict(enumerate(COCOSTUFF27)))
        files = {p.stem: p for p in sorted(gt.glob("*.png"))}
        return GroundTruth(
            sorted(files), lambda i: lut[read_label_png(files[i])], 27, 255, [f"stuff27_{i}" for i in range(27)]
        )
    ignore = NO_IGNORE if ignore is None else ignore
    if protocol == "binary":
        return _binary_folder_truth(gt, ignore)
    return _folder_truth(gt, ignore)


def find_voc_root(root: Path) -> Path:
    """The folder holding ``JPEGImages/`` of a VOCdevkit layout, given it or a folder above it."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(f"--voc: no JPEGImages/ under {root} (expected VOCdevkit/VOC2012 layout)")


def _voc_truth(gt: Path, split: str) -> GroundTruth:
    voc = find_voc_root(gt) if (gt / "JPEGImages").is_dir() or (gt / "VOC2012").is_dir() else gt
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    seg = voc / "SegmentationClass"
    if split_file.exists():
        ids = [s.strip() for s in split_file.read_text().split()]
    else:
        ids = sorted(p.stem for p in seg.glob("*.png"))

    def read(i: str) -> np.ndarray:
        return _check_range(read_label_png(seg / f"{i}.png"), 21, 255, f"{seg / i}.png")

    return GroundTruth(ids, read, 21, 255, VOC_CLASSES, ["255 (object borders) ignored"])


def _coco81_truth(gt: Path) -> GroundTruth:
    lut = _lut({cid: i + 1 for i, cid in enumerate(COCO_THING_IDS)} | {0: 0})
    names = ["background"] + [f"coco_{c}" for c in COCO_THING_IDS]
    if gt.is_file() and gt.suffix == ".json":
        return _coco_json(gt, lut, names)
    files = {p.stem: p for p in sorted(gt.glob("*.png"))}

    def read(i: str) -> np.ndarray:
        a = read_label_png(files[i])
        unknown = (a != 0) & (lut[a] == 255) & (a != 255)
        if unknown.any():
            raise EvalError(f"{files[i]}: COCO category id {int(a[unknown][0])} is not one of the 80 used ids")
        return lut[a]

    return GroundTruth(sorted(files), read, 81, 255, names)


def _ignored(ignore: int) -> str:
    return f"value {ignore} ignored" if ignore != NO_IGNORE else "nothing ignored"


def _binary_folder_truth(gt: Path, ignore: int) -> GroundTruth:
    files = _mask_files(gt)
    if not files:
        raise EvalError(f"no mask files ({', '.join(MASK_EXTENSIONS)}) under {gt}")
    notes = ["foreground where the mask is > 0"]
    lossy = sum(p.suffix.lower() in LOSSY for p in files.values())
    if lossy:
        notes.append(f"{lossy} JPEG mask(s) thresholded at 128")
    notes.append(_ignored(ignore))
    return GroundTruth(
        sorted(files), lambda i: read_binary_mask(files[i], ignore), 2, 255, ["background", "foreground"], notes
    )


def _folder_truth(gt: Path, ignore: int) -> GroundTruth:
    files = {p.stem: p for p in sorted(gt.rglob("*.png"))}
    if not files:
        raise EvalError(f"no label PNGs under {gt}")
    n = 1 + max(int(np.max(np.where(a == ignore, 0, a))) for a in (read_label_png(p) for p in files.values()))
    return GroundTruth(
        sorted(files),
        lambda i: read_label_png(files[i]),
        n,
        ignore,
        [f"class_{c}" for c in range(n)],
        [_ignored(ignore)],
    )


def _binary(gt: GroundTruth, note: str) -> GroundTruth:
    def read(i: str) -> np.ndarray:
        a = gt.read(i)
        return np.where(a == gt.ignore, 255, (a > 0).astype(np.uint8)).astype(np.uint8)

    return GroundTruth(gt.image_ids, read, 2, 255, ["background", "foreground"], [note])


def _coco_json(path: Path, lut: np.ndarray, names: list[str]) -> GroundTruth:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its progress; stdout is for results
        coco = COCO(str(path))
    by_stem = {Path(im["file_name"]).stem: im["id"] for im in coco.dataset["images"]}

    def read(stem: str) -> np.ndarray:
        im = coco.imgs[by_stem[stem]]
        sem = np.zeros((im["height"], im["width"]), np.uint8)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=im["id"], iscrowd=None)):
            m = coco.annToMask(a).astype(bool)
            sem[m] = 255 if a.get("iscrowd") else lut[a["category_id"]]
        return sem

    return GroundTruth(sorted(by_stem), read, 81, 255, names)
