"""``Pipeline``: the stages in order over one run folder, each resumable, with timings in ``run.json``.

>>> from mlcseg_ray import Pipeline, Config
>>> Pipeline("runs/voc", Config(backbone="random-vit-s8"), images="photos/").run()
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from .config import Config
from .ingest import InputSpec, build_manifest, read_manifest, record_errors, write_manifest
from .progress import console, progress_bar, summary_table
from .store import RunDir

log = logging.getLogger("mlcseg_ray")

STAGES = ["ingest", "extract", "cluster", "refine", "label", "report"]


class Pipeline:
    def __init__(
        self,
        out: str | Path,
        config: Optional[Config] = None,
        *,
        images: Optional[str] = None,
        voc: Optional[str] = None,
        split: str = "val",
        coco: Optional[str] = None,
        ann: Optional[str] = None,
        manifest: Optional[str] = None,
        address: Optional[str] = None,
        gt: Optional[str] = None,
        protocol: Optional[str] = None,
    ):
        self.run_dir = RunDir(out)
        self.cfg = config or Config()
        self.inputs = InputSpec(images=images, voc=voc, split=split, coco=coco, ann=ann, manifest=manifest)
        self.address = address
        self.gt, self.protocol = gt, protocol
        if voc and not gt:  # a VOC root carries its own ground truth
            self.gt, self.protocol = voc, protocol or "voc21"
        self.summary: list[tuple] = []

    # ------------------------------------------------------------------ helpers
    def _ray(self) -> None:
        from .raytools import init_ray

        init_ray(self.address)

    def _timed(self, stage: str, fn, images: int | None = None):
        t0 = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - t0
        n = result.get("images", images)
        errors = result.get("errors", 0)
        self.run_dir.update_record(stages={stage: {"seconds": round(seconds, 3), **result}})
        rate = f"{n / seconds:.2f}" if n and seconds > 0 else "-"
        self.summary.append((stage, n if n is not None else "-", errors, f"{seconds:.1f}", rate, result.get("output", "")))
        return result

    def _manifest_rows(self) -> list[dict]:
        return read_manifest(self.run_dir.manifest).to_pylist()

    # ------------------------------------------------------------------ stages
    def ingest(self) -> dict:
        run = self.run_dir
        run.root.mkdir(parents=True, exist_ok=True)
        self.cfg.save(run.config)
        if run.manifest.exists() and not any(
            (self.inputs.images, self.inputs.voc, self.inputs.coco, self.inputs.manifest)
        ):
            table = read_manifest(run.manifest)  # resuming from the run folder alone
        elif run.manifest.exists():
            table = read_manifest(run.manifest)
            if run.read_record().get("input") != self.inputs.describe():
                raise ValueError(
                    f"{run.root} already holds a run over {run.read_record().get('input')!r}; "
                    f"use a new --out for {self.inputs.describe()!r}"
                )
        else:
            from .backbones import available_backbones, patch_size_of

            if self.cfg.backbone not in available_backbones():
                raise ValueError(f"unknown backbone {self.cfg.backbone!r}; available: {', '.join(available_backbones())}")
            patch = patch_size_of(self.cfg.backbone)
            table = build_manifest(self.inputs, self.cfg.shard_size, self.cfg.max_pixels, min_side=patch)
            write_manifest(run.manifest, table)
            run.update_record(input=self.inputs.describe())
        status = table.column("status").to_pylist()
        errors = sum(1 for s in status if s != "ok")
        return {"images": len(status), "errors": errors, "output": str(run.manifest)}

    def extract(self) -> dict:
        from .extract import extraction_errors, run_extract

        self._ray()
        rows = self._manifest_rows()
        with progress_bar("extract", total=len(rows), unit="images") as advance:
            res = run_extract(self.run_dir, self.cfg, rows, advance)
        errors = extraction_errors(self.run_dir)
        record_errors(self.run_dir.manifest, errors)
        self._record_backbone()
        return {"images": len(rows), "errors": len(errors), "output": str(self.run_dir.features), **res}

    def _record_backbone(self) -> None:
        from .features import read_store_metadata
        from .store import list_shards

        shards = list_shards(self.run_dir.features)
        if shards:
            meta = read_store_metadata(shards[0])
            self.run_dir.update_record(backbone=meta)
            if meta.get("random_weights"):
                from .backbones import RANDOM_WEIGHTS_WARNING

                console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]")

    def cluster(self) -> dict:
        from .cluster import run_cluster

        self._ray()
        return run_cluster(self.run_dir, self.cfg)

    def refine(self) -> dict:
        from .refine import run_refine

        self._ray()
        return run_refine(self.run_dir, self.cfg)

    def label(self) -> dict:
        from .label import run_label

        self._ray()
        return run_label(self.run_dir, self.cfg)

    def evaluate(self) -> dict:
        from .evaluate import evaluate_run

        return evaluate_run(self.run_dir, self.gt, self.protocol)

    def report(self) -> dict:
        from .report import write_report

        path = write_report(self.run_dir, self.cfg)
        return {"output": str(path)}

    # ------------------------------------------------------------------ all
    def run(self, stages: list[str] | None = None) -> list[tuple]:
        stages = stages or STAGES
        for stage in STAGES:
            if stage not in stages:
                continue
            if stage == "report" and self.gt:
                self._timed("evaluate", self.evaluate)
            self._timed(stage, getattr(self, stage))
        summary_table(f"mlcseg run: {self.run_dir.root}", self.summary)
        if self.run_dir.read_record().get("backbone", {}).get("random_weights"):
            from .backbones import RANDOM_WEIGHTS_WARNING

            console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]")
        return self.summary

    def failed_images(self) -> int:
        if not self.run_dir.manifest.exists():  # a brought-in feature store has no manifest
            return 0
        status = read_manifest(self.run_dir.manifest).column("status").to_pylist()
        return sum(1 for s in status if s != "ok")
