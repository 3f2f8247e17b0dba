"""``Pipeline``: the stages in order over one run folder, run by the one executor.

>>> from mlcseg_ray import Pipeline, Config
>>> Pipeline("runs/voc", Config(backbone="random-vit-s8"), images="photos/").run()

Adding a stage is one module (a :class:`~mlcseg_ray.stage.Stage`) plus one line in :data:`STAGES`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .cluster import ClusterStage
from .config import Config
from .evaluate import EvaluateStage
from .executor import Executor
from .extract import ExtractStage
from .ingest import IngestStage
from .label import DescribeStage, LabelStage
from .refine import RefineStage
from .report import ReportStage
from .stage import RunInputs, StageContext
from .store import RunDir


STAGES = [IngestStage(), ExtractStage(), ClusterStage(), RefineStage(), DescribeStage(), LabelStage(),
          EvaluateStage(), ReportStage()]
# What a user asks for by one name: labelling is describing regions, then classing them.
ALIASES = {"label": ["describe", "label"]}


def expand(names: list[str]) -> list[str]:
    known = {s.name for s in STAGES} | set(ALIASES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
    return [m for n in names for m in ALIASES.get(n, [n])]


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
        limit: Optional[int] = None,
        sample: Optional[int] = None,
        sample_seed: int = 0,
        address: Optional[str] = None,
        gt: Optional[str] = None,
        protocol: Optional[str] = None,
        backend: str = "ray",
    ):
        self.run_dir = RunDir(out)
        self.cfg = config or Config()
        if voc and not gt:  # a VOC root carries its own ground truth
            gt, protocol = voc, protocol or "voc21"
        self.inputs = RunInputs(images=images, voc=voc, split=split, coco=coco, ann=ann, manifest=manifest,
                                limit=limit, sample=sample, sample_seed=sample_seed, gt=gt, protocol=protocol)
        self.executor = Executor(self.run_dir, self.cfg, STAGES, self.inputs, backend=backend, address=address,
                                 say=_say)

    def run(self, stages: list[str] | None = None, print_summary: bool = True) -> list[dict]:
        """Run ``stages`` (default: every stage this run wants); returns the summary rows (printed on stderr
        unless ``print_summary`` is false)."""
        ctx = StageContext(self.run_dir, self.cfg, self.inputs)
        names = expand(stages) if stages else [s.name for s in STAGES if s.wanted(ctx)]
        if "ingest" in names and self.inputs.given():
            self.inputs.check()  # before the run folder is made
        elif "ingest" in names and not self.run_dir.read_record().get("inputs"):
            raise ValueError(f"{self.run_dir.root} holds no run yet: give the images with --images, --voc, --coco or "
                             f"--manifest")
        summary = self.executor.run_stages(names, command=f"mlcseg {' '.join(stages or ['run'])}")
        from .progress import console, summary_table

        if print_summary:
            summary_table(f"mlcseg: {self.run_dir.root}", summary, to=console)
        if self.run_dir.read_record().get("backbone", {}).get("random_weights"):
            from .backbones import RANDOM_WEIGHTS_WARNING

            console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]", soft_wrap=True)
        return summary

    def failed_images(self) -> int:
        return sum(1 for r in self.run_dir.read_status() if r["status"] != "ok")


def _say(message: str) -> None:
    from .progress import console

    console.print(f"[dim]{message}[/]")


def run_stages(out: str | Path, cfg: Config, names: list[str], backend: str = "local",
               inputs: RunInputs = RunInputs(), address: Optional[str] = None) -> list[dict]:
    """Run some stages on a run folder without the CLI's summary: for tests, benchmarks and notebooks.
    ``backend="local"`` runs everything in this process (no Ray)."""
    return Executor(RunDir(out), cfg, STAGES, inputs, backend=backend, address=address).run_stages(expand(names))
