"""The stage contract: what every stage declares, and the plain functions the executor calls.

A stage says what it reads and writes in the run folder (``RunDir`` attribute names), which stages come before it,
which config keys its outputs depend on, and what one unit of its work needs (:class:`Resources`). Its work is
plain Python that knows nothing of Ray:

* sharded stages: ``shards`` lists the units of work; ``prepare`` does the global part once (a k-means fit) and
  returns what every shard needs; ``process_shard`` does one shard and returns its summary (images, per-image
  errors, flags); ``finish`` merges (a COCO file from fragments). ``setup`` builds a per-worker state (a model) for
  stages that run on an actor pool.
* whole stages (ingest, evaluate, report): ``run_whole``.

The executor (:mod:`mlcseg_ray.core.executor`) owns everything else: fingerprints, markers, resume, scheduling,
progress, timings, each image's status and the lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .config import Config
from .errors import BadImage
from .fanout import MapFn
from .fingerprint import digest
from .inputs import RunInputs
from .run_dir import RunDir

# what a shard's images are, as the manifest lists them: an image added, changed or removed changes its digest
SHARD_IDENTITY = ("image_id", "uri", "bytes", "mtime_ns", "content_hash", "status", "error")


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage's work asks of the cluster.

    ``gpus``: ``none`` (CPU work), ``share`` (a fraction of a GPU per task where the run uses GPUs: GPUs / CPUs of
    the cluster, so a GPU node runs one task per CPU), ``one`` (a whole GPU per actor where the run uses GPUs).
    ``actor``: the work keeps a state between shards (a model), so it runs on an actor pool, not as tasks.
    ``shards_at_once``: how many shards an actor works on at a time (its model runs one forward at a time: what
    overlaps is one shard's decoding and writing with the other's forwards)."""

    cpus: float = 1.0
    gpus: Literal["none", "share", "one"] = "none"
    actor: bool = False
    shards_at_once: int = 1


def model_actor(cfg: Config) -> Resources:
    """An actor with a model (extraction, region crops): a whole GPU where the run has them, and two shards at a time
    when images are decoded ahead of the model (``decode_threads``): the next shard's first batches are ready and
    its forwards run while the last one's tables are built and written. ``decode_threads=0`` is the serial
    baseline, one shard after the other."""
    return Resources(cpus=0.5, gpus="one", actor=True, shards_at_once=2 if cfg.decode_threads else 1)


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function may use; picklable, so it travels to Ray workers as it is."""

    run: RunDir
    cfg: Config
    inputs: RunInputs = field(default_factory=RunInputs)
    device: str = "cpu"  # the torch device of this run's models ("cuda" when the run uses GPUs)
    pending: tuple = ()  # the shards this invocation processes (the others were done before and are kept)
    ticks: Any = None  # where a worker counts the images it finished (the driver's progress bar reads them)

    def tick(self, n: int = 1) -> None:
        """``n`` more images of a shard done: what the progress bar counts within shards."""
        if self.ticks is not None and n:
            self.ticks.add(n)


class Stage:
    name: ClassVar[str]
    after: ClassVar[tuple[str, ...]] = ()  # upstream stages: their fingerprints are part of this one's
    # RunDir attributes it reads / writes (writes are removed when the fingerprint changes), and the config keys
    # its outputs depend on: checked against what a run really touches (tests/core/test_declarations.py)
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    config_keys: ClassVar[tuple[str, ...]] = ()
    resources: ClassVar[Resources] = Resources()
    version: ClassVar[int] = 1  # bumped when the stage's code changes its outputs
    source: ClassVar[bool] = False  # runs every time; its fingerprint is that of its output (ingest)
    always_run: ClassVar[bool] = False  # a view of the folder (the report): written on every run that includes it
    # each shard checks its own inputs (shard_inputs): a changed source redoes only the shards whose inputs changed
    per_shard_inputs: ClassVar[bool] = False
    # a stage after the fit that does the same in a frozen run (refit=false): its fits are the run's own, kept
    per_shard_when_frozen: ClassVar[bool] = False

    def per_shard(self, cfg: Config) -> bool:
        """Whether this stage's shards check their own inputs in a run with ``cfg``."""
        return self.per_shard_inputs or (self.per_shard_when_frozen and not cfg.refit)

    def resources_for(self, cfg: Config) -> Resources:
        return self.resources

    def map_resources(self, cfg: Config) -> Resources:
        """What each task of the stage's global part (``map_fn``) asks for: the stage's own resources, but never a
        whole GPU per task (that is for the actors of a model)."""
        res = self.resources_for(cfg)
        return Resources(cpus=1.0, gpus="none") if res.actor else res

    def fingerprint_extra(self, ctx: StageContext) -> dict:
        """Inputs other than config keys and upstream stages (a weights file, a ground-truth folder)."""
        return {}

    def output_fingerprint(self, ctx: StageContext) -> str:
        """Source stages only: a hash of what they wrote. A source stage that computes it while writing returns
        it as its result's ``"fingerprint"``, and the executor then does not call this for that run."""
        raise NotImplementedError

    def preflight(self, ctx: StageContext) -> None:
        """Checks of the configuration (the weights can be found and load into the backbone), run for every planned
        stage in the driver before the run folder is made or touched and before Ray starts."""

    def wanted(self, ctx: StageContext) -> bool:
        """Whether a full run includes this stage (evaluate only with ground truth)."""
        return True

    # --- whole stages ---
    def run_whole(self, ctx: StageContext, map_fn: MapFn) -> dict:
        raise NotImplementedError

    # --- sharded stages ---
    def shards(self, ctx: StageContext) -> list[int] | None:
        """The units of work, or None for a whole stage."""
        return None

    def prepare(self, ctx: StageContext, map_fn: MapFn) -> Any:
        return None

    def setup(self, ctx: StageContext) -> Any:
        return None

    def process_shard(self, ctx: StageContext, shard: int, shared: Any, worker: Any = None) -> dict:
        raise NotImplementedError

    def shard_inputs(self, ctx: StageContext, shard: int) -> str | None:
        """Stages whose shards check their own inputs (:meth:`per_shard`): a digest of what shard ``shard`` is made
        from, its images as the manifest lists them (an image's outputs depend on it and the fit alone)."""
        if not ctx.run.manifest.exists():  # a brought-in store: no listing to check against
            return None
        return digest([{k: r[k] for k in SHARD_IDENTITY} for r in ctx.run.manifest_rows(shard)])

    def finish(self, ctx: StageContext, results: dict[int, dict], map_fn: MapFn) -> dict:
        return {}


def for_each_image(
    stage: str, items: Iterable[tuple[str, Any]], fn: Callable[[Any], Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``{image_id: fn(item)}`` over ``(image_id, item)`` pairs, one image's exception becoming its error row
    (``"<stage>: <reason>"``) instead of a failed shard."""
    out, errors = {}, {}
    for image_id, item in items:
        result, error = attempt(stage, fn, item)
        if error is None:
            out[image_id] = result
        else:
            errors[image_id] = error
    return out, errors


def attempt(stage: str, fn: Callable[[Any], Any], item: Any) -> tuple[Any, str | None]:
    """``(fn(item), None)``, or ``(None, "<stage>: <reason>")`` where it raised."""
    try:
        return fn(item), None
    except Exception as e:  # one image's failure is an error row, never a failed job
        return None, f"{stage}: {image_error(e)}"


def image_error(e: Exception) -> str:
    """The reason an image's error row gives: a bad image says why itself; anything else is named by its type."""
    return str(e) if isinstance(e, BadImage) else f"{type(e).__name__}: {e}"
