"""Issue 45: the simulated accelerator (a measuring tool) and the threads that keep a model fed. How fast the
pipeline feeds it is measured in bench/accelerator_feed.py, not here."""

import contextlib
import html
import itertools
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
from mlcseg_ray.models.backbones import ForwardClock, feature_extractor, locate_weights, untrained_warning
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


def test_an_actors_model_runs_one_forward_at_a_time_and_times_each_shards_own():
    """Two shards at once on one actor share its model: never two forwards at the same moment, each thread's
    seconds its own forwards', and a shard holding its turn keeps the other's forwards out until it lets go."""
    spans, lock = [], threading.Lock()

    class Slow:
        def __call__(self, x):
            started = time.perf_counter()
            time.sleep(0.02)
            with lock:
                spans.append((started, time.perf_counter(), threading.current_thread().name))
            return {}

    clock = ForwardClock(Slow())
    seconds = {}

    def shard(name: str, forwards: int, hold: bool) -> None:
        with clock.turn() if hold else contextlib.nullcontext():
            for _ in range(forwards):
                clock(torch.zeros(1))
        seconds[name] = clock.seconds

    first = threading.Thread(target=shard, args=("held", 5, True), name="held")
    second = threading.Thread(target=shard, args=("free", 3, False), name="free")
    first.start()
    time.sleep(0.005)  # the first has its turn
    second.start()
    first.join(), second.join()
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one at a time
    assert [name for _, _, name in spans] == ["held"] * 5 + ["free"] * 3  # the held turn kept the other out
    own = {name: sum(e - s for s, e, n in spans if n == name) for name in ("held", "free")}
    assert seconds == pytest.approx(own, abs=0.01) and clock.seconds == 0.0  # this thread made none


def test_extraction_works_on_two_shards_at_once_on_ray_with_the_same_bytes(ray_local, tmp_path):
    """With images decoded ahead (the default), a Ray actor extracts two shards at once: their times overlap, the
    model's forwards still add up to no more than the time the actor worked, and the bytes are a serial run's."""
    images = copy_voc_images(tmp_path / "images", 8)
    base = {**TINY_CONFIG, "backbone": "sim-accelerator", "sim_forward_ms": 40, "max_side": 64, "shard_size": 2}
    at_once, serial = tmp_path / "at_once", tmp_path / "serial"
    Pipeline(at_once, Config(**base, decode_threads=2), images=str(images)).run(["ingest", "extract"])
    Pipeline(serial, Config(**base, decode_threads=0), images=str(images), backend="local").run(["ingest", "extract"])
    for folder in ("features", "images"):
        got = {p.name: p.read_bytes() for p in (at_once / folder).glob("*.parquet")}
        assert got == {p.name: p.read_bytes() for p in (serial / folder).glob("*.parquet")} and len(got) == 4
    spans = []
    for p in (at_once / "_state" / "extract").glob("0*"):
        m = json.loads(p.read_text())
        spans.append((p.stat().st_mtime - m["seconds"], p.stat().st_mtime, m["forward_seconds"]))
    spans.sort()
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))  # a shard began before the one before it ended
    worked = spans[-1][1] - spans[0][0]
    assert sum(f for _, _, f in spans) <= worked  # one forward at a time: the model was never doubled
