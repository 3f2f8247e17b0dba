"""Scale benchmark of the clustering stage (all three levels + combine) on planted stores of growing size.

For each size: wall time per level, patches per second, peak RSS of every process (driver, Ray workers, Ray's own
processes), object-store spilling, and the planted foreground IoU (quality must hold at scale). Targets (issue 7):
time grows at most linearly (time ratio of the two largest sizes at most 1.1x their size ratio), peak RSS of every
process at the largest size within 1.25x of that at the smallest.

The stores are generated first (outside any cap); then, with ``--memory-cap auto``, the clustering of every size
runs inside one memory cgroup capped at a quarter of the largest store: the driver, Ray and all its workers
together may not hold more than that, so the largest store cannot be held by any process.

    python bench/scale.py --sizes 2000 10000 40000 --patches 784 --dim 384 --memory-cap auto
"""

import argparse
import contextlib
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the planted-store generator (tests/helpers)
from common import MemoryCap, PeakRSS, machine

from helpers.planted import PlantedSpec, foreground_iou, generate, random_grids
from mlcseg_ray.backends.ray_runtime import init_ray
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.pipeline import Pipeline


def spilled_bytes() -> int:
    try:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        for line in text.splitlines():
            if line.strip().startswith("Spilled"):
                return int(float(line.split()[1]) * 2**20)
    except Exception:
        pass
    return 0


def _generate(out: Path, n: int, side: int, dim: int, shard_size: int) -> None:
    rng = np.random.default_rng(n)
    spec = PlantedSpec("easy", dim=dim, shard_size=shard_size, noise=0.35, seed=n)
    generate(out, spec, grids=random_grids(n, (side, side), rng))


def store_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / "features").glob("*.parquet"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    ap.add_argument("--patches", type=int, default=784, help="patches per image (a square grid; 784 = ViT-S/8 at 224)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shard-size", type=int, default=64, help="images per shard (the pipeline's default)")
    ap.add_argument(
        "--memory-cap", default="auto", help="'auto' (a quarter of the largest store), a size in MB, or 'none'"
    )
    ap.add_argument("--work", type=Path, default=None, help="where the stores go (kept when given)")
    args = ap.parse_args()
    side = int(round(args.patches**0.5))
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-scale-"))
    print(f"machine: {machine()}")
    print(f"images of {side}x{side} patches x {args.dim} dims, shards of {args.shard_size} images", flush=True)

    stores = {}
    for n in args.sizes:
        out = work / f"n{n}"
        if not (out / "gt.parquet").exists():  # a kept store is reused
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            # A child process: the generator's memory counts in no measured process, and it runs outside the cap.
            child = mp.get_context("spawn").Process(target=_generate, args=(out, n, side, args.dim, args.shard_size))
            child.start()
            child.join()
            assert child.exitcode == 0, "store generation failed"
            print(f"generated {n} images in {time.perf_counter() - t0:.0f}s", flush=True)
        stores[n] = out
    largest = max(store_bytes(o) for o in stores.values())
    cap = (
        None
        if args.memory_cap == "none"
        else (largest // 4 if args.memory_cap == "auto" else int(float(args.memory_cap) * 2**20))
    )
    if cap:
        print(
            f"memory cap {cap / 2**20:.0f} MB for the driver, Ray and every worker together "
            f"(largest store {largest / 2**20:.0f} MB)",
            flush=True,
        )

    print(
        "| images | patches | store MB | seconds | dataset s | category s | image+combine s | patches/s | "
        "driver peak MB | worker peak MB | other Ray peak MB | spilled MB | fg IoU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with MemoryCap(cap) if cap else contextlib.nullcontext() as group:
        init_ray()
        for n, out in stores.items():
            for sub in ("pseudo", "levels", "_state"):
                shutil.rmtree(out / sub, ignore_errors=True)  # a rerun on a kept store starts the stage afresh
            times, notes = {}, []

            def log(msg, times=times, notes=notes):
                times[msg.split(":")[0]] = float(msg.rsplit("(", 1)[1].rstrip("s)"))
                notes.append(msg.split(" (")[0])  # e.g. "dataset level: 3 iterations, fg clusters [1]"

            handler = logging.Handler()
            handler.emit = lambda record: log(record.getMessage()) if "level:" in record.getMessage() else None
            logging.getLogger("mlcseg_ray").addHandler(handler)
            logging.getLogger("mlcseg_ray").setLevel(logging.INFO)
            with PeakRSS() as peaks:
                t0 = time.perf_counter()
                Pipeline(out, Config(), backend="ray").run(["cluster"], print_summary=False)
                seconds = time.perf_counter() - t0
            logging.getLogger("mlcseg_ray").removeHandler(handler)
            driver, worker = peaks.driver_and_max_worker()
            other = peaks.max_other()
            iou = foreground_iou(RunDir(out))["mask"]
            rest = seconds - times.get("dataset level", 0) - times.get("category level", 0)
            patches = n * side * side
            rows.append((n, seconds, driver, worker, other))
            print(
                f"| {n} | {patches:,} | {store_bytes(out) / 2**20:.0f} | {seconds:.1f} | "
                f"{times.get('dataset level', 0):.1f} | {times.get('category level', 0):.1f} | {rest:.1f} | "
                f"{patches / seconds:,.0f} | {driver:.0f} | {worker:.0f} | {other:.0f} | "
                f"{spilled_bytes() / 2**20:.0f} | {iou:.3f} |",
                flush=True,
            )
            print(f"<!-- {n}: {'; '.join(notes)} -->", flush=True)  # k-means iterations: each is a pass
        import ray

        ray.shutdown()
        if cap:
            print(
                f"cgroup: peak charge {group.peak() / 2**20:.0f} MB of {cap / 2**20:.0f} MB (page cache "
                f"included), OOM kills {group.oom_kills()}"
            )
    (n0, _, d0, w0, o0), (n1, _, d1, w1, o1) = rows[0], rows[-1]
    if len(rows) >= 2:
        (na, ta, *_), (nb, tb, *_) = rows[-2], rows[-1]
        print(f"time ratio {nb}/{na}: {tb / ta:.2f} (size ratio {nb / na:.1f}; target <= {1.1 * nb / na:.1f})")
        print(
            f"peak RSS ratio {n1}/{n0}: driver {d1 / d0:.2f}, worker {w1 / max(w0, 1):.2f}, "
            f"other Ray {o1 / max(o0, 1):.2f} (target <= 1.25)"
        )
    if cap:
        print(
            f"largest process peak {max(d1, w1, o1):.0f} MB, cap {cap / 2**20:.0f} MB, "
            f"largest store {largest / 2**20:.0f} MB"
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
