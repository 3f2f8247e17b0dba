"""Peak memory of an extraction worker on one image, by the image's size: a 2000 x 2000 photo, a 12000 x 12000 PNG
(8-bit and 16-bit) at the same ``max_side`` (issue 38: the memory follows ``max_side``, not the file).

Each image runs in a fresh process doing what an extraction actor does for it: the backbone built (random-vit-s8),
then ``extract_shard`` on a one-image shard (decode, preprocessing, forward, feature table). The process's peak
resident memory (``ru_maxrss``) is read after, and so is its baseline (the model built, no image yet).

    python bench/decode_memory.py [--max-side 512]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def one(path: str, max_side: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from mlcseg_ray.core.config import Config
    from mlcseg_ray.library.extraction import extract_shard
    from mlcseg_ray.models.backbones import FeatureExtractor, build_backbone

    cfg = Config(backbone="random-vit-s8", max_side=max_side)
    model, info = build_backbone(cfg.backbone)
    extractor = FeatureExtractor(model)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"image_id": "x", "uri": path, "status": "ok", "bytes": None, "mtime_ns": None, "content_hash": None}
    feats, images = extract_shard(extractor, info.to_dict(), [row], cfg)
    assert images.column("status").to_pylist() == ["ok"], images.column("error").to_pylist()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"baseline_mb": round(base), "peak_mb": round(peak), "image_mb": round(peak - base)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.max_side)))
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        files["2000x2000 RGB PNG"] = f"{tmp}/mid.png"
        Image.fromarray(rng.integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(files["2000x2000 RGB PNG"])
        big = np.zeros((12000, 12000, 3), np.uint8)
        big[::50], big[:, ::70, 1] = 200, 120  # stripes: a small file (~0.5 MB) of many pixels
        files["12000x12000 RGB PNG"] = f"{tmp}/big.png"
        Image.fromarray(big).save(files["12000x12000 RGB PNG"])
        del big
        big16 = (np.arange(12000 * 12000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(12000, 12000)
        files["12000x12000 16-bit grey PNG"] = f"{tmp}/big16.png"
        Image.fromarray(big16).save(files["12000x12000 16-bit grey PNG"])
        del big16
        results = {}
        for name, path in files.items():
            cmd = [sys.executable, __file__, "--one", path, "--max-side", str(args.max_side)]
            results[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    ref = results["2000x2000 RGB PNG"]["peak_mb"]
    print(f"max_side {args.max_side}; peak RSS of one extraction process (random-vit-s8), MB")
    print(f"{'image':<30} {'baseline':>9} {'peak':>7} {'for image':>10} {'peak / 2000x2000':>17}")
    for name, r in results.items():
        print(f"{name:<30} {r['baseline_mb']:>9} {r['peak_mb']:>7} {r['image_mb']:>10} {r['peak_mb'] / ref:>17.2f}")


if __name__ == "__main__":
    main()
