"""What the tests and benches share: where the real data lives, and small helpers around it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOC_SUBSET = SHARED_DATA / "voc2012_val_subset"
VOC_MASKS = SHARED_DATA / "voc2012_val_masks"
COCO_SUBSET = SHARED_DATA / "coco_val2014_subset"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: the real-data tests need ../shared/data beside the checkout")
    return path


def copy_voc_images(dest: Path, n: int) -> Path:
    """The first ``n`` VOC photos copied into ``dest`` (a folder input of the tests' own)."""
    voc = need(VOC_SUBSET)
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted((voc / "JPEGImages").iterdir())[:n]:
        shutil.copy(p, dest / p.name)
    return dest


# The command line as a user runs it, and the smallest config that still runs every stage (random weights).
MLCSEG = [sys.executable, "-m", "mlcseg_ray.cli"]
TINY_CONFIG = dict(
    backbone="random-vit-tiny", max_side=96, num_classes=3, num_categories=3, min_region_area=16, crop_size=32
)
TINY = [f"{k}={v}" for k, v in TINY_CONFIG.items()]  # the same, as key=value overrides


def mlcseg(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``mlcseg ARGS...`` in a subprocess, as a user runs it; output captured as text."""
    return subprocess.run(
        MLCSEG + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
