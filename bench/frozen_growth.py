"""What a frozen run (``--freeze``, issue 43) pays for 1% more images: a full run, a rerun with nothing to do (the
start-up), then the same run with 1% more images; each stage's seconds and shards run. Target (issue 43): the
growth costs, beyond the rerun with nothing to do, at most 2% of the full run's time.

    python bench/frozen_growth.py --images 80000 --work /tmp/frozen      # the issue's size
    python bench/frozen_growth.py --images 20000

The images and the config are bench/pipeline_scale.py's (32 x 32 px PNGs, ``random-vit-tiny``, shards of 64).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine
from pipeline_scale import CONFIG, PER_FOLDER, _write_folder, generate


def run(images: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlcseg_ray.cli", "run", "--images", str(images), "--out", str(out), "--freeze"]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, *CONFIG, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode not in (0, 3):
        sys.exit(f"mlcseg run failed ({res.returncode}): {res.stderr[-3000:]}")
    stages = json.loads((out / "run.json").read_text())["stages"]
    summary = {s["stage"]: s for s in json.loads(res.stdout)["stages"]}
    return {
        "seconds": round(seconds, 1),
        "images": json.loads(res.stdout)["images"],
        "stages": {
            name: {
                "seconds": round(summary[name]["seconds"], 1) if name in summary else 0.0,
                "shards_done": stages.get(name, {}).get("shards_done"),
                "skipped": summary.get(name, {}).get("skipped"),
            }
            for name in stages
        },
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--work", type=Path, default=None, help="where images and the run go (kept when given)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-frozen-"))
    images, out = work / f"images-{args.images}", work / f"run-{args.images}"
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"machine: {machine()}\nimages 32x32 px, {' '.join(CONFIG)}, shards of 64, --freeze", flush=True)
    generate(images, args.images)
    full = run(images, out)
    print(json.dumps({"run": "full", **full}), flush=True)
    idle = run(images, out)
    print(json.dumps({"run": "nothing to do", **idle}), flush=True)
    added = max(1, args.images // 100)
    _write_folder((images, (args.images + PER_FOLDER - 1) // PER_FOLDER, added))  # a new folder of 1% more
    grow = run(images, out)
    print(json.dumps({"run": f"{added} images added", **grow}), flush=True)
    extra = grow["seconds"] - idle["seconds"]
    print(
        f"\n{args.images} images: full run {full['seconds']:.0f} s; rerun with nothing to do {idle['seconds']:.1f} s; "
        f"with {added} images added {grow['seconds']:.1f} s: {extra:.1f} s beyond the start-up, "
        f"{extra / full['seconds']:.1%} of the full run (target at most 2%)"
    )
    print("\n| stage | full run s | nothing to do s | 1% added s | shards run when 1% added |\n|---|---|---|---|---|")
    for name in full["stages"]:
        f, i, g = full["stages"][name], idle["stages"].get(name, {}), grow["stages"].get(name, {})
        print(f"| {name} | {f['seconds']} | {i.get('seconds')} | {g.get('seconds')} | {g.get('shards_done')} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
