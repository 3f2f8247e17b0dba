"""``Pipeline``: the stages in order over one run folder, run by the one executor.

>>> from mlcseg_ray import Pipeline, Config
>>> Pipeline("runs/voc", Config(backbone="random-vit-s8"), images="photos/").run()

Adding a stage is one module under ``stages/`` (a :class:`~mlcseg_ray.core.stage.Stage`) plus one line in
:data:`STAGES`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .backends import make_backend
from .core.config import Config
from .core.errors import NoRunYet
from .core.executor import Executor
from .core.inputs import RunInputs
from .core.progress import console
from .core.run_dir import RunDir
from .core.stage import StageContext
from .core.storage import anchored, use_endpoint
from .models.backbones import untrained_warning
from .stages.cluster import ClusterStage
from .stages.describe import DescribeStage
from .stages.evaluate import EvaluateStage
from .stages.extract import ExtractStage
from .stages.ingest import IngestStage
from .stages.label import LabelStage
from .stages.refine import RefineStage
from .stages.report import ReportStage

STAGES = [
    IngestStage(),
    ExtractStage(),
    ClusterStage(),
    RefineStage(),
    DescribeStage(),
    LabelStage(),
    EvaluateStage(),
    ReportStage(),
]
# What a user asks for by one name: labelling is describing regions, then classing them.
ALIASES = {"label": ["describe", "label"]}


def expand(names: list[str]) -> list[str]:
    known = {s.name for s in STAGES} | set(ALIASES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
    return [m for n in names for m in ALIASES.get(n, [n])]


class Pipeline:
    """The whole pipeline over ``out``. The input (``images=``, ``voc=``, ``coco=`` + ``ann=``, ``manifest=``,
    ``limit=``, ``sample=``, ...) is given as :class:`~mlcseg_ray.core.inputs.RunInputs` fields; a VOC root
    carries its own ground truth. ``backend``: ``ray`` (embedded, or the cluster at ``address``) or ``local``
    (everything in this process, no Ray: tests, benchmarks, notebooks)."""

    def __init__(
        self,
        out: str | Path,
        config: Config | None = None,
        *,
        address: str | None = None,
        backend: str = "ray",
        **inputs: object,
    ) -> None:
        self.cfg = config or Config()
        use_endpoint(self.cfg.s3_endpoint_url)  # before the run folder (maybe in that store) is touched
        if self.cfg.fit:  # recorded absolute, as the inputs are: a rerun from anywhere applies the same fit
            self.cfg = self.cfg.model_copy(update={"fit": str(anchored(self.cfg.fit))})
        self.run_dir = RunDir(out)
        # an unknown field is a TypeError here, naming it; local paths recorded absolute (a rerun from anywhere)
        self.inputs = RunInputs(**inputs).absolute()
        if self.inputs.voc and not self.inputs.gt:
            self.inputs = replace(self.inputs, gt=self.inputs.voc, protocol=self.inputs.protocol or "voc21")
        self.executor = Executor(
            self.run_dir, self.cfg, STAGES, make_backend(backend, address, self.cfg.device), self.inputs
        )

    def run(self, stages: list[str] | None = None, print_summary: bool = True) -> list[dict]:
        """Run ``stages`` (default: every stage this run wants); returns the summary rows (printed on stderr
        unless ``print_summary`` is false)."""
        from .core.progress import summary_table

        ctx = StageContext(self.run_dir, self.cfg, self.inputs)
        names = expand(stages) if stages else [s.name for s in STAGES if s.wanted(ctx)]
        if not self.inputs.given() and (self.inputs.limit or self.inputs.sample):
            raise ValueError(
                "--limit and --sample choose among an input's images: give the input again with them "
                "(--images, --voc, --coco or --manifest)"
            )
        if "ingest" in names and self.inputs.given():
            self.inputs.check()  # before the run folder is made
        elif "ingest" in names and not self.run_dir.read_record().get("inputs"):
            raise NoRunYet(self.run_dir.root)
        summary = self.executor.run_stages(names, command=f"mlcseg {' '.join(stages or ['run'])}")
        if print_summary:
            summary_table(f"mlcseg: {self.run_dir.root}", summary, to=console)
        warning = untrained_warning(self.run_dir.read_record().get("backbone", {}))
        if warning:
            console.print(f"[bold red]{warning}[/]", soft_wrap=True)
        return summary
