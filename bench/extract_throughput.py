"""Extraction images/s through the whole Ray pipeline vs a bare ``model(x)`` loop, side by side in one run.

Same images (VOC photos), same backbone, batch size, resolution and threads. The bare loop gets its batches
already decoded and preprocessed; the pipeline decodes inside its actor, writes Parquet and markers.

    python bench/extract_throughput.py [--n 24] [--max-side 320] [--backbone random-vit-s8]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

from mlcseg_ray.backends.ray_runtime import init_ray
from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.images import load_rgb
from mlcseg_ray.library.extraction import geometry, preprocess
from mlcseg_ray.models.backbones import FeatureExtractor, build_backbone
from mlcseg_ray.pipeline import Pipeline


def bare(paths, cfg, threads):
    torch.set_num_threads(threads)
    model, info = build_backbone(cfg.backbone)
    fe = FeatureExtractor(model)
    groups = {}
    for p in paths:
        rgb = load_rgb(str(p), cfg.max_pixels)
        g = geometry(rgb.shape[1], rgb.shape[0], info.patch_size, cfg.max_side, cfg.upscale)
        x = preprocess(rgb, g, info.mean, info.std)
        groups.setdefault(x.shape, []).append(x)
    batches = [
        torch.from_numpy(np.stack(v[i : i + cfg.batch_size]))
        for v in groups.values()
        for i in range(0, len(v), cfg.batch_size)
    ]
    fe(batches[0][:1])  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model.forward_features(x)
    return len(paths) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-side", type=int, default=320)
    ap.add_argument("--backbone", default="random-vit-s8")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]
    cfg = Config(backbone=args.backbone, max_side=args.max_side, batch_size=args.batch_size, shard_size=args.batch_size)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-bench-"))
    img_dir = work / "imgs"
    img_dir.mkdir()
    for p in paths:
        shutil.copy(p, img_dir / p.name)
    t0 = time.perf_counter()
    init_ray(num_cpus=threads)
    ray_start = time.perf_counter() - t0
    pipe = Pipeline(work / "run", cfg, images=str(img_dir))
    pipe.run(["ingest"])
    t0 = time.perf_counter()
    pipe.run(["extract"])
    pipe_rate = len(paths) / (time.perf_counter() - t0)
    import json

    markers = (work / "run" / "_state" / "extract").glob("[0-9]*")  # one per shard (stage.json beside them)
    shard_s = sum(json.loads(p.read_text())["seconds"] for p in markers)
    steady_rate = len(paths) / shard_s
    bare_rate = bare(paths, cfg, threads)
    print(f"machine: {machine()}")
    print(
        f"images {len(paths)}, backbone {args.backbone}, max_side {args.max_side}, batch {args.batch_size}, "
        f"threads {threads}"
    )
    print(f"ray start (not counted): {ray_start:.1f}s")
    print(f"bare model loop : {bare_rate:.3f} images/s")
    print(f"ray pipeline    : {pipe_rate:.3f} images/s (actor start, decode, preprocess, forward, parquet, markers)")
    print(f"  of which inside the actor, per shard (decode..markers, no start-up): {steady_rate:.3f} images/s")
    print(f"ratio pipeline/bare: {pipe_rate / bare_rate:.3f} end to end, {steady_rate / bare_rate:.3f} steady state")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
