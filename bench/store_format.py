"""The feature store's ``key`` column, both layouts side by side: ``fixed_size_list<float16, D>`` (schema 1, and
what DESIGN.md gives) and fixed-size binary (schema 2, what the store writes now). One shard of the 59 VOC photos'
geometry at ``max_side`` 512 (their patch grids, 384-d keys; random values, the real shape), written and read with
the store's own options, each step three times in this process (the first also pays for fresh memory).

    python bench/store_format.py [--n 59] [--repeat 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import VOC_IMAGES, machine

from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.feature_store import FEATURE_WRITE_OPTIONS, feature_table, key_matrix
from mlcseg_ray.library.extraction import prepare_images

INFO = {"patch_size": 8, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "embed_dim": 384}


def as_list_layout(table: pa.Table) -> pa.Table:
    k = key_matrix(table.column("key"), np.float16)
    keys = pa.FixedSizeListArray.from_arrays(pa.array(k.ravel(), pa.float16()), k.shape[1])
    return table.set_column(table.schema.get_field_index("key"), "key", keys)


def timed(repeat: int, fn, *args, **kwargs) -> str:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        out.append(time.perf_counter() - t0)
    return " / ".join(f"{x:.2f}" for x in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=59)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = [{"image_id": p.stem, "uri": str(p)} for p in sorted(VOC_IMAGES.glob("*.jpg"))[: args.n]]
    prepared, _ = prepare_images(rows, INFO, Config())
    rng = np.random.default_rng(0)
    per_image = []
    for image_id, g, _ in prepared:
        n = g.grid_h * g.grid_w
        per_image.append((image_id, rng.standard_normal((n, 384)).astype(np.float32), rng.random(n), g.grid_w))
    binary = feature_table(per_image, 384)
    layouts = {"fixed_size_list<float16>": as_list_layout(binary), "fixed-size binary": binary}
    print(f"# {machine()}; {len(per_image)} images, {binary.num_rows} patches, seconds per step, {args.repeat} runs")
    print("| layout | write | read | keys to float32 (n, D) | file MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in layouts.items():
            path = f"{tmp}/{name[:5]}.parquet"
            w = timed(args.repeat, pq.write_table, table, path, **FEATURE_WRITE_OPTIONS)
            r = timed(args.repeat, pq.read_table, path)
            c = timed(args.repeat, key_matrix, pq.read_table(path).column("key"))
            print(f"| {name} | {w} | {r} | {c} | {Path(path).stat().st_size / 2**20:.0f} |")


if __name__ == "__main__":
    main()
