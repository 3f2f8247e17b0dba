"""Ray wrapper of stage ``extract``: an actor pool (one model per actor) over shards of image paths.

Ray Data carries only shard specs (image ids and URIs, never pixels); each actor decodes its shard's images, runs
:func:`features.extract_shard`, writes ``features/`` and ``images/`` shards atomically and then the shard's marker.
Shards with a marker are skipped, so rerunning the same command resumes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .config import Config
from .store import RunDir, atomic_write_table, list_shards, shard_name

STAGE = "extract"


class ExtractWorker:
    """One backbone per actor; called by Ray Data with a batch of shard specs."""

    def __init__(self, run_root: str, cfg: dict, threads: int, device: str):
        import torch

        from .backbones import FeatureExtractor, build_backbone

        self.cfg = Config(**cfg)
        self.run = RunDir(run_root)
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        model, info = build_backbone(self.cfg.backbone, self.cfg.weights)
        self.device = device
        self.extractor = FeatureExtractor(model.to(device))
        self.info = info.to_dict()

    def __call__(self, batch: dict) -> dict:
        from .features import FEATURE_WRITE_OPTIONS, extract_shard, store_metadata

        out = {"shard": [], "ok": [], "errors": [], "seconds": []}
        for shard, rows_json in zip(batch["shard"], batch["rows"]):
            t0 = time.perf_counter()
            shard = int(shard)
            rows = json.loads(rows_json)
            feats, images = extract_shard(self.extractor, self.info, rows, self.cfg, self.device)
            meta = store_metadata(self.info, self.cfg)
            # Order matters for resume: both files in place before the marker says the shard is done.
            atomic_write_table(self.run.features / shard_name(shard), feats.replace_schema_metadata(meta),
                               **FEATURE_WRITE_OPTIONS)
            atomic_write_table(self.run.images / shard_name(shard), images.replace_schema_metadata(meta))
            n_err = sum(1 for s in images.column("status").to_pylist() if s != "ok")
            seconds = round(time.perf_counter() - t0, 4)
            self.run.mark_done(STAGE, shard, {"images": images.num_rows, "errors": n_err, "seconds": seconds})
            out["shard"].append(shard)
            out["ok"].append(images.num_rows - n_err)
            out["errors"].append(n_err)
            out["seconds"].append(seconds)
        return {k: np.asarray(v) for k, v in out.items()}


def pending_shards(run: RunDir, manifest_rows: list[dict]) -> dict[int, list[dict]]:
    done = run.done_shards(STAGE)
    shards: dict[int, list[dict]] = {}
    for r in manifest_rows:
        if r["shard"] not in done:
            shards.setdefault(r["shard"], []).append(
                {k: r[k] for k in ("image_id", "uri", "status", "error")}
            )
    return shards


def remove_stale_temp_files(*folders: Path) -> None:
    """Temp files of a run that was killed mid-write; never read, removed so they do not pile up."""
    for folder in folders:
        if Path(folder).is_dir():
            for p in Path(folder).glob(".tmp-*"):
                p.unlink(missing_ok=True)


def run_extract(run: RunDir, cfg: Config, manifest_rows: list[dict], advance=lambda n=1: None) -> dict:
    """Extract every pending shard on the current Ray cluster. Returns counts for the summary."""
    import ray
    from ray.data import ActorPoolStrategy

    from .raytools import cluster_cpus, cluster_gpus, use_gpus

    remove_stale_temp_files(run.features, run.images)
    shards = pending_shards(run, manifest_rows)
    skipped = len({r["shard"] for r in manifest_rows}) - len(shards)
    result = {"shards_done": 0, "shards_skipped": skipped, "ok": 0, "errors": 0}
    if not shards:
        return result
    use_gpu = use_gpus(cfg.device)
    n_actors = cfg.num_workers or (int(cluster_gpus()) if use_gpu else 1)
    n_actors = max(1, min(n_actors, len(shards)))
    threads = max(1, cluster_cpus() // n_actors)
    specs = [{"shard": s, "rows": json.dumps(rows)} for s, rows in sorted(shards.items())]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds = ds.map_batches(
        ExtractWorker,
        fn_constructor_kwargs=dict(
            run_root=str(run.root), cfg=cfg.model_dump(), threads=threads, device="cuda" if use_gpu else "cpu"
        ),
        batch_size=1,  # one shard per call: a shard is the unit of resume
        compute=ActorPoolStrategy(size=n_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else 0.5,
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        n = int(batch["ok"][0] + batch["errors"][0])
        result["shards_done"] += 1
        result["ok"] += int(batch["ok"][0])
        result["errors"] += int(batch["errors"][0])
        advance(n)
    return result


def extraction_errors(run: RunDir) -> dict[str, str]:
    errors = {}
    for path in list_shards(run.images):
        t = pq.read_table(path, columns=["image_id", "status", "error"])
        for i, s, e in zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error"))):
            if s != "ok":
                errors[i] = e
    return errors
