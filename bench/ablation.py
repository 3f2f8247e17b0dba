"""Foreground IoU of every clustering level and combine rule, on the fixed planted sets and on randomized families.

    python bench/ablation.py                       # fixed sets + 100 randomized draws + 20 draws on real photos
    python bench/ablation.py --draws 20 --photo-draws 5 --skip-fixed
    python bench/ablation.py --store RUN           # any store with RUN/gt.parquet (image_id, grid_h, grid_w, mask)

1. Fixed sets (easy and hard, from the real VOC mask geometry in ../shared/data), with both consistency rules.
2. Randomized draws (``tests/planted.py: random_spec``): every knob of the generator drawn over a wide range (shared
   foreground direction, per-image and per-group shifts, background modes, misleading attention, mixed CLS groups,
   class imbalance, grid sizes); and draws on the 59 real VOC photos (``generate_on_photos``): a random-weight
   ViT's keys plus a planted component of varying strength, so that real image statistics confound the levels.
   Per rule: mean foreground IoU over the draws, mean regret against the best single level of each draw, the
   worst draw, and the share of draws where the rule beats every single level.

Each draw is clustered once with the default config; every rule is recomputed from the level masks, weights and
attention the cluster stage stores (``mlcseg_ray.tools.ablate.rule_score``), exactly as ``mlcseg ablate`` does.
"""

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the planted-store generators (tests/helpers)
from common import machine  # noqa: E402

from helpers.planted import PlantedSpec, generate, generate_on_photos, random_spec  # noqa: E402
from mlcseg_ray.config import Config  # noqa: E402
from mlcseg_ray.core.inputs import RunInputs  # noqa: E402
from mlcseg_ray.core.store import RunDir  # noqa: E402
from mlcseg_ray.pipeline import run_stages  # noqa: E402
from mlcseg_ray.stages.cluster import read_pseudo  # noqa: E402
from mlcseg_ray.tools.ablate import RULES, SINGLE_LEVELS, rule_score  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MASKS = DATA / "voc2012_val_masks" / "SegmentationClass"
PHOTOS = DATA / "voc2012_val_subset"
STRENGTHS = (0.3, 0.5, 0.7, 1.0, 1.5)


def rule_ious(store: Path) -> dict:
    """Patch-level foreground IoU of every rule against the store's gt.parquet."""
    gt = {r["image_id"]: np.asarray(r["mask"], bool) for r in pq.read_table(store / "gt.parquet").to_pylist()}
    inter = dict.fromkeys(RULES, 0)
    union = dict.fromkeys(RULES, 0)
    for row in read_pseudo(RunDir(store)).to_pylist():
        t = gt[row["image_id"]]
        for rule in RULES:
            p = rule_score(row, rule) > 0.5
            inter[rule] += int((p & t).sum())
            union[rule] += int((p | t).sum())
    return {r: inter[r] / union[r] if union[r] else 1.0 for r in RULES}


def cluster(store: Path, out: Path, **overrides) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("features", "images"):
        shutil.copytree(store / sub, out / sub)
    shutil.copy(store / "gt.parquet", out / "gt.parquet")
    run_stages(out, Config(**overrides), ["cluster"])
    return rule_ious(out)


def one_draw(job) -> dict:
    """Generate one draw's store, cluster it, score every rule, remove the store."""
    import torch

    torch.set_num_threads(1)  # draws run side by side, one per core
    kind, draw, work, photo_base = job
    out = Path(work) / f"{kind}{draw}"
    shutil.rmtree(out, ignore_errors=True)
    if kind == "random":
        generate(out, random_spec(draw), mask_dir=MASKS)
    else:
        generate_on_photos(
            out, RunDir(photo_base), PHOTOS / "SegmentationClass", STRENGTHS[draw % len(STRENGTHS)], seed=draw
        )
    run_stages(out, Config(), ["cluster"])
    res = rule_ious(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"draw": f"{kind}{draw}", **res}


def summarise(rows: list[dict], title: str) -> None:
    best = np.array([max(r[s] for s in SINGLE_LEVELS) for r in rows])
    advance = max(SINGLE_LEVELS, key=lambda s: np.mean([r[s] for r in rows]))
    print(
        f"\n{title}: {len(rows)} draws; best single level chosen in advance (best mean): {advance} "
        f"{np.mean([r[advance] for r in rows]):.4f}; per-draw best single level, mean {best.mean():.4f}"
    )
    print("| rule | mean fg IoU | mean regret vs per-draw best level | worst draw | beats every level |")
    print("|---|---|---|---|---|")
    for rule in RULES:
        v = np.array([r[rule] for r in rows])
        beats = np.mean(v > best + 1e-9)
        print(f"| {rule} | {v.mean():.4f} | {np.mean(best - v):+.4f} | {v.min():.3f} | {beats:.0%} |")


def photo_base(work: Path) -> Path:
    """The 59 VOC photos through a random-weight ViT-S/8 (max_side 320): the real-image half of the photo draws."""
    base = work / "photo_base"
    run_stages(
        base,
        Config(backbone="random-vit-s8", max_side=320),
        ["ingest", "extract"],
        inputs=RunInputs(images=str(PHOTOS / "JPEGImages")),
    )
    return base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, action="append", help="store folder(s) with gt.parquet")
    ap.add_argument("--n-images", type=int, default=1449, help="images of the fixed easy and hard sets")
    ap.add_argument("--draws", type=int, default=100, help="randomized planted draws")
    ap.add_argument("--photo-draws", type=int, default=20, help="draws on the real VOC photos")
    ap.add_argument("--skip-fixed", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    stores = list(args.store or [])
    if not stores and not args.skip_fixed:
        for diff in ("easy", "hard"):
            generate(work / f"planted_{diff}", PlantedSpec(diff, n_images=args.n_images), mask_dir=MASKS)
            stores.append(work / f"planted_{diff}")
    if stores:
        print(f"| store | consistency | {' | '.join(RULES)} |")
        print(f"|---|---|{'---|' * len(RULES)}")
        for store in stores:
            for consistency in ("relative", "majority"):
                res = cluster(store, work / f"{store.name}_{consistency}", consistency=consistency)
                print(
                    f"| {store.name} | {consistency} | " + " | ".join(f"{res[k]:.3f}" for k in RULES) + " |", flush=True
                )
    jobs = [("random", d, str(work), None) for d in range(args.draws)]
    if args.photo_draws:
        base = photo_base(work)
        jobs += [("photo", d, str(work), str(base)) for d in range(args.photo_draws)]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        rows = pool.map(one_draw, jobs, chunksize=1)
    random_rows = [r for r in rows if r["draw"].startswith("random")]
    photo_rows = [r for r in rows if r["draw"].startswith("photo")]
    if random_rows:
        summarise(random_rows, "randomized planted family")
    if photo_rows:
        summarise(photo_rows, "planted on real VOC photos (random-weight ViT-S/8 keys)")
    if random_rows and photo_rows:
        summarise(rows, "all draws")
    print(f"\n{time.perf_counter() - t0:.0f}s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
