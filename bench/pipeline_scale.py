"""Scale benchmark of a whole run (issue 25): every stage, ``mlcseg run`` as a user starts it, on small synthetic
images at sizes four times apart.

For each size: wall time and time per image, each stage's seconds, the driver's peak RSS and CPU seconds per image
(its own ``getrusage``: the process that lists, merges and writes the run-wide files), each Ray worker's peak RSS and
Ray's own processes' (polled), and the run folder's size. Then each size again cut into other shards
(``--other-shard-size``): the masks, binary masks and COCO JSON must be byte-identical. Targets (issue 25): driver
peak RSS at the largest size at most 1.25x that at the smallest, driver CPU seconds per image no higher, time per
image within 1.15x.

    python bench/pipeline_scale.py --sizes 20000 80000 320000          # the issue's sizes
    python bench/pipeline_scale.py --sizes 2000 8000 32000 --work /tmp/scale
    python bench/pipeline_scale.py --sizes 320000 --reference-digest 31d17cc9bd226fc6   # the other cut alone
    python bench/pipeline_scale.py --sizes 80000 640000 --tars 10000 --invariance none  # issue 42: from tars

Images are 32x32 PNGs (a planted square on a noisy background) in folders of 1,000 (with ``--tars N``: packed into
WebDataset tars of N images, members named by their paths in the folder, so the ids and outputs are the folder
run's, and run with ``--webdataset``); the backbone is the random
``random-vit-tiny`` (patch 8: 16 patches an image), crops of 32 px: the per-image work is small, so what grows with
the number of images shows.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Poller, machine

CONFIG = ["--backbone", "random-vit-tiny", "crop_size=32", "num_classes=5", "num_categories=8"]
SIDE = 32
PER_FOLDER = 1000

# The driver as `mlcseg` runs it, reporting its own CPU time and peak RSS when it exits, and its peak RSS while each
# stage ran (sampled every 0.2 s; "status": a write of status.parquet, "after X": between X and what follows it):
# where the peak is, not only how high.
DRIVER = """
import atexit, json, resource, sys, threading, time
usage, current, by_stage = sys.argv[1], ["start"], {}
def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
def _sample():
    while True:
        by_stage[current[0]] = max(by_stage.get(current[0], 0), _rss_mb())
        time.sleep(0.2)
def _save():
    r = resource.getrusage(resource.RUSAGE_SELF)
    stages = {k: round(v) for k, v in by_stage.items()}
    with open(usage, "w") as f:
        json.dump({"cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": r.ru_maxrss / 1024, "by_stage": stages}, f)
atexit.register(_save)
from mlcseg_ray.core import executor
def _labelled(fn, name):
    def run(self, *a, **k):
        current[0] = name(a)
        try:
            return fn(self, *a, **k)
        finally:
            current[0] = "after " + current[0]
    return run
