"""End-to-end seconds per image on the VOC photos, by stage, against a bare timm forward of the same images at the
same resolution, measured in the same run.

    python bench/e2e_bench.py [--n 59] [--backbone random-vit-s8] [--max-side 512]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine
from extract_throughput import bare

from mlcseg_ray.backends.cluster import init_ray
from mlcseg_ray.config import Config
from mlcseg_ray.core.store import RunDir, markers, read_json
from mlcseg_ray.pipeline import Pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=59)
    ap.add_argument("--backbone", default="random-vit-s8")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--descriptor", default="crop_cls")
    args = ap.parse_args()
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]
    work = Path(tempfile.mkdtemp(prefix="mlcseg-e2e-"))
    voc = VOC_IMAGES.parent
    cfg = Config(backbone=args.backbone, max_side=args.max_side, region_descriptor=args.descriptor)
    init_ray(num_cpus=torch.get_num_threads())
    t0 = time.perf_counter()
    pipe = Pipeline(work / "run", cfg, voc=str(voc))
    pipe.run()
    total = time.perf_counter() - t0
    stages = json.loads((work / "run" / "run.json").read_text())["stages"]
    bare_rate = bare(paths, cfg, torch.get_num_threads())
    n = len(paths)
    print(f"machine: {machine()}")
    print(f"{n} VOC photos, {args.backbone}, max_side {args.max_side}, region descriptor {args.descriptor}")
    print("  stage    s/image   of which outside its shards (start-up, global passes)")
    run = RunDir(work / "run")
    for s, v in stages.items():
        in_shards = sum(read_json(m).get("seconds", 0) for m in markers(run.state(s)))
        print(f"  {s:8s} {v['seconds'] / n:7.3f}   {v['seconds'] - in_shards:6.1f} s")
    print(f"pipeline total : {total / n:.3f} s/image")
    print(f"bare forward   : {1 / bare_rate:.3f} s/image")
    print(f"ratio pipeline/bare forward: {total / n * bare_rate:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
