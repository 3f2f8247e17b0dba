"""Foreground IoU per level, per consistency rule and per combine rule.

    python bench/ablation.py                      # planted easy + hard sets from ../shared/data VOC masks
    python bench/ablation.py --store RUN          # any store with RUN/gt.parquet (image_id, grid_h, grid_w, mask)

The combine rules are recomputed from the three level masks the cluster stage stores, so one clustering per
consistency rule serves every combine rule.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the planted-store generator
from mlcseg_ray.cluster import read_pseudo  # noqa: E402
from mlcseg_ray.config import Config  # noqa: E402
from mlcseg_ray.pipeline import run_stages  # noqa: E402
from mlcseg_ray.store import RunDir  # noqa: E402
from planted import PlantedSpec, generate  # noqa: E402

RULES = {"dataset": lambda v: v[0], "category": lambda v: v[1], "image": lambda v: v[2],
         "union (>=1)": lambda v: v.sum(0) >= 1, "vote (>=2)": lambda v: v.sum(0) >= 2,
         "intersection (3)": lambda v: v.sum(0) >= 3}


def ablate(store: Path, consistency: str, work: Path) -> dict:
    out = work / consistency
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("features", "images"):
        shutil.copytree(store / sub, out / sub)
    run_stages(out, Config(consistency=consistency), ["cluster"])
    gt = {r["image_id"]: np.asarray(r["mask"], bool) for r in pq.read_table(store / "gt.parquet").to_pylist()}
    inter = {k: 0 for k in RULES}
    union = {k: 0 for k in RULES}
    for r in read_pseudo(RunDir(out)).to_pylist():
        t = gt[r["image_id"]]
        v = np.stack([np.asarray(r[k], bool) for k in ("dataset", "category", "image")])
        for name, rule in RULES.items():
            p = rule(v)
            inter[name] += int((p & t).sum())
            union[name] += int((p | t).sum())
    return {k: inter[k] / max(union[k], 1) for k in RULES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, action="append", help="store folder(s) with gt.parquet")
    ap.add_argument("--masks", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/voc2012_val_masks/SegmentationClass")
    ap.add_argument("--n-images", type=int, default=1449)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-ablation-"))
    stores = args.store or []
    if not stores:
        for diff in ("easy", "hard"):
            generate(work / f"planted_{diff}", PlantedSpec(diff, n_images=args.n_images), mask_dir=args.masks)
            stores.append(work / f"planted_{diff}")
    print(f"| store | consistency | {' | '.join(RULES)} |")
    print(f"|---|---|{'---|' * len(RULES)}")
    for store in stores:
        for consistency in ("relative", "majority"):
            res = ablate(store, consistency, work / store.name)
            print(f"| {store.name} | {consistency} | " + " | ".join(f"{res[k]:.3f}" for k in RULES) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
