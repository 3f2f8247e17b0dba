"""GPU check: extraction and clustering on a few hundred images, images/s, GPU memory, speed-up over CPU, and how
busy the pipeline keeps the GPU (the bare bf16 forward's images/s, then the pipeline's against it: issue 45).

On a machine without a GPU it runs the CPU path only and says so (the fallback the tests exercise). Images are
generated (gradients and ellipses), so the script needs nothing but the repository.

    python bench/gpu_check.py [--n 300] [--cpu-n 24] [--backbone random-vit-s8] [--max-side 224]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import GpuMemoryPeak, machine, shard_markers

from mlcseg_ray.backends.ray_runtime import cluster_gpus, init_ray
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.pipeline import Pipeline


def make_images(folder: Path, n: int, size: int):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        bg = np.stack([np.linspace(rng.integers(0, 255), rng.integers(0, 255), size)[None].repeat(size, 0)] * 3, -1)
        cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.1, 0.3) * size
        obj = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img = np.where(obj[..., None], rng.integers(0, 255, 3), bg) + rng.normal(0, 8, (size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)


def extract(images: Path, out: Path, cfg: Config) -> float:
    pipe = Pipeline(out, cfg, images=str(images))
    pipe.run(["ingest"])
    t0 = time.perf_counter()
    pipe.run(["extract"])
    return time.perf_counter() - t0


def bare_forward_rate(cfg: Config, n_batches: int = 20) -> float:
    """Images/s of the model alone on the GPU (bf16 autocast, the pipeline's batch size and image size), inputs
    already on the device: what the pipeline is measured against."""
    import torch

    from mlcseg_ray.models.backbones import feature_extractor

    extractor, _ = feature_extractor(cfg, "cuda")
    x = torch.randn(cfg.batch_size, 3, cfg.max_side, cfg.max_side, device="cuda")
    extractor(x)  # warm-up: kernels chosen, memory allocated
    t0 = time.perf_counter()
    for _ in range(n_batches):
        extractor(x)
    return n_batches * cfg.batch_size / (time.perf_counter() - t0)


def model_busy(run_dir: Path, stage: str = "extract") -> tuple[float, float]:
    """Images/s inside the stage's shards and the model's busy share there (issue 45): the markers' images and
    ``forward_seconds`` over the time in which a shard was worked on (two at once on an actor count once)."""
    markers, inside = shard_markers(run_dir, stage)
    return sum(m["images"] for m in markers) / inside, sum(m["forward_seconds"] for m in markers) / inside


def cluster(run_dir: Path, cfg: Config) -> float:
    run = RunDir(run_dir)
    run.remove(run.state("cluster"))  # the same store clustered again, from scratch
    t0 = time.perf_counter()
    Pipeline(run_dir, cfg).run(["cluster"])
    return time.perf_counter() - t0


def refine_rate(n: int, device: str) -> float:
    """Images/s of the torch refiner (``refine_masks``, batched on a GPU) on n generated 500 x 375 photos with a
    blob-shaped ViT-S/8 patch score, after one untimed image (CUDA's start-up)."""
    from mlcseg_ray.library.extraction import geometry
    from mlcseg_ray.ops.crf import CrfParams, crf_inputs, refine_masks

    rng = np.random.default_rng(0)
    g = geometry(500, 375, 8, 512, False).__dict__
    yy, xx = np.mgrid[: g["grid_h"], : g["grid_w"]]
    score = (np.exp(-((yy - 24) ** 2 + (xx - 32) ** 2) / 200.0)).ravel().astype(np.float32)
    rgb = [rng.integers(0, 255, (375, 500, 3), np.uint8) for _ in range(n)]
    inputs = [crf_inputs(im, score, g, 8, CrfParams.of(Config())) for im in rgb]
    refine_masks(inputs[:1], [(375, 500)], CrfParams.of(Config()), device)
    t0 = time.perf_counter()
    refine_masks(inputs, [(375, 500)] * n, CrfParams.of(Config()), device)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--cpu-n", type=int, default=24)
    ap.add_argument("--backbone", default="random-vit-s8")
    ap.add_argument("--max-side", type=int, default=224)
    args = ap.parse_args()
    import torch

    init_ray()
    gpus = cluster_gpus()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-gpu-"))
    make_images(work / "images", args.n, args.max_side)
    make_images(work / "cpu_images", min(args.cpu_n, args.n), args.max_side)
    base = dict(backbone=args.backbone, max_side=args.max_side, num_categories=8, shard_size=64)
    print(f"machine: {machine()}; Ray GPUs: {gpus:g}; torch CUDA: {torch.cuda.is_available()}", flush=True)
    cpu_s = extract(work / "cpu_images", work / "cpu_run", Config(**base, device="cpu", batch_size=8))
    cpu_rate = min(args.cpu_n, args.n) / cpu_s
    print(f"CPU extraction: {cpu_rate:.2f} images/s ({min(args.cpu_n, args.n)} images)", flush=True)
    with GpuMemoryPeak() as mem:
        if gpus == 0:
            print("no GPU in the Ray cluster: CPU path only (device=auto falls back to it)")
            cfg = Config(**base, device="auto", batch_size=8)
            t = extract(work / "cpu_images", work / "auto_run", cfg)
            print(f"device=auto on CPU: {min(args.cpu_n, args.n) / t:.2f} images/s")
            run_dir = work / "auto_run"
        else:
            cfg = Config(**base, device="cuda", batch_size=64)  # precision auto: bf16 autocast on CUDA
            t = extract(work / "images", work / "gpu_run", cfg)
            print(
                f"GPU extraction (bf16): {args.n / t:.2f} images/s ({args.n} images); "
                f"speed-up over CPU {args.n / t / cpu_rate:.1f}x",
                flush=True,
            )
            rate, busy = model_busy(work / "gpu_run")
            bare = bare_forward_rate(cfg)
            print(
                f"GPU feed: the bare bf16 forward {bare:.1f} images/s; the pipeline {rate:.1f} images/s inside its "
                f"shards ({rate / bare:.2f} of it), the model busy {busy:.0%} of the shards' time",
                flush=True,
            )
            t32 = extract(work / "images", work / "gpu_run_fp32", cfg.model_copy(update={"precision": "fp32"}))
            print(f"GPU extraction (fp32): {args.n / t32:.2f} images/s; bf16 is {t32 / t:.2f}x faster", flush=True)
            run_dir = work / "gpu_run"
        # Clustering of the same store on CPUs only, then with device=auto (shard tasks on the GPUs if any),
        # after an untimed run that starts the workers and their imports (else the first one timed pays for it).
        cpu_cfg, auto_cfg = cfg.model_copy(update={"device": "cpu"}), cfg.model_copy(update={"device": "auto"})
        cluster(run_dir, cpu_cfg), cluster(run_dir, auto_cfg)
        cpu_cluster, auto_cluster = cluster(run_dir, cpu_cfg), cluster(run_dir, auto_cfg)
    print(
        f"clustering: {cpu_cluster:.1f}s on CPUs, {auto_cluster:.1f}s with device=auto "
        f"(speed-up {cpu_cluster / auto_cluster:.2f}x)"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"refinement (torch refiner, crf_max_side 384): {refine_rate(8, 'cpu'):.1f} images/s on one CPU thread")
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        print(f"refinement on the GPU, batched: {refine_rate(256, 'cuda'):.1f} images/s", flush=True)
    if mem.peak is not None:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
        print(f"GPU memory peak (nvidia-smi, all GPUs): {mem.peak} MiB; device 0 total {total:.0f} GiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
