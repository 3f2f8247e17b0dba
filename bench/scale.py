"""Scale benchmark of the clustering stage (all three levels + combine) on planted stores of growing size.

For each size: wall time per level, patches per second, peak RSS of every process (driver and Ray workers),
object-store spilling, and the planted foreground IoU (quality must hold at scale). Targets (issue 7): time grows
at most linearly (time ratio of the two largest sizes at most 1.1x their size ratio), peak RSS of every process at
the largest size within 1.25x of that at the smallest. The store of the largest size should exceed what any one
process holds: the script reports the store size next to the largest process peak.

    python bench/scale.py --sizes 2000 10000 40000 --patches 196 --dim 96
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import PeakRSS, machine  # noqa: E402

from mlcseg_ray.cluster import run_cluster  # noqa: E402
from mlcseg_ray.config import Config  # noqa: E402
from mlcseg_ray.planted import PlantedSpec, foreground_iou, generate, random_grids  # noqa: E402
from mlcseg_ray.raytools import init_ray  # noqa: E402
from mlcseg_ray.store import RunDir  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    ap.add_argument("--patches", type=int, default=196, help="patches per image (a square grid)")
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    side = int(round(args.patches ** 0.5))
    init_ray()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-scale-"))
    print(f"machine: {machine()}")
    print(f"images of {side}x{side} patches x {args.dim} dims, shards of {args.shard_size} images")
    print("| images | patches | store MB | seconds | dataset s | category s | image+combine s | patches/s | "
          "driver peak MB | worker peak MB | spilled MB | fg IoU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        out = work / f"n{n}"
        shutil.rmtree(out, ignore_errors=True)
        # Generated in a child process, so that the generator's memory does not count in the driver's peak.
        import multiprocessing as mp

        child = mp.get_context("spawn").Process(target=_generate, args=(out, n, side, args.dim, args.shard_size))
        child.start()
        child.join()
        assert child.exitcode == 0, "store generation failed"
        store_mb = sum(p.stat().st_size for p in (out / "features").glob("*.parquet")) / 2**20
        times = {}

        def log(msg):
            times[msg.split(":")[0]] = float(msg.rsplit("(", 1)[1].rstrip("s)"))

        with PeakRSS() as peaks:
            t0 = time.perf_counter()
            run_cluster(RunDir(out), Config(), log=log)
            seconds = time.perf_counter() - t0
        driver, worker = peaks.driver_and_max_worker()
        iou = foreground_iou(RunDir(out))["mask"]
        rest = seconds - times.get("dataset level", 0) - times.get("category level", 0)
        rows.append((n, seconds, driver, worker))
        print(f"| {n} | {n * side * side:,} | {store_mb:.0f} | {seconds:.1f} | {times.get('dataset level', 0):.1f} | "
              f"{times.get('category level', 0):.1f} | {rest:.1f} | {n * side * side / seconds:,.0f} | {driver:.0f} | "
              f"{worker:.0f} | {spilled_bytes() / 2**20:.0f} | {iou:.3f} |", flush=True)
        if n != args.sizes[-1]:
            shutil.rmtree(out, ignore_errors=True)
    (n0, _, d0, w0), (n1, _, d1, w1) = rows[0], rows[-1]
    if len(rows) >= 2:
        (na, ta, _, _), (nb, tb, _, _) = rows[-2], rows[-1]
        print(f"time ratio {nb}/{na}: {tb / ta:.2f} (size ratio {nb / na:.1f}; target <= {1.1 * nb / na:.1f})")
        print(f"peak RSS ratio {n1}/{n0}: driver {d1 / d0:.2f}, worker {w1 / max(w0, 1):.2f} (target <= 1.25)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
