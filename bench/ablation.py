"""Foreground IoU of every clustering level and combine rule, on the fixed planted sets and on randomized families.

    python bench/ablation.py                       # fixed sets, 100 + 50 randomized draws, 20 + 20 on real photos
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
from mlcseg_ray.core.config import Config  # noqa: E402
from mlcseg_ray.core.run_dir import RunDir  # noqa: E402
from mlcseg_ray.library.clustering import read_pseudo  # noqa: E402
from mlcseg_ray.pipeline import Pipeline  # noqa: E402
from mlcseg_ray.tools.ablate import RULES, SINGLE_LEVELS, rule_score  # noqa: E402

RULES_LIST = list(RULES)

DATA = ROOT.parent / "shared" / "data"
MASKS = DATA / "voc2012_val_masks" / "SegmentationClass"
PHOTOS = DATA / "voc2012_val_subset"
STRENGTHS = (0.3, 0.5, 0.7, 1.0, 1.5)


def rule_ious(store: Path) -> dict:
    """Patch-level foreground IoU of every rule against the store's gt.parquet; for the empty scenes, the share
    each rule keeps clean (at most 5% foreground); and the configured rule's IoU without the least confident 10% of
    the images."""
    gt = {r["image_id"]: r for r in pq.read_table(store / "gt.parquet").to_pylist()}
    inter = dict.fromkeys(RULES, 0)
    union = dict.fromkeys(RULES, 0)
    clean = dict.fromkeys(RULES, 0)
    n_empty, per_image = 0, []
    for row in read_pseudo(RunDir(store)).to_pylist():
        t = np.asarray(gt[row["image_id"]]["mask"], bool)
        empty = not t.any()
        n_empty += empty
        for rule in RULES:
            p = rule_score(row, rule) > 0.5
            inter[rule] += int((p & t).sum())
            union[rule] += int((p | t).sum())
            clean[rule] += int(empty and p.mean() <= 0.05)
        m = np.asarray(row["mask"], bool)
        per_image.append((row["confidence"], int((m & t).sum()), int((m | t).sum())))
    out = {r: inter[r] / union[r] if union[r] else 1.0 for r in RULES}
    if n_empty:
        out.update({f"clean/{r}": clean[r] / n_empty for r in RULES})
    per_image.sort(key=lambda x: x[0])
    kept = per_image[len(per_image) // 10 :]
    out["confident 90%"] = sum(i for _, i, _ in kept) / max(1, sum(u for _, _, u in kept))
    out["all images"] = sum(i for _, i, _ in per_image) / max(1, sum(u for _, _, u in per_image))
    return out


def cluster(store: Path, out: Path, **overrides) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("features", "images"):
        shutil.copytree(store / sub, out / sub)
    shutil.copy(store / "gt.parquet", out / "gt.parquet")
    Pipeline(out, Config(**overrides), backend="local").run(["cluster"], print_summary=False)
    return rule_ious(out)


def one_draw(job) -> dict:
    """Generate one draw's store, cluster it, score every rule, remove the store."""
    import torch

    torch.set_num_threads(1)  # draws run side by side, one per core
    kind, draw, work, photo_base = job
    out = Path(work) / f"{kind}{draw}"
    shutil.rmtree(out, ignore_errors=True)
    if kind in ("random", "scenes"):
        generate(out, random_spec(draw, scenes=kind == "scenes"), mask_dir=MASKS)
    else:
        generate_on_photos(
            out,
            RunDir(photo_base),
            PHOTOS / "SegmentationClass",
            STRENGTHS[draw % len(STRENGTHS)],
            seed=draw,
            empty_share=0.2 if kind == "photo-empty" else 0.0,
        )
    Pipeline(out, Config(), backend="local").run(["cluster"], print_summary=False)
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
    scenes = all(f"clean/{RULES_LIST[0]}" in r for r in rows)
    print(
        "| rule | mean fg IoU | mean regret vs per-draw best level | worst draw | beats every level |"
        + (" empty scenes kept clean |" if scenes else "")
    )
    print("|---|---|---|---|---|" + ("---|" if scenes else ""))
    for rule in RULES:
        v = np.array([r[rule] for r in rows])
        beats = np.mean(v > best + 1e-9)
        line = f"| {rule} | {v.mean():.4f} | {np.mean(best - v):+.4f} | {v.min():.3f} | {beats:.0%} |"
        if scenes:
            line += f" {np.mean([r[f'clean/{rule}'] for r in rows]):.1%} |"
        print(line)
    drop = np.array([r["confident 90%"] - r["all images"] for r in rows])
    print(
        f"Confidence: without the least confident 10% of images the default's IoU is "
        f"{np.mean([r['confident 90%'] for r in rows]):.4f} "
        f"(all images {np.mean([r['all images'] for r in rows]):.4f}); "
        f"higher on {np.mean(drop > 0):.0%} of draws, lower on {np.mean(drop < 0):.0%}"
    )


def photo_base(work: Path) -> Path:
    """The 59 VOC photos through a random-weight ViT-S/8 (max_side 320): the real-image half of the photo draws."""
    base = work / "photo_base"
    Pipeline(
        base, Config(backbone="random-vit-s8", max_side=320), backend="local", images=str(PHOTOS / "JPEGImages")
    ).run(["ingest", "extract"], print_summary=False)
    return base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, action="append", help="store folder(s) with gt.parquet")
    ap.add_argument("--n-images", type=int, default=1449, help="images of the fixed easy and hard sets")
    ap.add_argument("--draws", type=int, default=100, help="randomized planted draws")
    ap.add_argument("--scene-draws", type=int, default=50, help="randomized draws with empty scenes and close-ups")
    ap.add_argument(
        "--photo-draws", type=int, default=20, help="draws on the real VOC photos (and as many with empty scenes)"
    )
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
    jobs += [("scenes", d, str(work), None) for d in range(args.scene_draws)]
    if args.photo_draws:
        base = photo_base(work)
        jobs += [(kind, d, str(work), str(base)) for kind in ("photo", "photo-empty") for d in range(args.photo_draws)]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        rows = pool.map(one_draw, jobs, chunksize=1)
    families = {
        "random": "randomized planted family",
        "scenes": "randomized planted family with empty scenes (5-30%) and close-ups (0-15%)",
        "photo": "planted on real VOC photos (random-weight ViT-S/8 keys)",
        "photo-empty": "planted on real VOC photos, 20% of them empty scenes",
    }
    for kind, title in families.items():
        fam = [r for r in rows if r["draw"].rstrip("0123456789") == kind]
        if fam:
            summarise(fam, title)
    if len({r["draw"].rstrip("0123456789") for r in rows}) > 1:
        summarise(rows, "all draws")
    print(f"\n{time.perf_counter() - t0:.0f}s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
