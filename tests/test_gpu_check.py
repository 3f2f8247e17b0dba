"""bench/gpu_check.py on a machine without a GPU: the CPU fallback runs end to end and says so."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_falls_back_to_cpu():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--n",
            "6",
            "--cpu-n",
            "4",
            "--backbone",
            "random-vit-tiny",
            "--max-side",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    import torch

    if not torch.cuda.is_available():
        assert "CPU path only" in res.stdout and "CPU extraction:" in res.stdout
    assert re.search(r"clustering: [0-9.]+s on CPUs, [0-9.]+s with device=auto", res.stdout), res.stdout[-2000:]
    assert re.search(r"refinement \(torch refiner, crf_max_side 384\): [0-9.]+ images/s", res.stdout), res.stdout[
        -2000:
    ]