executor.Executor._run_stage = _labelled(executor.Executor._run_stage, lambda a: a[0])
executor.Executor._write_status = _labelled(executor.Executor._write_status, lambda a: "status")
threading.Thread(target=_sample, daemon=True).start()
sys.argv = ["mlcseg", *sys.argv[2:]]
from mlcseg_ray.cli.app import main
main()
"""


def _write_folder(args: tuple[Path, int, int]) -> None:
    root, folder, count = args
    d = root / f"d{folder:04d}"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(folder)
    for i in range(count):
        a = np.full((SIDE, SIDE, 3), rng.integers(0, 90), np.uint8)
        s = int(rng.integers(8, 20))
        x, y = rng.integers(0, SIDE - s, 2)
        a[y : y + s, x : x + s] = rng.integers(140, 256, 3)
        a = np.clip(a + rng.integers(0, 24, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{folder * PER_FOLDER + i:07d}.png")


def generate(root: Path, n: int) -> None:
    """``n`` images in folders of 1,000 (kept and reused when ``root`` already holds them)."""
    if (root / ".complete").exists():
        return
    jobs = [(root, f, min(PER_FOLDER, n - f * PER_FOLDER)) for f in range((n + PER_FOLDER - 1) // PER_FOLDER)]
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_write_folder, jobs)
    (root / ".complete").touch()


class TreePeaks(Poller):
    """Peak RSS of each process below ``pid`` (the driver's embedded Ray: raylet, GCS, workers)."""

    interval = 0.5

    def __init__(self, pid: int):
        self.pid, self.workers, self.ray = pid, {}, {}

    def sample(self):
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return False
        for p in children:
            try:
                rss, name = p.memory_info().rss, " ".join(p.cmdline()[:2])
            except psutil.Error:
                continue
            kind = self.workers if "ray::" in name or "default_worker" in name else self.ray
            kind[p.pid] = max(kind.get(p.pid, 0), rss)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def outputs_digest(run: Path) -> str:
    """One hash of what must not depend on the shard size: every mask, every binary mask, the COCO JSON."""
    h = hashlib.sha256()
    for sub in ("masks", "binary"):
        for p in sorted((run / sub).rglob("*.png")):
            h.update(p.relative_to(run).as_posix().encode() + p.read_bytes())
    h.update((run / "pseudo_labels.json").read_bytes())
    return h.hexdigest()[:16]


def pack_tars(images: Path, per_tar: int) -> Path:
    """The folder's images as tars of ``per_tar`` (kept and reused where they are complete)."""
    tars = images.parent / f"{images.name}-tars"
    if (tars / ".complete").exists():
        return tars
    tars.mkdir(exist_ok=True)
    files = sorted(p for p in images.rglob("*.png"))
    for n, i in enumerate(range(0, len(files), per_tar)):
        with tarfile.open(tars / f"part-{n:04d}.tar", "w") as tar:
            for p in files[i : i + per_tar]:
                tar.add(p, arcname=p.relative_to(images).as_posix())
    (tars / ".complete").touch()
    return tars


def run_once(images: Path, out: Path, shard_size: int) -> dict:
    usage = out.parent / f"{out.name}.usage.json"
    given = ["--webdataset" if images.name.endswith("-tars") else "--images", str(images)]
    cmd = [sys.executable, "-c", DRIVER, str(usage), "run", *given, "--out", str(out)]
    cmd += [*CONFIG, f"shard_size={shard_size}", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreePeaks(proc.pid) as peaks:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        sys.exit(f"mlcseg run failed ({proc.returncode}): {stderr[-3000:]}")
    driver = json.loads(usage.read_text())
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {
        "seconds": seconds,
        "stages": {k: v.get("seconds", 0) for k, v in stages.items()},
        "driver_rss_mb": driver["peak_rss_mb"],
        "driver_rss_by_stage_mb": driver["by_stage"],
        "driver_cpu_s": driver["cpu_s"],
        "worker_rss_mb": max(peaks.workers.values(), default=0) / 2**20,
        "ray_rss_mb": max(peaks.ray.values(), default=0) / 2**20,
        "run_mb": folder_bytes(out) / 2**20,
        "digest": outputs_digest(out),
        "images": json.loads(stdout)["images"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000, 320000])
    ap.add_argument("--shard-size", type=int, default=64, help="images per shard (the default)")
    ap.add_argument("--other-shard-size", type=int, default=48, help="the second cut, for the invariance check")
    ap.add_argument("--invariance", choices=["all", "smallest", "none"], default="all")
    ap.add_argument("--work", type=Path, default=None, help="where images and runs go (kept when given)")
    ap.add_argument("--tars", type=int, default=None, help="run from WebDataset tars of this many images")
    ap.add_argument(
        "--reference-digest",
        default=None,
        help="one size only: the digest a run in --shard-size shards gave before (BENCHMARKS.md); only the other cut "
        "is run and compared with it (half the time of a full check at 320k)",
    )
    args = ap.parse_args()
    if args.reference_digest and len(args.sizes) != 1:
        sys.exit("--reference-digest: give one size")
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-pipeline-scale-"))
    print(f"machine: {machine()}")
    print(f"images {SIDE}x{SIDE} px, {' '.join(CONFIG)}, shards of {args.shard_size}", flush=True)
    if args.tars:
        print(f"from WebDataset tars of {args.tars} images (--webdataset)", flush=True)
    results = {}
    for n in args.sizes:
        images = work / f"images-{n}"
        t0 = time.perf_counter()
        generate(images, n)
        if args.tars:
            images = pack_tars(images, args.tars)
        print(f"{n} images ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        for sub in (f"run-{n}", f"run-{n}-other"):
            shutil.rmtree(work / sub, ignore_errors=True)
        if args.reference_digest:  # the row is the other cut's run
            r = run_once(images, work / f"run-{n}-other", args.other_shard_size)
            r["same_as_other_cut"] = r["digest"] == args.reference_digest
            shutil.rmtree(work / f"run-{n}-other", ignore_errors=True)
            results[n] = r
            print(json.dumps({"images": n, **r}), flush=True)
            continue
        r = run_once(images, work / f"run-{n}", args.shard_size)
        assert r["images"] == n, r
        check = args.invariance == "all" or (args.invariance == "smallest" and n == args.sizes[0])
        if check:
            other = run_once(images, work / f"run-{n}-other", args.other_shard_size)
            r["same_as_other_cut"] = other["digest"] == r["digest"]
            shutil.rmtree(work / f"run-{n}-other", ignore_errors=True)
        results[n] = r
        print(json.dumps({"images": n, **r}), flush=True)
        shutil.rmtree(work / f"run-{n}", ignore_errors=True)

    names = list(results[args.sizes[0]]["stages"])
    print(
        "\n| images | seconds | ms/image | "
        + " | ".join(f"{s} s" for s in names)
        + " | driver peak MB | driver CPU ms/image | worker peak MB | Ray peak MB | run folder MB | same bytes as "
        f"shards of {args.other_shard_size} |"
    )
    print("|---" * (len(names) + 9) + "|")
    for n, r in results.items():
        stage_cells = " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in names)
        print(
            f"| {n} | {r['seconds']:.0f} | {1000 * r['seconds'] / n:.2f} | {stage_cells} | {r['driver_rss_mb']:.0f} | "
            f"{1000 * r['driver_cpu_s'] / n:.3f} | {r['worker_rss_mb']:.0f} | {r['ray_rss_mb']:.0f} | "
            f"{r['run_mb']:.0f} | {r.get('same_as_other_cut', '-')} |"
        )
    print("\ndriver peak RSS (MB) while each stage ran:")
    for n, r in results.items():
        print(f"  {n}: " + ", ".join(f"{k} {v}" for k, v in r["driver_rss_by_stage_mb"].items()))
    n0, n1 = args.sizes[0], args.sizes[-1]
    if n1 != n0:  # ratios need two sizes; --reference-digest runs one
        small, large = results[n0], results[n1]
        rss = large["driver_rss_mb"] / small["driver_rss_mb"]
        cpu = (large["driver_cpu_s"] / n1) / (small["driver_cpu_s"] / n0)
        per_image = (large["seconds"] / n1) / (small["seconds"] / n0)
        slope = (large["driver_rss_mb"] - small["driver_rss_mb"]) * 1024 / (n1 - n0)
        print(f"\ndriver peak RSS {n1}/{n0}: {rss:.2f}x (target <= 1.25); growth {slope:.2f} KB per image")
        print(f"driver CPU s/image {n1}/{n0}: {cpu:.2f}x (target <= 1.00)")
        print(f"time per image {n1}/{n0}: {per_image:.2f}x (target <= 1.15)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if any(r.get("same_as_other_cut") is False for r in results.values()):
        sys.exit("the shard cuts gave different bytes")


if __name__ == "__main__":
    main()
