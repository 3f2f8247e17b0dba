"""The one executor: runs stages (:mod:`mlcseg_ray.core.stage`) over a run folder, on any backend.

It owns what every stage would otherwise repeat (the shapes of datatrove's executor and NeMo-Curator's stage
resources):

* fingerprints: a stage's fingerprint hashes its config keys, its code version, other inputs it names (weights
  file, ground truth) and its upstream stages' fingerprints; ingest's is the hash of the manifest it wrote. A stage
  whose recorded fingerprint differs is stale: its outputs are removed before anything else happens (whether or
  not this command runs it), so ``config.yaml``, ``run.json`` and the outputs never disagree; one line says why.
* markers: ``_state/<stage>/NNNNN`` holds a finished shard's summary and the fingerprint it was made with; a rerun
  skips exactly the shards whose marker carries the current fingerprint. ``_state/<stage>/stage.json`` records the
  stage's fingerprint, what it was computed from, and whether it completed.
* scheduling with the declared :class:`~mlcseg_ray.core.stage.Resources`, through a backend
  (:mod:`mlcseg_ray.backends`): tasks in shard order, an actor pool for stages with a model.
* progress, timings in ``run.json``, each image's status (``status.parquet``), and the run folder's lock.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from .backend import Backend
from .config import Config
from .errors import NoUsableImages, StageFailed, StageOrderError
from .fanout import serial_map
from .fingerprint import digest, why_changed
from .inputs import RunInputs
from .integrity import declared_outputs, stage_damage
from .progress import polled, progress_bar
from .run_dir import RunDir, markers, remove_stale_temp_files
from .shard_work import actor_shard, confined_task, shard_task
from .stage import MapFn, Stage, StageContext
from .status import write_status
from .storage import atomic_write_json, is_remote, read_json, recording_writes, walk_files

log = logging.getLogger("mlcseg_ray")
# A command with nothing else to compute maps at most this many items in the driver (the report's few shards of a
# finished run): starting a cluster for them would cost far more than they do.
IN_PROCESS_ITEMS = 8


class Executor:
    """Runs ``stages`` (the pipeline's ordered list) over ``run`` on ``backend`` (:func:`~mlcseg_ray.backends.
    make_backend`: an embedded Ray or a cluster, or a plain loop in this process)."""

    def __init__(
        self,
        run: RunDir,
        cfg: Config,
        stages: Sequence[Stage],
        backend: Backend,
        inputs: RunInputs = RunInputs(),
    ) -> None:
        self.run, self.cfg, self.inputs, self.backend = run, cfg, inputs, backend
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.summary: list[dict] = []
        self.marker_fps: dict[str, str] = {}  # the fingerprint each stage's shard markers carry
        self.source_fps: dict[str, str] = {}  # what a source stage run now wrote (hashed once: it reads it all)
        self.worked = False  # whether a stage after the source had work to do in this command
        self.status_stale = False  # whether a stage finished since status.parquet was last written
        self.gpu_run = False  # whether a planned stage can use a GPU (the device is then asked of the backend)
        self.device: str | None = None

    # ------------------------------------------------------------------ scheduling
    def map_fn(self, stage: Stage) -> MapFn:
        """The map a stage's global part (k-means passes, evaluation chunks) fans out with, as tasks that ask for
        what the stage declared. A command that has had nothing to compute so far (a rerun of a finished folder:
        only the report is written again) maps a few items in this process: no cluster is started for them."""
        res = stage.map_resources(self.cfg)
        root = str(self.run.root)

        def map_fn(fn: Callable, items: Sequence, *shared: Any) -> list:
            if not self.worked and len(items) <= IN_PROCESS_ITEMS:
                return serial_map(confined_task, items, root, fn, *shared)
            return self.backend.map(confined_task, items, root, fn, *shared, resources=res)

        return map_fn

    def _with_device(self, ctx: StageContext) -> StageContext:
        """``ctx`` with the run's torch device, asked of the backend once, when the first stage with work to do
        runs (a GPU run's device needs the cluster; a rerun with nothing to do never asks)."""
        if not self.gpu_run:  # no planned stage uses a GPU: stay on the CPU (no cluster asked)
            return ctx
        if self.device is None:
            self.device = self.backend.device()
        return replace(ctx, device=self.device)

    def _run_shards(self, stage: Stage, ctx: StageContext, todo: list[int], shared: Any, fp: str) -> None:
        """The shards in ``todo`` on the backend, a bar counting their images as the workers finish them (in shards
        where the run has no manifest to count them from)."""
        res = stage.resources_for(self.cfg)
        per_shard = self.run.images_per_shard()
        images = sum(per_shard.get(n, 0) for n in todo)
        ticks = self.backend.ticks() if images else None
        ctx = replace(ctx, ticks=ticks)
        with progress_bar(stage.name, images or len(todo), "images" if images else "shards") as advance:
            on_done = None if images else advance
            with polled(ticks, advance, images) if images else contextlib.nullcontext():
                if res.actor:
                    work = functools.partial(actor_shard, stage, ctx, shared, fp)
                    setup = functools.partial(stage.setup, ctx)
                    self.backend.map_actors(setup, work, todo, res, ctx.device, self.cfg.num_workers, on_done=on_done)
                else:
                    self.backend.map(shard_task, todo, stage, ctx, shared, fp, resources=res, on_done=on_done)

    # ------------------------------------------------------------------ fingerprints
    def _basis(self, stage: Stage, ctx: StageContext, fps: dict) -> dict:
        return {
            "version": stage.version,
            "config": {k: getattr(self.cfg, k) for k in stage.config_keys},
            "upstream": {u: fps.get(u, "absent") for u in stage.after},
            "inputs": stage.fingerprint_extra(ctx),
        }

    def _record(self, name: str) -> dict | None:
        return read_json(self.run.stage_record(name))

    def _outputs_exist(self, stage: Stage) -> bool:
        return any(getattr(self.run, w).exists() for w in stage.writes)

    def _external(self, stage: Stage) -> str:
        """Outputs brought into the folder by hand (a feature store made elsewhere): a hash of their listing."""
        listing = []
        for w in stage.writes:
            p = getattr(self.run, w)
            files = walk_files(p) if p.is_dir() else [p] if p.exists() else []
            listing += [(self.run.relative(f), f.stat().st_size) for f in files]
        return "external-" + digest(listing)

    def fingerprints(self, ctx: StageContext, planned: list[str]) -> tuple[dict[str, str], dict[str, dict]]:
        fps, bases = {}, {}
        for name in self.order:
            stage, rec = self.stages[name], self._record(name)
            if stage.source:  # the identity of what it wrote (the manifest), however it came to be there
                fps[name] = self.source_fps.get(name) or (
                    stage.output_fingerprint(ctx) if self._outputs_exist(stage) else "absent"
                )
                continue
            if rec is None and name not in planned and self._outputs_exist(stage):
                fps[name] = self._external(stage)
                continue
            bases[name] = self._basis(stage, ctx, fps)
            fps[name] = digest(bases[name])
            # a stage whose shards check their own inputs keeps its outputs when only the source changed: its
            # markers carry the fingerprint of the rest (config, code, weights, and what its upstream's markers
            # carry); downstream sees the full one
            upstream = bases[name]["upstream"]
            own = {
                **bases[name],
                "upstream": {u: self.marker_fps.get(u, f) for u, f in upstream.items() if not self.stages[u].source},
            }
            self.marker_fps[name] = digest(own) if stage.per_shard(self.cfg) else fps[name]
        return fps, bases

    def _invalidate(self, name: str, why: str, planned: list[str]) -> None:
        stage = self.stages[name]
        for w in stage.writes:
            self.run.remove(getattr(self.run, w))
        self.run.remove(self.run.state(name))
        rec = self.run.read_record()
        rec.get("stages", {}).pop(name, None)
        atomic_write_json(self.run.run_record, rec)
        then = "recomputing" if name in planned else f"outputs removed; rerun `mlcseg {name}` (or `mlcseg run`)"
        log.info(f"{name}: stale ({why}); {then}")

    def _is_current(self, name: str, fp: str) -> bool:
        rec = self._record(name)
        if rec is None:
            return not self.stages[name].source and fp.startswith("external-")
        return rec.get("fingerprint") == fp and rec.get("complete", False)

    def _all_marked(self, stage: Stage, ctx: StageContext, fp: str) -> bool:
        """Every shard of a completed stage still has its marker (one deleted by hand is done again)."""
        if self._record(stage.name) is None:  # brought-in outputs
            return True
        shards = stage.shards(ctx)
        return shards is None or all(self._marker_done(stage, ctx, n, fp) for n in shards)

    # ------------------------------------------------------------------ running
    def run_stages(self, planned: list[str], command: str = "") -> list[dict]:
        """Run ``planned`` (in pipeline order) under the run folder's lock."""
        planned = [n for n in self.order if n in planned]
        self.source_fps = {}  # a manifest hashed in an earlier call may have changed since
        ctx = StageContext(self.run, self.cfg, self.inputs)
        for name in planned:  # before the run folder is made or Ray started: a bad weights file creates nothing
            try:
                self.stages[name].preflight(ctx)
            except Exception as e:
                raise StageFailed(name, e, self.run.root) from e
        with self.run.lock(command or " ".join(planned)):
            remove_stale_temp_files(self.run.root)  # a killed run's half-written run.json or status.parquet
            try:
                self._run_planned(planned, ctx)
            except BaseException:
                # what the stages that finished did, for `mlcseg errors`; a store that went away cannot take it,
                # and then the run's own error is the one the user sees
                with contextlib.suppress(Exception):
                    self._flush_status()
                raise
            self._flush_status()
            rec = self.run.read_record()  # replaced, not merged: this command's cluster (or none), not an older one's
            atomic_write_json(self.run.run_record, {**rec, "backend": self.backend.describe()})
        return self.summary

    def _run_planned(self, planned: list[str], ctx: StageContext) -> None:
        """The source stage first (its manifest's fingerprint feeds every other stage's); then whatever a change
        touched is invalidated, and the other stages run in order."""
        # a new folder has work ahead: its source's tasks start the cluster (and warm its workers) at once
        self.worked, self.device = not self.run.manifest.exists(), None
        for name in planned:
            if self.stages[name].source:
                self._run_guarded(name, ctx, planned, None)
                self._check_usable(name, planned)
        fps, bases = self.fingerprints(ctx, planned)
        self._check_order(planned, fps, bases, ctx)
        for name in self.order:
            rec = self._record(name)
            changed = (rec or {}).get("marker_fingerprint", (rec or {}).get("fingerprint")) != self.marker_fps.get(
                name, fps[name]
            )
            if rec and not self.stages[name].source and changed:
                self._invalidate(name, why_changed(rec.get("basis"), bases.get(name, {})), planned)
        self.cfg.save(self.run.config)
        self.run.update_record(
            config_fingerprint=digest(self.cfg.model_dump()), fingerprints={n: fps[n] for n in self.order}
        )
        self.gpu_run = any(self.stages[n].resources_for(self.cfg).gpus != "none" for n in planned)
        for name in planned:
            if not self.stages[name].source:
                self._run_guarded(name, ctx, planned, fps[name], bases.get(name))

    def _run_guarded(
        self, name: str, ctx: StageContext, planned: list[str], fp: str | None, basis: dict | None = None
    ) -> None:
        try:
            self._run_stage(name, ctx, planned, fp, basis)
        except (StageOrderError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageFailed(name, e, self.run.root) from e

    def _check_usable(self, source: str, planned: list[str]) -> None:
        """Stop before any later stage (and before Ray starts) when the source found no image it could use."""
        done = self.run.read_record().get("stages", {}).get(source, {})
        later = [n for n in planned if not self.stages[n].source]
        if later and done.get("images") and done.get("errors") == done.get("images"):
            raise NoUsableImages(
                f"all {done['images']} images failed at {source}; nothing for {later[0]} to do: "
                f"`mlcseg errors {self.run.root}` says why, image by image"
            )

    def _check_order(self, planned: list[str], fps: dict, bases: dict, ctx: StageContext) -> None:
        """Refuse, before anything is removed, a stage whose upstream is neither in this run nor up to date (and
        undamaged)."""
        for name in planned:
            for up in self.stages[name].after:
                if up in planned:
                    continue
                if self._is_current(up, fps[up]):
                    if self._record(up) is None:  # brought-in outputs: nothing recorded to check
                        continue
                    whole, per_shard = stage_damage(
                        self.run, up, self.marker_fps.get(up, fps[up]), self.stages[up].shards(ctx)
                    )
                    damage = whole + [p for bad in per_shard.values() for p in bad]
                    if not damage:
                        continue
                    raise StageOrderError(
                        f"{name} needs {up}, whose outputs are damaged ({damage[0]}"
                        f"{f' and {len(damage) - 1} more' if len(damage) > 1 else ''}): run `mlcseg {up}` to "
                        f"recompute them, or `mlcseg run`"
                    )
                rec = self._record(up)
                why = (
                    "has not run"
                    if rec is None
                    else f"is out of date ({why_changed(rec.get('basis'), bases.get(up, {}))})"
                    if rec.get("fingerprint") != fps[up]
                    else "did not finish"
                )
                raise StageOrderError(
                    f"{name} needs {up}, which {why} in {self.run.root}: run `mlcseg {up}` first, or `mlcseg run`"
                )

    def _run_stage(
        self, name: str, ctx: StageContext, planned: list[str], fp: str | None, basis: dict | None = None
    ) -> None:
        stage = self.stages[name]
        t0 = time.perf_counter()
        if not stage.source and self._is_current(name, fp):
            self._repair(stage, ctx, self.marker_fps.get(name, fp))
        if (
            not stage.source
            and not stage.always_run
            and self._is_current(name, fp)
            and self._all_marked(stage, ctx, self.marker_fps.get(name, fp))
        ):
            log.info(f"{name}: up to date, skipped")
            done = self.run.read_record().get("stages", {}).get(name, {})
            # where its output is now: the folder may have been copied or moved since (the record says it relative)
            output = done.get("output", "")
            if output and not (is_remote(output) or os.path.isabs(output)):
                output = str(self.run.at(output))
            self._summarise(name, {**done, "output": output}, 0.0, skipped=True)
            return
        if not stage.source and not stage.always_run:
            self.worked = True
        if "status" in stage.reads:
            self._flush_status()
        if stage.resources_for(self.cfg).gpus != "none":
            ctx = self._with_device(ctx)  # where the run's models and GPU tasks run
        previous = self._record(name) or {}
        marker_fp = {} if stage.source else {"marker_fingerprint": self.marker_fps.get(name, fp)}
        atomic_write_json(
            self.run.stage_record(name),
            {"fingerprint": fp or previous.get("fingerprint"), **marker_fp, "basis": basis, "complete": False},
        )
        shards = stage.shards(ctx)
        with recording_writes() as written:  # the stage's own outputs (prepare, finish, a whole stage)
            if shards is None:
                result = stage.run_whole(ctx, self.map_fn(stage)) or {}
            else:
                result = self._sharded(stage, ctx, shards, fp)
        outputs = {**previous.get("outputs", {}), **declared_outputs(stage.writes, self.run, written)}
        if stage.source:  # its result may carry the fingerprint of what it wrote, computed as it wrote it
            fp, before = result.pop("fingerprint", None) or stage.output_fingerprint(ctx), previous.get("fingerprint")
            self.source_fps[name] = fp
            log.info(
                f"{name}: {result.get('images')} images"
                + (
                    ""
                    if before is None
                    else ", unchanged since the last run"
                    if before == fp
                    else "; the inputs changed since the last run"
                )
            )
        seconds = time.perf_counter() - t0
        atomic_write_json(
            self.run.stage_record(name),
            {"fingerprint": fp, **marker_fp, "basis": basis, "complete": True, "outputs": outputs},
        )
        output = result.get("output")
        recorded = {**result, "output": self.run.relative(output)} if output and self.run.inside(output) else result
        self.run.update_record(stages={name: {"fingerprint": fp, "seconds": round(seconds, 3), **recorded}})
        self.status_stale = True
        self._summarise(name, result, seconds)

    def _repair(self, stage: Stage, ctx: StageContext, fp: str) -> None:
        """Outputs that a finished stage recorded and are missing or truncated now: a damaged shard loses its
        marker (and is done again); damage to the stage's own outputs (a merged file) recomputes the stage."""
        whole, per_shard = stage_damage(self.run, stage.name, fp, stage.shards(ctx))
        if whole:
            self._invalidate(stage.name, f"damaged: {whole[0]}", [stage.name])
        elif per_shard:
            first = next(iter(per_shard.values()))[0]
            log.info(f"{stage.name}: {len(per_shard)} shard(s) damaged ({first}); recomputing them")
            for n in per_shard:
                self.run.marker(stage.name, n).unlink(missing_ok=True)

    def _marker_done(self, stage: Stage, ctx: StageContext, n: int, fp: str) -> bool:
        """Shard ``n`` is done: its marker carries ``fp`` and, for a stage that checks its inputs per shard, the
        digest of the inputs it has now."""
        marker = read_json(self.run.marker(stage.name, n)) or {}
        if marker.get("fingerprint") != fp:
            return False
        return not stage.per_shard(self.cfg) or marker.get("inputs") == stage.shard_inputs(ctx, n)

    def _drop_vanished(self, stage: Stage, shards: list[int]) -> None:
        """Markers (and recorded outputs) of shards the stage no longer has (their images left the input)."""
        state = self.run.state(stage.name)
        if not state.is_dir():
            return
        for marker in markers(state):
            if int(marker.name) not in shards:
                for rel in (read_json(marker) or {}).get("outputs", {}):
                    self.run.at(rel).unlink(missing_ok=True)
                marker.unlink()

    def _sharded(self, stage: Stage, ctx: StageContext, shards: list[int], fp: str) -> dict:
        for w in stage.writes:
            remove_stale_temp_files(getattr(self.run, w))
        fp = self.marker_fps.get(stage.name, fp)
        self._drop_vanished(stage, shards)
        done = {n for n in shards if self._marker_done(stage, ctx, n, fp)}
        todo_n, n = len(shards) - len(done), len(shards)
        if stage.per_shard(self.cfg) and done and todo_n:
            log.info(f"{stage.name}: {todo_n} of {n} shards new or changed; the others kept")
        elif done and todo_n:  # a resumed run says what it kept
            log.info(f"{stage.name}: {len(done)} of {n} shards done before, kept; {todo_n} to do")
        todo = [n for n in shards if n not in done]
        ctx = replace(ctx, pending=tuple(todo))
        if todo:
            shared = stage.prepare(ctx, self.map_fn(stage))
            self._run_shards(stage, ctx, todo, shared, fp)
        # each marker read once, kept without its per-image and per-file parts: finish needs the shards' counts
        results = {n: _summary_of(read_json(self.run.marker(stage.name, n))) for n in shards}
        out = {
            "images": sum(r.get("images", 0) for r in results.values()),
            "errors": sum(len(r.get("errors", {})) for r in results.values()),
            "shards_done": len(todo),
            "shards_skipped": len(done),
        }
        out.update(stage.finish(ctx, results, self.map_fn(stage)) or {})
        return out

    def _summarise(self, name: str, result: dict, seconds: float, skipped: bool = False) -> None:
        self.summary.append(
            {
                "stage": name,
                "images": result.get("images"),
                "errors": result.get("errors", 0),
                "seconds": round(seconds, 3),
                "skipped": skipped,
                "output": result.get("output", ""),
            }
        )

    # ------------------------------------------------------------------ each image's status
    def _flush_status(self) -> None:
        """``status.parquet`` brought up to date once per command (and before a stage that reads it), not after
        every stage: each write reads every finished stage's markers."""
        if self.status_stale:
            self._write_status()
            self.status_stale = False

    def _write_status(self) -> None:
        """``status.parquet`` from the markers of every stage that has run (core/status.py)."""
        stages = []
        for name in self.order:
            rec = self._record(name)
            if rec is not None and self.run.state(name).is_dir():
                stages.append((name, rec.get("marker_fingerprint", rec.get("fingerprint"))))
        write_status(self.run, stages)


PER_IMAGE_KEYS = ("outputs", "inputs", "confidence", "flags")  # a marker's parts that grow with its images


def _summary_of(marker: dict) -> dict:
    """A shard marker without its per-image and per-file parts (the driver keeps one per shard)."""
    return {k: v for k, v in marker.items() if k not in PER_IMAGE_KEYS}
