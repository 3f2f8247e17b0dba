"""Stage ``ingest``: any input (folder, VOC root, COCO, manifest) -> ``RUN/manifest.parquet``
(:mod:`mlcseg_ray.library.listing`).

Ingest runs on every ``mlcseg run``: files whose size and modification time did not change keep their row without
being read again, so a rerun notices a changed image (the manifest, and so every fingerprint, changes) at the cost
of a ``stat`` per file. The manifest is written by ingest alone; what later stages find out about an image goes to
``status.parquet``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import pyarrow as pa

from ..core.errors import NoRunYet
from ..core.inputs import InputSpec
from ..core.run_dir import RunDir, printable
from ..core.stage import MapFn, Stage, StageContext
from ..core.tables import read_schema
from ..formats.manifest import (
    MANIFEST_SCHEMA,
    manifest_fingerprint,
)
from ..library.listing import ProbeSettings, build_manifest
from ..models.backbones import available_backbones, patch_size_of

log = logging.getLogger("mlcseg_ray")


def _readable_manifest(run: RunDir) -> str | None:
    """The previous manifest's path, or None where there is none, it is damaged or it lacks the file columns (it
    is rebuilt: every file is read)."""
    if not run.manifest.exists():
        return None
    try:
        names = read_schema(run.manifest).names
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("ingest: %s is damaged (%s); rebuilding it from the input", run.manifest, e)
        return None
    return str(run.manifest) if set(MANIFEST_SCHEMA.names) <= set(names) else None


class IngestStage(Stage):
    """The source of a run: lists and checks the input, every time (cheap for unchanged files)."""

    name = "ingest"
    reads = ("run_record",)  # the inputs a rerun without any was made with
    writes = ("manifest", "manifest_parts", "input_index")
    config_keys = ("shard_size", "max_pixels", "backbone", "verify_images")
    source = True

    def output_fingerprint(self, ctx: StageContext) -> str:
        return manifest_fingerprint(ctx.run.manifest) if ctx.run.manifest.exists() else "absent"

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        run, cfg = ctx.run, ctx.cfg
        spec = ctx.inputs.spec()
        recorded = run.read_record().get("inputs")
        if not ctx.inputs.given():
            if not recorded:
                raise NoRunYet(run.root)
            # a rerun from the run folder alone: the inputs it was made with (a folder made before paths were
            # recorded absolute: relative to this directory, as then)
            spec = InputSpec(**recorded).absolute()
        elif recorded and InputSpec(**recorded).absolute().describe() != spec.describe():
            raise ValueError(
                f"{run.root} already holds a run over {InputSpec(**recorded).describe()!r}; use a new "
                f"--out for {spec.describe()!r}"
            )
        if cfg.backbone not in available_backbones():
            raise ValueError(f"unknown backbone {cfg.backbone!r}; available: {', '.join(available_backbones())}")
        # images keep their shards while shard_size stays (a new shard_size cuts every image afresh)
        same_cut = run.read_record().get("stages", {}).get("ingest", {}).get("shard_size") == cfg.shard_size
        settings = ProbeSettings(
            max_pixels=cfg.max_pixels,
            min_side=patch_size_of(cfg.backbone),
            rehash=cfg.verify_images == "hash",
            previous=_readable_manifest(run),
            keep_shards=same_cut,
        )
        built = build_manifest(spec, run, cfg.shard_size, settings, map_fn)
        skipped = built["skipped"]
        if skipped["count"]:
            log.warning(
                "ingest: %d file(s) skipped, not images by their extension (%s); `mlcseg errors %s` lists them",
                skipped["count"],
                printable(", ".join(f"{k} {v}" for k, v in skipped["by_extension"].items())),  # names are input
                run.root,
            )
        for damaged in skipped.get("damaged", []):
            log.warning("ingest: could not read to its end: %s; the images before it are kept", printable(damaged))
        run.update_record(
            inputs=asdict(spec), input=spec.describe(), skipped_files=skipped, image_root=built["image_root"]
        )
        return {
            "images": built["images"],
            "errors": built["errors"],
            "shard_size": cfg.shard_size,
            "output": str(run.manifest),
            "fingerprint": built["fingerprint"],  # the manifest's, as output_fingerprint would hash it again
        }
