import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC_SUBSET = SHARED_DATA / "voc2012_val_subset"
VOC_MASKS = SHARED_DATA / "voc2012_val_masks"
COCO_SUBSET = SHARED_DATA / "coco_val2014_subset"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"

# Ray would otherwise swap 127.0.0.1 for this machine's interface address; tests stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: the real-data tests need ../shared/data beside the checkout")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, on loopback only."""
    import ray

    from mlcseg_ray.raytools import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray


def copy_voc_images(dest: Path, n: int) -> Path:
    """The first ``n`` VOC photos copied into ``dest`` (a folder input of the tests' own)."""
    import shutil

    voc = need(VOC_SUBSET)
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted((voc / "JPEGImages").iterdir())[:n]:
        shutil.copy(p, dest / p.name)
    return dest
