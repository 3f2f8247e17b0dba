"""Ingest rate (listing + header probe + manifest) on many files: the VOC photos hard-linked N times over.

python bench/ingest_bench.py [--copies 102]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

from mlcseg_ray.core.config import Config
from mlcseg_ray.pipeline import Pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=102)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-ingest-"))
    folder = work / "images"
    folder.mkdir()
    n = 0
    for rep in range(args.copies):
        for p in sorted(VOC_IMAGES.glob("*.jpg")):
            os.link(p, folder / f"{rep:04d}_{p.name}")  # hard links: same bytes, no copying
            n += 1
    t0 = time.perf_counter()
    Pipeline(work / "run", Config(backbone="random-vit-s8"), images=str(folder)).run(["ingest"])
    seconds = time.perf_counter() - t0
    print(f"machine: {machine()}")
    print(f"ingest: {n} images in {seconds:.1f}s = {seconds / n * 1000:.2f} ms/image")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
