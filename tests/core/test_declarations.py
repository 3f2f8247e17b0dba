"""Each stage's declared ``reads``, ``writes`` and ``config_keys`` are what it really does: every stage runs on its
own (in-process) with the run folder's accesses recorded, the files it changed listed, and the config keys it read
traced; an undeclared one fails the test."""

import contextvars
from dataclasses import asdict
from pathlib import Path

from helpers import VOC_SUBSET, need
from mlcseg_ray.core.config import SCHEDULING_KEYS, Config
from mlcseg_ray.core.inputs import RunInputs
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.pipeline import STAGES, Pipeline

CURRENT = contextvars.ContextVar("stage", default=None)
INSIDE = contextvars.ContextVar("inside_rundir", default=False)
TOUCHED: dict[str, set] = {}
KEYS: dict[str, set] = {}

# RunDir names -> the declared attribute they are a path of (per-shard and per-image paths, readers)
OWNER = {
    "feature_shard": "features",
    "image_table": "image_tables",
    "pseudo_part": "pseudo",
    "region_part": "region_parts",
    "labelled_part": "coco_parts",
    "coco_part": "coco_parts",
    "binary_mask": "binary",
    "class_mask": "masks",
    "manifest_rows": "manifest",
    "read_record": "run_record",
    "read_status": "status",
    "pseudo_shards": "pseudo",
    "level_fit": "levels",
    "level_dataset": "levels",
    "level_categories": "levels",
    "level_groups": "levels",
}
# run.json is the executor's; a stage adds its facts to it (update_record) without owning it
EXECUTOR_OWNED = {
    "update_record",
    "run_record",
    "config",
    "state",
    "marker",
    "stage_record",
    "lock",
    "lock_file",
    "remove",
    "write_status",
}
ATTRIBUTES = {name for name in dir(RunDir) if isinstance(getattr(RunDir, name), property)} - EXECUTOR_OWNED


class RecordingRunDir(RunDir):
    """A RunDir that notes which of its paths the running stage asks for (not the paths its own methods use)."""

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        stage = CURRENT.get()
        if stage and not INSIDE.get() and (name in ATTRIBUTES or name in OWNER):
            TOUCHED.setdefault(stage, set()).add(OWNER.get(name, name))
        if callable(value) and not name.startswith("__"):

            def inside(*args, _value=value, **kwargs):
                token = INSIDE.set(True)
                try:
                    return _value(*args, **kwargs)
                finally:
                    INSIDE.reset(token)

            return inside
        return value


def _trace_config(monkeypatch):
    real = Config.__getattribute__

    def traced(self, name):
        stage = CURRENT.get()
        if stage and name in Config.model_fields:
            KEYS.setdefault(stage, set()).add(name)
        return real(self, name)

    monkeypatch.setattr(Config, "__getattribute__", traced)


def _in_stage(stage, monkeypatch):
    """Every method the executor calls on ``stage`` runs with ``CURRENT`` set to its name."""
    for method in (
        "shards",
        "prepare",
        "setup",
        "process_shard",
        "finish",
        "run_whole",
        "preflight",
        "fingerprint_extra",
        "output_fingerprint",
        "wanted",
        "resources_for",
        "map_resources",
    ):
        fn = getattr(stage, method)

        def wrapped(*args, _fn=fn, **kwargs):
            token = CURRENT.set(stage.name)
            try:
                return _fn(*args, **kwargs)
            finally:
                CURRENT.reset(token)

        monkeypatch.setattr(stage, method, wrapped, raising=False)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _owner_of(run: RunDir, rel: str) -> str:
    """The RunDir attribute a changed file belongs to (the executor's own files: ``executor``)."""
    path = run.root / rel
    if rel.startswith("_state") or rel in ("run.json", "config.yaml", "status.parquet", ".lock"):
        return "executor"
    plain = RunDir(run.root)
    owners = [
        (len(getattr(plain, n).parts), n)
        for n in ATTRIBUTES
        if path == getattr(plain, n) or getattr(plain, n) in path.parents
    ]
    return min(owners)[1] if owners else f"undeclared path {rel}"  # the outermost: levels/, not levels/fit.json


def test_every_stage_declares_what_it_reads_writes_and_depends_on(tmp_path, monkeypatch):
    voc = need(VOC_SUBSET)
    for stage in STAGES:
        _in_stage(stage, monkeypatch)
    _trace_config(monkeypatch)
    cfg = Config(
        backbone="random-vit-tiny",
        max_side=96,
        num_classes=3,
        num_categories=2,
        min_region_area=16,
        shard_size=2,
        report_samples=2,
    )
    inputs = RunInputs(voc=str(voc), limit=4, gt=str(voc), protocol="voc21")
    run = RecordingRunDir(tmp_path / "run")
    import mlcseg_ray.pipeline as pipeline

    monkeypatch.setattr(pipeline, "RunDir", lambda root: run)
    problems = []
    for stage in STAGES:
        before = _snapshot(run.root) if run.root.exists() else {}
        Pipeline(run.root, cfg, backend="local", **asdict(inputs)).run([stage.name], print_summary=False)
        after = _snapshot(run.root)
        written = {_owner_of(run, rel) for rel, meta in after.items() if before.get(rel) != meta} - {"executor"}
        touched = TOUCHED.get(stage.name, set())
        declared_keys = set(stage.config_keys) | SCHEDULING_KEYS
        problems += [f"{stage.name} writes {w}, not in its writes {stage.writes}" for w in written - set(stage.writes)]
        problems += [
            f"{stage.name} reads {t}, not in its reads {stage.reads} or writes"
            for t in touched - set(stage.reads) - set(stage.writes)
        ]
        problems += [
            f"{stage.name} reads config key {k}, not in its config_keys"
            for k in KEYS.get(stage.name, set()) - declared_keys
        ]
        assert written or stage.name == "ingest" or touched, f"{stage.name}: nothing recorded (is the recorder on?)"
    assert not problems, "\n".join(problems)


def test_the_recorder_sees_an_undeclared_read(tmp_path):
    """The recorder above can fail: a read through a RunDir path outside a stage's declarations is noted."""
    run = RecordingRunDir(tmp_path)
    token = CURRENT.set("probe")
    try:
        run.feature_shard(3)
        run.update_record(x=1)  # executor-owned: not a stage's read
    finally:
        CURRENT.reset(token)
    assert TOUCHED.pop("probe") == {"features"}
