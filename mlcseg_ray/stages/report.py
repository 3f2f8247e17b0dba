"""Stage ``report``: one self-contained ``report.html`` for people to look at (built by
:mod:`mlcseg_ray.library.report_page`), written again on every run that includes it."""

from __future__ import annotations

from ..core.fanout import MapFn
from ..core.stage import Stage, StageContext
from ..library.report_page import write_report


class ReportStage(Stage):
    """A view of the run folder, not a computation: written again on every run that includes it."""

    name = "report"
    after = ("label",)
    reads = (
        "status",
        "masks",
        "binary",
        "pseudo",
        "image_tables",
        "features",
        "regions",
        "metrics",
        "confusion",
        "ablation",
        "run_record",
    )
    writes = ("report",)
    config_keys = ("report_samples", "max_pixels", "num_classes", "combine", "crf", "fit")
    always_run = True

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        return {"output": str(write_report(ctx.run, ctx.cfg, map_fn))}
