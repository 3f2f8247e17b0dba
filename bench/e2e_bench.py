"""End-to-end seconds per image on the VOC photos: the whole ``mlcseg run`` command (interpreter, imports, Ray's
start and shut-down included), by stage, against a bare timm forward of the same images at the same resolution,
measured in the same run: once before the command and once after, because this machine's speed drifts by 10-20%
over minutes (BENCHMARKS.md, issue 23); the ratio is to their mean.

    python bench/e2e_bench.py [--n 59] [--backbone random-vit-s8] [--max-side 512]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, VOC_IMAGES, machine
from extract_throughput import bare

from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir, markers
from mlcseg_ray.core.storage import read_json


def run_command(out: Path, args) -> float:
    """Wall seconds of ``mlcseg run`` on the first ``--n`` VOC photos (image-id order, as the bare forward's)."""
    cmd = [sys.executable, "-m", "mlcseg_ray.cli", "run", "--out", str(out), "--voc", str(VOC_IMAGES.parent)]
    cmd += ["--backbone", args.backbone, "--limit", str(args.n)]
    cmd += [f"max_side={args.max_side}", f"region_descriptor={args.descriptor}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=59)
    ap.add_argument("--backbone", default="random-vit-s8")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--descriptor", default="crop_cls")
    args = ap.parse_args()
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]
    work = Path(tempfile.mkdtemp(prefix="mlcseg-e2e-"))
    cfg = Config(backbone=args.backbone, max_side=args.max_side, region_descriptor=args.descriptor)
    before = 1 / bare(paths, cfg, torch.get_num_threads())
    total = run_command(work / "run", args)
    after = 1 / bare(paths, cfg, torch.get_num_threads())
    stages = json.loads((work / "run" / "run.json").read_text())["stages"]
    bare_rate = 2 / (before + after)
    n = len(paths)
    print(f"machine: {machine()}")
    print(f"{n} VOC photos, {args.backbone}, max_side {args.max_side}, region descriptor {args.descriptor}")
    print("  stage    s/image   of which outside its shards (start-up, global passes)")
    run = RunDir(work / "run")
    all_in_shards = 0.0
    for s, v in stages.items():
        in_shards = sum(read_json(m).get("seconds", 0) for m in markers(run.state(s)))
        all_in_shards += in_shards
        print(f"  {s:8s} {v['seconds'] / n:7.3f}   {v['seconds'] - in_shards:6.1f} s")
    outside = total - sum(v["seconds"] for v in stages.values())
    print(f"  outside the stages (interpreter, imports, Ray start and shut-down): {outside:.1f} s")
    print(f"mlcseg run     : {total / n:.3f} s/image ({total:.1f} s)")
    print(f"bare forward   : {1 / bare_rate:.3f} s/image (before the command {before:.3f}, after {after:.3f})")
    print(f"ratio mlcseg run/bare forward: {total / n * bare_rate:.2f}x")
    # what no cut to the fixed costs can go below: the stages' work inside their shards
    print(f"ratio work inside the shards/bare forward: {all_in_shards / n * bare_rate:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
