"""Stage ``evaluate``: the run's masks scored against ground truth (:mod:`mlcseg_ray.library.evaluation`), on a
run given ``--voc`` or evaluated before."""

from __future__ import annotations

from pathlib import Path

from ..core.stage import MapFn, Stage, StageContext
from ..library.evaluation import evaluate_folder


class EvaluateStage(Stage):
    """Metrics of a run's masks against ground truth: the one given to this run, else the one the folder was last
    evaluated with (so a later `mlcseg label` re-evaluates, and a `mlcseg report` does not drop the metrics)."""

    name = "evaluate"
    after = ("label",)
    reads = ("masks", "binary", "manifest", "image_tables")
    writes = ("metrics", "confusion")

    @staticmethod
    def ground_truth(ctx: StageContext) -> dict | None:
        if ctx.inputs.gt:
            return {"gt": ctx.inputs.gt, "protocol": ctx.inputs.protocol or "voc21", "split": ctx.inputs.split}
        return ctx.run.read_record().get("evaluation")

    def wanted(self, ctx: StageContext) -> bool:
        return self.ground_truth(ctx) is not None

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        return {"ground_truth": self.ground_truth(ctx)}

    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        gt = self.ground_truth(ctx)
        if gt is None:
            raise ValueError("evaluate needs ground truth: --voc ROOT, or `mlcseg eval RUN GT`")
        metrics = evaluate_folder(
            ctx.run.root,
            Path(gt["gt"]),
            gt["protocol"],
            split=gt["split"],
            ignore=gt.get("ignore"),  # as `mlcseg eval` recorded them
            matching=gt.get("matching", "hungarian"),
            out=ctx.run.root,
            map_fn=map_fn,
        )
        ctx.run.update_record(evaluation=gt)
        return {
            "images": metrics["n_images"],
            "errors": len(metrics["missing_predictions"]),
            "miou": metrics["miou"],
            "output": str(ctx.run.metrics),
        }
