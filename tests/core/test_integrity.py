"""A run folder that notices damage: every output is recorded in its shard's marker (or its stage's record) with
its size and checksum; a rerun recomputes what is missing or truncated and nothing else; ``mlcseg verify`` checks a
whole folder and changes nothing."""

import json
import logging
from dataclasses import asdict

import pytest

from helpers import TINY_CONFIG, copy_voc_images, mlcseg
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.errors import StageOrderError
from mlcseg_ray.core.inputs import RunInputs
from mlcseg_ray.core.integrity import verify_run
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.pipeline import STAGES, Pipeline

ALL = [s.name for s in STAGES if s.name != "evaluate"]


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for d in ("binary", "masks", "features", "pseudo")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    } | {"coco": (root / "pseudo_labels.json").read_bytes()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    images = copy_voc_images(root / "images", 3)
    cfg = Config(**TINY_CONFIG, shard_size=1, region_descriptor="masked_mean")
    inputs = RunInputs(images=str(images))
    Pipeline(root / "run", cfg, backend="local", **asdict(inputs)).run(ALL, print_summary=False)
    return RunDir(root / "run"), cfg, inputs, _files(root / "run")


def _rerun(finished, caplog, names=ALL):
    run, cfg, inputs, _ = finished
    with caplog.at_level(logging.INFO, logger="mlcseg_ray"):
        Pipeline(run.root, cfg, backend="local", **asdict(inputs)).run(names, print_summary=False)
    return caplog.text


def test_markers_record_every_output(finished):
    run = finished[0]
    marker = json.loads(run.marker("label", 0).read_text())
    assert any(k.startswith("masks/") for k in marker["outputs"]) and any(
        k.startswith("coco_parts/") for k in marker["outputs"]
    )
    assert all(size > 0 for size, _ in marker["outputs"].values())
    assert "pseudo_labels.json" in json.loads(run.stage_record("label").read_text())["outputs"]
    assert verify_run(run) and not any(verify_run(run).values())


def test_a_deleted_mask_is_noticed_and_only_its_shard_redone(finished, caplog):
    run, *_, before = finished
    mask = sorted(run.masks.glob("*.png"))[1]
    others = {n: run.marker("label", n).stat().st_mtime_ns for n in (0, 2)}
    mask.unlink()
    assert any(mask.name in p for p in verify_run(run)["label"])
    text = _rerun(finished, caplog)
    assert f"label: 1 shard(s) damaged (masks/{mask.name} is missing); recomputing them" in text
    assert "refine: up to date, skipped" in text
    assert {n: run.marker("label", n).stat().st_mtime_ns for n in (0, 2)} == others  # the others untouched
    assert _files(run.root) == before


def test_a_truncated_feature_shard_is_refused_downstream_then_redone(finished, caplog):
    run, cfg, inputs, before = finished
    shard = run.feature_shard(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = verify_run(run)["extract"]
    assert problems and "features/shard-00001.parquet" in problems[0]
    with pytest.raises(StageOrderError, match="features/shard-00001.parquet") as err:
        Pipeline(run.root, cfg, backend="local", **asdict(inputs)).run(
            ["cluster"], print_summary=False
        )  # the next stage alone is refused, naming the damage
    assert "damaged" in str(err.value) and "mlcseg extract" in str(err.value)
    assert run.marker("cluster", 1).exists()  # and nothing was removed
    text = _rerun(finished, caplog)
    assert "extract: 1 shard(s) damaged (features/shard-00001.parquet is" in text
    assert _files(run.root) == before
    assert not any(verify_run(run).values())


def test_verify_command_reports_and_changes_nothing(finished):
    run = finished[0]
    ok = mlcseg("verify", run.root, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["damaged"] is False
    region = sorted(run.region_parts.glob("part-*.parquet"))[0]
    data = region.read_bytes()
    region.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped: the checksum sees it
    try:
        bad = mlcseg("verify", run.root)
        assert bad.returncode == 8 and "describe: 1 problem(s)" in bad.stdout and region.name in bad.stdout
        assert region.read_bytes() != data  # verify repairs nothing
    finally:
        region.write_bytes(data)
