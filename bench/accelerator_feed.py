"""Does the pipeline keep a fast accelerator fed? (issue 45) Extraction and describe with the simulated accelerator
(``--backbone sim-accelerator``: a forward of ``sim_forward_ms`` per image or crop that waits without using a CPU),
images decoded and crops cut ahead of the model by ``decode_threads`` threads, or not (0), side by side in one run.

For each stage and setting: the model's busy share inside the shards (the markers' ``forward_seconds`` over the
time in which at least one shard was being worked on, each shard lasting its marker's ``seconds`` up to the moment
its marker was written: 1.0 is a model that never waits; with two shards at once their overlap counts once), the
rate reached against the forward's own rate, the busy share of the stage's wall time (actor start-up included), and
the peak RSS of the actor process. With ``decode_threads`` > 0 an actor also works on two shards at once. The
outputs of both settings are compared byte for byte.

    python bench/accelerator_feed.py [--copies 2] [--max-side 512] [--extract-ms 25] [--describe-ms 5]

The photos: the VOC and COCO photos of ../shared/data, each ``--copies`` times (2: 250 photos).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHARED, PeakRSS, machine, shard_markers

from mlcseg_ray.backends.ray_runtime import init_ray
from mlcseg_ray.core.config import Config
from mlcseg_ray.pipeline import Pipeline

SETTINGS = (0, 2)  # decode_threads: in the model's thread, or two threads ahead of it


def photos(folder: Path, copies: int) -> Path:
    folder.mkdir(parents=True)
    found = sorted((SHARED / "voc2012_val_subset" / "JPEGImages").glob("*.jpg"))
    found += sorted((SHARED / "coco_val2014_subset" / "images").glob("*.jpg"))
    for n in range(copies):
        for p in found:
            shutil.copy(p, folder / f"{p.stem}_{n}.jpg")
    return folder


class ActorPeak(PeakRSS):
    def actors(self) -> float:
        """The largest peak RSS of a Ray actor that ran a stage's model (``ray::MapWorker``), MB."""
        return max((v for (_, name), v in self.peaks.items() if "MapWorker" in name), default=0) / 2**20


def measure(run: Path, stage: str, forward_ms: float) -> dict:
    markers, inside = shard_markers(run, stage)
    busy = sum(m["forward_seconds"] for m in markers)
    items = sum(m["regions"] if stage == "describe" else m["images"] for m in markers)
    wall = json.loads((run / "run.json").read_text())["stages"][stage]["seconds"]
    return {
        "items": items,
        "busy_inside": busy / inside,
        "rate": items / inside,
        "forward_rate": 1000 / forward_ms,
        "busy_wall": busy / wall,
        "wall": wall,
    }


def outputs(run: Path, folder: str) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / folder).rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--extract-ms", type=float, default=25.0)
    ap.add_argument("--describe-ms", type=float, default=5.0, help="a crop (224 px) is about a fifth of a 512 px image")
    ap.add_argument("--shard-size", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlcseg-feed-"))
    images = photos(work / "images", args.copies)
    base = dict(backbone="sim-accelerator", max_side=args.max_side, shard_size=args.shard_size, batch_size=8)
    init_ray(num_cpus=2)
    rows, runs = [], {}
    for threads in SETTINGS:
        cfg = Config(**base, sim_forward_ms=args.extract_ms, decode_threads=threads)
        runs[threads] = work / f"threads{threads}"
        with ActorPeak() as peak:
            Pipeline(runs[threads], cfg, images=str(images)).run(["ingest", "extract"], print_summary=False)
        rows.append(("extract", threads, measure(runs[threads], "extract", args.extract_ms), peak.actors()))
    # describe after the same clustering and refinement: those once, then describe with each setting
    cfg = Config(**base, sim_forward_ms=args.describe_ms, decode_threads=0)
    Pipeline(runs[0], cfg).run(["cluster", "refine"], print_summary=False)
    for threads in SETTINGS:
        run = work / f"describe{threads}"
        shutil.copytree(runs[0], run)
        cfg = Config(**base, sim_forward_ms=args.describe_ms, decode_threads=threads)
        t0 = time.perf_counter()
        with ActorPeak() as peak:
            Pipeline(run, cfg).run(["describe"], print_summary=False)
        print(f"describe, {threads} threads: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        rows.append(("describe", threads, measure(run, "describe", args.describe_ms), peak.actors()))
    same_features = outputs(runs[0], "features") == outputs(runs[2], "features")
    same_regions = outputs(work / "describe0", "regions") == outputs(work / "describe2", "regions")

    print(f"machine: {machine()}")
    print(
        f"{rows[0][2]['items']} photos, max_side {args.max_side}, shard_size {args.shard_size}, batch_size 8; "
        f"simulated forward {args.extract_ms:g} ms an image (extract), {args.describe_ms:g} ms a crop (describe)"
    )
    print()
    print(
        "| stage | decode_threads | items | model busy inside shards | rate / forward's own rate | "
        "model busy, stage wall | stage wall (s) | actor peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for stage, threads, m, rss in rows:
        print(
            f"| {stage} | {threads} | {m['items']} | {m['busy_inside']:.2f} | "
            f"{m['rate']:.1f}/{m['forward_rate']:.0f} = {m['rate'] / m['forward_rate']:.2f} | "
            f"{m['busy_wall']:.2f} | {m['wall']:.1f} | {rss:.0f} |"
        )
    print()
    print(f"byte-identical with and without threads ahead: features {same_features}, regions {same_regions}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
