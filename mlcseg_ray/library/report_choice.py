"""Which images a report shows: per pseudo shard a bounded list of candidates (a task each), merged in the driver
and reduced to a fixed number, so the choice and the page's size do not grow with the dataset."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np

from ..core.run_dir import RunDir
from ..core.tables import read_table
from ..ops.sampling import id_hash

FG_BINS = 20
REPORT_CHUNK = 1024  # pseudo shards whose candidates are gathered, then bounded, at a time
LEVELS = ("dataset", "category", "image")


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
        "doubtful": sorted(
            (float(c), i) for c, i in zip(confidence or [], ids, strict=False) if c is not None and c < DOUBTFUL_BELOW
        )[:quota],
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
# "Least confident" shows only images the run is less than this sure of (a run sure of every image shows none there)
DOUBTFUL_BELOW = 0.5


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
            self.seen[image_id] = isinstance(image_id, str) and self.run.has_class_mask(image_id)
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
    doubtful = sorted(x for p in parts for x in p["doubtful"])  # (confidence, id): the least sure first
    sources = [
        ("Worst by foreground IoU", [(i, f"foreground IoU {s:.2f}") for i, s in per_image.get("worst", [])], 5),
        ("Best by foreground IoU", [(i, f"foreground IoU {s:.2f}") for i, s in per_image.get("best", [])], 6),
        ("Flagged", [(i, f"flag: {f}") for i, f in sorted(x for p in parts for x in p["flagged"])], 6),
        ("Least confident", [(i, f"confidence {c:.2f}") for c, i in doubtful], 6),
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
