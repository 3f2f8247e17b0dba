"""The stage contract (DESIGN §1): what every stage declares, and the plain functions the executor calls.

A stage says what it reads and writes in the run folder (``RunDir`` attribute names), which stages come before it,
which config keys its outputs depend on, and what one unit of its work needs (:class:`Resources`). Its work is
plain Python that knows nothing of Ray:

* sharded stages: ``shards`` lists the units of work; ``prepare`` does the global part once (a k-means fit) and
  returns what every shard needs; ``process_shard`` does one shard and returns its summary (images, per-image
  errors, flags); ``finish`` merges (a COCO file from fragments). ``setup`` builds a per-worker state (a model) for
  stages that run on an actor pool.
* whole stages (ingest, evaluate, report): ``run_whole``.

The executor (:mod:`mlcseg_ray.executor`) owns everything else: fingerprints, markers, resume, scheduling, progress,
timings, each image's status and the lock.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from .config import Config
from .store import RunDir


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage's work asks of the cluster.

    ``gpus``: ``none`` (CPU work), ``share`` (a fraction of a GPU per task where the run uses GPUs: GPUs / CPUs of
    the cluster, so a GPU node runs one task per CPU), ``one`` (a whole GPU per actor where the run uses GPUs).
    ``actor``: the work keeps a state between shards (a model), so it runs on an actor pool, not as tasks."""

    cpus: float = 1.0
    gpus: Literal["none", "share", "one"] = "none"
    actor: bool = False


@dataclass(frozen=True)
class InputSpec:
    """Where the images come from: exactly one of the four kinds."""

    images: Optional[str] = None
    voc: Optional[str] = None
    split: str = "val"
    coco: Optional[str] = None
    ann: Optional[str] = None
    manifest: Optional[str] = None
    limit: Optional[int] = None  # only the first N images, in image-id order
    sample: Optional[int] = None  # a random sample of N images ...
    sample_seed: int = 0  # ... drawn with this seed

    def describe(self) -> str:
        if self.images:
            what = f"folder {self.images}"
        elif self.voc:
            what = f"VOC {self.voc} ({self.split})"
        elif self.coco:
            what = f"COCO {self.coco} + {self.ann}"
        else:
            what = f"manifest {self.manifest}"
        if self.limit:
            what += f", first {self.limit}"
        if self.sample:
            what += f", sample of {self.sample} (seed {self.sample_seed})"
        return what

    def validate(self) -> None:
        given = [x for x in (self.images, self.voc, self.coco, self.manifest) if x]
        if len(given) != 1:
            raise ValueError("give exactly one input: --images DIR, --voc ROOT, --coco IMAGES --ann JSON, or "
                             "--manifest FILE")
        if self.coco and not self.ann:
            raise ValueError("--coco needs --ann INSTANCES_JSON")
        if self.limit and self.sample:
            raise ValueError("give --limit or --sample, not both")

    def check(self) -> None:
        """Valid, and the local paths it names exist: before a run folder is made for it."""
        self.validate()
        for flag, path in (("--images", self.images), ("--voc", self.voc), ("--coco", self.coco),
                           ("--ann", self.ann), ("--manifest", self.manifest)):
            if path and "://" not in path and not Path(path).exists():
                raise FileNotFoundError(f"{flag}: no such file or folder: {path}")


@dataclass(frozen=True)
class RunInputs(InputSpec):
    """What a run reads besides its config: the images (ingest) and the ground truth (evaluate)."""

    gt: Optional[str] = None
    protocol: Optional[str] = None

    def given(self) -> bool:
        return any((self.images, self.voc, self.coco, self.manifest))

    def spec(self) -> InputSpec:
        """Where the images come from, alone."""
        return InputSpec(**{f.name: getattr(self, f.name) for f in fields(InputSpec)})


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function may use; picklable, so it travels to Ray workers as it is."""

    run: RunDir
    cfg: Config
    inputs: RunInputs = field(default_factory=RunInputs)
    device: str = "cpu"  # the torch device of this run's models ("cuda" when the run uses GPUs)
    pending: tuple = ()  # the shards this invocation processes (the others were done before and are kept)


# ``map_fn(fn, items, *shared) -> [fn(item, *shared) for item in items]``, in order: how a stage's global part
# (k-means passes over the shards) fans out, on Ray or in-process.
MapFn = Callable[..., list]


class Stage:
    name: ClassVar[str]
    after: ClassVar[tuple[str, ...]] = ()  # upstream stages: their fingerprints are part of this one's
    reads: ClassVar[tuple[str, ...]] = ()  # RunDir attributes
    writes: ClassVar[tuple[str, ...]] = ()  # RunDir attributes; removed when the fingerprint changes
    config_keys: ClassVar[tuple[str, ...]] = ()  # the keys its outputs depend on
    resources: ClassVar[Resources] = Resources()
    version: ClassVar[int] = 1  # bumped when the stage's code changes its outputs
    source: ClassVar[bool] = False  # runs every time; its fingerprint is that of its output (ingest)
    always_run: ClassVar[bool] = False  # a view of the folder (the report): written on every run that includes it

    def resources_for(self, cfg: Config) -> Resources:
        return self.resources

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        """Inputs other than config keys and upstream stages (a weights file, a ground-truth folder)."""
        return {}

    def output_fingerprint(self, ctx: StageContext) -> str:
        """Source stages only: a hash of what they wrote."""
        raise NotImplementedError

    def preflight(self, ctx: StageContext) -> None:
        """Cheap checks (the weights can be found), run for every planned stage before anything is removed."""

    def wanted(self, ctx: StageContext) -> bool:
        """Whether a full run includes this stage (evaluate only with ground truth)."""
        return True

    # --- whole stages ---
    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        raise NotImplementedError

    # --- sharded stages ---
    def shards(self, ctx: StageContext) -> Optional[list[int]]:
        """The units of work, or None for a whole stage."""
        return None

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> Any:
        return None

    def setup(self, ctx: StageContext) -> Any:
        return None

    def process_shard(self, ctx: StageContext, shard: int, shared: Any, worker: Any = None) -> dict:
        raise NotImplementedError

    def finish(self, ctx: StageContext, results: dict[int, dict], map_fn: MapFn) -> dict:
        return {}


def for_each_image(stage: str, items, fn) -> tuple[dict, dict[str, str]]:
    """``{image_id: fn(item)}`` over ``(image_id, item)`` pairs, one image's exception becoming its error row
    (``"<stage>: <reason>"``) instead of a failed shard."""
    from .imageio import BadImage

    out, errors = {}, {}
    for image_id, item in items:
        try:
            out[image_id] = fn(item)
        except BadImage as e:
            errors[image_id] = f"{stage}: {e}"
        except Exception as e:  # one image's failure is an error row, never a failed job
            errors[image_id] = f"{stage}: {type(e).__name__}: {e}"
    return out, errors
