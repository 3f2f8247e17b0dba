"""Issue 45: the simulated accelerator (a measuring tool) and the threads that keep a model fed. How fast the
pipeline feeds it is measured in bench/accelerator_feed.py, not here."""

import html
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import TINY_CONFIG, copy_voc_images
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.prefetch import ahead_of_use
from mlcseg_ray.models.backbones import feature_extractor, locate_weights, untrained_warning
from mlcseg_ray.models.simulated import SIMULATED_WARNING, SimulatedAccelerator
from mlcseg_ray.pipeline import Pipeline


def test_the_simulated_forward_has_a_vit_s8s_shapes_and_takes_its_time_without_a_cpu():
    sim = SimulatedAccelerator(forward_ms=50)
    x = torch.randn(4, 3, 64, 96)
    wall, cpu = time.perf_counter(), time.process_time()
    out = sim(x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out["keys"].shape == (4, 8 * 12, 384) and out["cls_attn"].shape == (4, 96) and out["cls"].shape == (4, 384)
    assert torch.allclose(out["cls_attn"].sum(-1), torch.ones(4))
    assert wall >= 0.2 and cpu < wall / 2  # 50 ms an image of waiting, not of computing
    again = SimulatedAccelerator(forward_ms=1)(x)  # the values do not depend on the time it takes
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(sim(x + 1)["keys"], out["keys"])  # they do depend on the pixels


def test_the_simulated_accelerator_is_never_mistaken_for_a_model():
    extractor, info = feature_extractor(Config(backbone="sim-accelerator", sim_forward_ms=1), "cpu")
    assert info["random_weights"] and untrained_warning(info) == SIMULATED_WARNING
    assert extractor(torch.zeros(1, 3, 16, 16))["keys"].shape == (1, 4, 384) and extractor.seconds > 0
    assert locate_weights("sim-accelerator") is None
    with pytest.raises(ValueError, match="takes no --weights"):
        locate_weights("sim-accelerator", "/tmp/some.pth")
    assert Config().backbone == "vit_small_patch8_224.dino"  # a measuring tool, never the default


def test_work_ahead_of_use_comes_in_order_bounded_and_raises_where_it_is_used():
    running, most = [0], [0]
    lock = threading.Lock()

    def slow_square(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (i % 3))  # finishing out of order
        with lock:
            running[0] -= 1
        if i == 7:
            raise ValueError("seven")
        return i * i

    started = []
    items = iter(range(10))

    def source():
        for i in items:
            started.append(i)
            yield i

    got = []
    with pytest.raises(ValueError, match="seven"):
        for i, sq in ahead_of_use(slow_square, source(), threads=2, ahead=3):
            assert len(started) <= i + 1 + 3  # never more than `ahead` items beyond the one in use
            got.append((i, sq))
    assert got == [(i, i * i) for i in range(7)] and most[0] <= 2
    assert list(ahead_of_use(lambda i: -i, range(4), threads=0, ahead=3)) == [(0, 0), (1, -1), (2, -2), (3, -3)]


def test_a_sim_accelerator_run_says_so_and_times_the_model(tmp_path, capfd):
    images = copy_voc_images(tmp_path / "images", 3)
    cfg = Config(**{**TINY_CONFIG, "backbone": "sim-accelerator", "sim_forward_ms": 1, "max_side": 64})
    Pipeline(tmp_path / "run", cfg, images=str(images), backend="local").run()
    assert SIMULATED_WARNING in capfd.readouterr().err
    assert html.escape(SIMULATED_WARNING) in (tmp_path / "run" / "report.html").read_text()
    backbone = json.loads((tmp_path / "run" / "run.json").read_text())["backbone"]
    assert backbone["backbone"] == "sim-accelerator" and backbone["patch_size"] == 8 and backbone["embed_dim"] == 384
    keys = pq.read_table(next((tmp_path / "run" / "features").glob("*.parquet")))
    assert keys.num_rows > 0
    for stage in ("extract", "describe"):
        markers = [json.loads(p.read_text()) for p in (tmp_path / "run" / "_state" / stage).glob("0*")]
        assert markers and all(0 < m["forward_seconds"] <= m["seconds"] for m in markers), (stage, markers)
    assert np.isfinite([m["seconds"] for m in markers]).all()
