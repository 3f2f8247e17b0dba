"""The one executor: runs stages (:mod:`mlcseg_ray.stage`) over a run folder, on Ray or in-process.

It owns what every stage would otherwise repeat (the shapes of datatrove's executor and NeMo-Curator's stage
resources):

* fingerprints: a stage's fingerprint hashes its config keys, its code version, other inputs it names (weights
  file, ground truth) and its upstream stages' fingerprints; ingest's is the hash of the manifest it wrote. A stage
  whose recorded fingerprint differs is stale: its outputs are removed before anything else happens (whether or
  not this command runs it), so ``config.yaml``, ``run.json`` and the outputs never disagree; one line says why.
* markers: ``_state/<stage>/NNNNN`` holds a finished shard's summary and the fingerprint it was made with; a rerun
  skips exactly the shards whose marker carries the current fingerprint. ``_state/<stage>/stage.json`` records the
  stage's fingerprint, what it was computed from, and whether it completed.
* scheduling with the declared :class:`~mlcseg_ray.stage.Resources`: Ray tasks (results in shard order, so every
  reduction adds in the same order), an actor pool for stages with a model, or a plain loop (``backend="local"``).
* progress, timings in ``run.json``, each image's status (``status.parquet``), and the run folder's lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

from .config import Config
from .kmeans import serial_map
from .stage import MapFn, Resources, RunInputs, Stage, StageContext
from .store import RunDir, atomic_write_json, read_json

log = logging.getLogger("mlcseg_ray")


class StageOrderError(RuntimeError):
    """A stage was asked for whose inputs are missing or were made with another configuration."""


class StageFailed(RuntimeError):
    """A stage stopped on an error (its ``__cause__``); the run folder records what finished before it."""

    def __init__(self, stage: str, cause: BaseException, where=None):
        super().__init__(f"{stage}: {cause}")
        self.stage, self.where = stage, where  # where: the run folder, for errors that name no file


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_shard(stage: Stage, ctx: StageContext, shard: int, shared: Any, fingerprint: str, worker: Any = None) -> dict:
    """One shard of a stage, then its marker: the outputs are in place before the marker says so."""
    t0 = time.perf_counter()
    result = stage.process_shard(ctx, shard, shared, worker) or {}
    result["seconds"] = round(time.perf_counter() - t0, 4)
    atomic_write_json(ctx.run.marker(stage.name, shard), {"fingerprint": fingerprint, **result})
    return result


class _ShardActor:
    """A pool member for stages with a per-worker state (a model); called by Ray Data with a batch of shards."""

    def __init__(self, stage: Stage, ctx: StageContext, shared: Any, fingerprint: str, threads: int):
        if ctx.device == "cpu":
            import torch

            torch.set_num_threads(max(1, threads))
        self.stage, self.ctx, self.shared, self.fingerprint = stage, ctx, shared, fingerprint
        self.worker = stage.setup(ctx)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        shards = [int(s) for s in batch["shard"]]
        results = [json.dumps(run_shard(self.stage, self.ctx, s, self.shared, self.fingerprint, self.worker),
                              default=str) for s in shards]
        return {"shard": np.asarray(shards), "result": np.asarray(results)}


class Executor:
    """Runs ``stages`` (the pipeline's ordered list) over ``run``. ``backend``: ``ray`` (embedded Ray, or the
    cluster at ``address``) or ``local`` (a plain loop in this process, for unit tests and small arrays)."""

    def __init__(self, run: RunDir, cfg: Config, stages: Sequence[Stage], inputs: RunInputs = RunInputs(),
                 backend: str = "ray", address: Optional[str] = None, say: Callable[[str], None] | None = None):
        self.run, self.cfg, self.inputs = run, cfg, inputs
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.backend, self.address = backend, address
        self.say = say or log.info
        self.summary: list[dict] = []
        self._ray_up = False

    # ------------------------------------------------------------------ scheduling
    def _use_ray(self) -> bool:
        if self.backend == "local":
            return False
        if not self._ray_up:
            from .raytools import init_ray

            init_ray(self.address)
            self._ray_up = True
        return True

    def _device(self) -> str:
        """The torch device of this run's models: CUDA where the run uses GPUs."""
        if self._use_ray():
            from .raytools import use_gpus

            return "cuda" if use_gpus(self.cfg.device) else "cpu"
        if self.cfg.device == "cpu":
            return "cpu"
        import torch

        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no GPU is visible")
        return "cuda" if torch.cuda.is_available() else "cpu"

    def map(self, fn: Callable, items: Sequence, *shared, resources: Resources = Resources(), on_done=None) -> list:
        """``[fn(item, *shared) for item in items]`` in item order: Ray tasks with ``resources`` (``shared`` put
        in the object store once, at most 2 tasks per CPU in flight), or a plain loop."""
        if not self._use_ray():
            return serial_map(fn, items, *shared, on_done=on_done)
        from .raytools import task_gpus

        share = task_gpus(self.cfg.device)
        gpus = {"none": 0.0, "share": share, "one": 1.0 if share else 0.0}[resources.gpus]
        return ray_map(fn, items, *shared, cpus=resources.cpus, gpus=gpus, on_done=on_done)

    def map_fn(self) -> MapFn:
        """The map a stage's global part (k-means passes) fans out with: tasks that may share a GPU."""
        return lambda fn, items, *shared: self.map(fn, items, *shared, resources=Resources(gpus="share"))

    def _run_shards(self, stage: Stage, ctx: StageContext, todo: list[int], shared: Any, fp: str) -> None:
        from .progress import progress_bar

        res = stage.resources_for(self.cfg)
        with progress_bar(stage.name, total=len(todo), unit="shards") as advance:
            if res.actor and self._use_ray():
                self._run_on_actors(stage, ctx, todo, shared, fp, advance)
            elif res.actor:  # in-process: one worker state for all shards
                worker = stage.setup(ctx)
                for n in todo:
                    run_shard(stage, ctx, n, shared, fp, worker)
                    advance()
            else:
                self.map(_shard_task, todo, stage, ctx, shared, fp, resources=res, on_done=advance)

    def _run_on_actors(self, stage: Stage, ctx: StageContext, todo: list[int], shared: Any, fp: str, advance) -> None:
        import ray
        from ray.data import ActorPoolStrategy

        from .raytools import cluster_cpus, cluster_gpus

        gpu = ctx.device == "cuda"
        n_actors = max(1, min(self.cfg.num_workers or (int(cluster_gpus()) if gpu else 1), len(todo)))
        ds = ray.data.from_items([{"shard": n} for n in todo], override_num_blocks=len(todo)).map_batches(
            _ShardActor,
            fn_constructor_kwargs=dict(stage=stage, ctx=ctx, shared=shared, fingerprint=fp,
                                       threads=max(1, cluster_cpus() // n_actors)),
            batch_size=1,  # one shard per call: a shard is the unit of resume
            compute=ActorPoolStrategy(size=n_actors),
            num_gpus=1 if gpu else 0,
            num_cpus=1 if gpu else stage.resources_for(self.cfg).cpus,
        )
        for _ in ds.iter_batches(batch_size=1, batch_format="numpy"):
            advance()

    # ------------------------------------------------------------------ fingerprints
    def _basis(self, stage: Stage, ctx: StageContext, fps: dict) -> dict:
        return {"version": stage.version, "config": {k: getattr(self.cfg, k) for k in stage.config_keys},
                "upstream": {u: fps.get(u, "absent") for u in stage.after}, "inputs": stage.fingerprint_extra(ctx)}

    def _record(self, name: str) -> dict | None:
        return read_json(self.run.stage_record(name))

    def _outputs_exist(self, stage: Stage) -> bool:
        return any(getattr(self.run, w).exists() for w in stage.writes)

    def _external(self, stage: Stage) -> str:
        """Outputs brought into the folder by hand (a feature store made elsewhere): a hash of their listing."""
        listing = []
        for w in stage.writes:
            p = getattr(self.run, w)
            files = sorted(p.rglob("*")) if p.is_dir() else [p] if p.exists() else []
            listing += [(str(f.relative_to(self.run.root)), f.stat().st_size) for f in files if f.is_file()]
        return "external-" + digest(listing)

    def fingerprints(self, ctx: StageContext, planned: list[str]) -> tuple[dict[str, str], dict[str, dict]]:
        fps, bases = {}, {}
        for name in self.order:
            stage, rec = self.stages[name], self._record(name)
            if stage.source:  # the identity of what it wrote (the manifest), however it came to be there
                fps[name] = stage.output_fingerprint(ctx) if self._outputs_exist(stage) else "absent"
                continue
            if rec is None and name not in planned and self._outputs_exist(stage):
                fps[name] = self._external(stage)
                continue
            bases[name] = self._basis(stage, ctx, fps)
            fps[name] = digest(bases[name])
        return fps, bases

    @staticmethod
    def _why(old: dict, new: dict) -> str:
        """What changed between a stage's recorded basis and today's, in a few words."""
        if not old:
            return "made with an earlier version of mlcseg_ray"
        changed = [f"{k} {old.get('config', {}).get(k)!r} -> {v!r}" for k, v in new.get("config", {}).items()
                   if old.get("config", {}).get(k) != v]
        changed += [f"{u} changed" for u, v in new.get("upstream", {}).items() if old.get("upstream", {}).get(u) != v]
        changed += [f"{k} changed" for k, v in new.get("inputs", {}).items() if old.get("inputs", {}).get(k) != v]
        if old.get("version") != new.get("version"):
            changed.append("stage code changed")
        return ", ".join(changed) or "inputs changed"

    def _invalidate(self, name: str, why: str, planned: list[str]) -> None:
        stage = self.stages[name]
        for w in stage.writes:
            self.run.remove(getattr(self.run, w))
        self.run.remove(self.run.state(name))
        rec = self.run.read_record()
        rec.get("stages", {}).pop(name, None)
        atomic_write_json(self.run.run_record, rec)
        then = "recomputing" if name in planned else f"outputs removed; rerun `mlcseg {name}` (or `mlcseg run`)"
        self.say(f"{name}: stale ({why}); {then}")

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
        return shards is None or all((read_json(self.run.marker(stage.name, n)) or {}).get("fingerprint") == fp
                                     for n in shards)

    # ------------------------------------------------------------------ running
    def run_stages(self, planned: list[str], command: str = "") -> list[dict]:
        """Run ``planned`` (in pipeline order) under the run folder's lock."""
        planned = [n for n in self.order if n in planned]
        with self.run.lock(command or " ".join(planned)):
            from .store import remove_stale_temp_files

            remove_stale_temp_files(self.run.root)  # a killed run's half-written run.json or status.parquet
            ctx = StageContext(self.run, self.cfg, self.inputs)
            for name in planned:
                if self.stages[name].source:  # the manifest's fingerprint feeds every other stage's
                    self._run_guarded(name, ctx, planned, None)
            fps, bases = self.fingerprints(ctx, planned)
            self._check_order(planned, fps, bases)
            for name in planned:
                try:
                    self.stages[name].preflight(ctx)
                except Exception as e:
                    raise StageFailed(name, e, self.run.root) from e
            for name in self.order:
                rec = self._record(name)
                if rec and not self.stages[name].source and rec.get("fingerprint") != fps[name]:
                    self._invalidate(name, self._why(rec.get("basis"), bases.get(name, {})), planned)
            self.cfg.save(self.run.config)
            self.run.update_record(config_fingerprint=digest(self.cfg.model_dump()),
                                   fingerprints={n: fps[n] for n in self.order})
            ctx = replace(ctx, device=self._device()) if any(
                self.stages[n].resources_for(self.cfg).actor for n in planned) else ctx
            for name in planned:
                if not self.stages[name].source:
                    self._run_guarded(name, ctx, planned, fps[name], bases.get(name))
        return self.summary

    def _run_guarded(self, name: str, ctx: StageContext, planned: list[str], fp: Optional[str],
                     basis: Optional[dict] = None) -> None:
        try:
            self._run_stage(name, ctx, planned, fp, basis)
        except (StageOrderError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageFailed(name, e, self.run.root) from e

    def _check_order(self, planned: list[str], fps: dict, bases: dict) -> None:
        """Refuse, before anything is removed, a stage whose upstream is neither in this run nor up to date."""
        for name in planned:
            for up in self.stages[name].after:
                if up in planned or self._is_current(up, fps[up]):
                    continue
                rec = self._record(up)
                why = ("has not run" if rec is None else
                       f"is out of date ({self._why(rec.get('basis'), bases.get(up, {}))})" if rec.get("fingerprint")
                       != fps[up] else "did not finish")
                raise StageOrderError(f"{name} needs {up}, which {why} in {self.run.root}: run `mlcseg {up}` "
                                      f"first, or `mlcseg run`")

    def _run_stage(self, name: str, ctx: StageContext, planned: list[str], fp: Optional[str],
                   basis: Optional[dict] = None) -> None:
        stage = self.stages[name]
        t0 = time.perf_counter()
        if not stage.source and not stage.always_run and self._is_current(name, fp) \
                and self._all_marked(stage, ctx, fp):
            self.say(f"{name}: up to date, skipped")
            self._summarise(name, self.run.read_record().get("stages", {}).get(name, {}), 0.0, skipped=True)
            return
        previous = self._record(name) or {}
        atomic_write_json(self.run.stage_record(name), {"fingerprint": fp or previous.get("fingerprint"),
                                                        "basis": basis, "complete": False})
        shards = stage.shards(ctx)
        if shards is None:
            result = stage.run_whole(ctx, self.map_fn()) or {}
        else:
            result = self._sharded(stage, ctx, shards, fp)
        if stage.source:
            fp, before = stage.output_fingerprint(ctx), previous.get("fingerprint")
            self.say(f"{name}: {result.get('images')} images" + ("" if before is None else ", unchanged since the last "
                     "run" if before == fp else "; the inputs changed since the last run"))
        seconds = time.perf_counter() - t0
        atomic_write_json(self.run.stage_record(name), {"fingerprint": fp, "basis": basis, "complete": True})
        self.run.update_record(stages={name: {"fingerprint": fp, "seconds": round(seconds, 3), **result}})
        self._write_status()
        self._summarise(name, result, seconds)

    def _sharded(self, stage: Stage, ctx: StageContext, shards: list[int], fp: str) -> dict:
        from .store import remove_stale_temp_files

        for w in stage.writes:
            remove_stale_temp_files(getattr(self.run, w))
        done = {n for n in shards if (read_json(self.run.marker(stage.name, n)) or {}).get("fingerprint") == fp}
        todo = [n for n in shards if n not in done]
        ctx = replace(ctx, pending=tuple(todo))
        if todo:
            shared = stage.prepare(ctx, self.map_fn())
            self._run_shards(stage, ctx, todo, shared, fp)
        results = {n: read_json(self.run.marker(stage.name, n)) for n in shards}
        errors = {k: v for r in results.values() for k, v in r.get("errors", {}).items()}
        out = {"images": sum(r.get("images", 0) for r in results.values()), "errors": len(errors),
               "shards_done": len(todo), "shards_skipped": len(done)}
        out.update(stage.finish(ctx, results, self.map_fn()) or {})
        return out

    def _summarise(self, name: str, result: dict, seconds: float, skipped: bool = False) -> None:
        self.summary.append({"stage": name, "images": result.get("images"), "errors": result.get("errors", 0),
                             "seconds": round(seconds, 3), "skipped": skipped, "output": result.get("output", "")})

    # ------------------------------------------------------------------ each image's status
    def _write_status(self) -> None:
        """``status.parquet``: every image once, ok or the first stage's error, and its flag (empty/full mask)."""
        import pyarrow.parquet as pq

        from .store import list_shards

        if self.run.manifest.exists():
            base = pq.read_table(self.run.manifest, columns=["image_id", "uri", "status", "error"]).to_pylist()
        else:  # a brought-in store: its image tables list the images
            base = [r for p in list_shards(self.run.image_tables)
                    for r in pq.read_table(p, columns=["image_id", "uri", "status", "error"]).to_pylist()]
        rows = {r["image_id"]: {**r, "stage": "ingest" if r["status"] != "ok" else None, "flag": None} for r in base}
        for name in self.order:
            state = self.run.state(name)
            rec = self._record(name)
            if rec is None or not state.is_dir():
                continue
            for marker in sorted(state.glob("[0-9]*")):
                m = read_json(marker) or {}
                if m.get("fingerprint") != rec.get("fingerprint"):
                    continue
                for image_id, err in m.get("errors", {}).items():
                    r = rows.get(image_id)
                    if r is not None and r["status"] == "ok":
                        r.update(status="error", error=err, stage=name)
                for image_id, flag in m.get("flags", {}).items():
                    if image_id in rows:
                        rows[image_id]["flag"] = flag
        self.run.write_status([rows[k] for k in sorted(rows)])


def ray_map(fn: Callable, items: Sequence, *shared, cpus: float = 1.0, gpus: float = 0.0, on_done=None) -> list:
    """``[fn(item, *shared) for item in items]`` as Ray tasks, in item order (so every reduction adds in the same
    order): ``shared`` put in the object store once, at most 2 tasks per CPU in flight."""
    import ray

    from .raytools import cluster_cpus

    remote = _remote(fn, cpus, gpus)
    refs = [ray.put(a) for a in shared]
    results, pending, pos, limit = {}, {}, 0, 2 * cluster_cpus()
    while pos < len(items) or pending:
        while pos < len(items) and len(pending) < limit:
            pending[remote.remote(items[pos], *refs)] = pos
            pos += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
        if on_done:
            on_done()
    return [results[i] for i in range(len(items))]


def _shard_task(shard: int, stage: Stage, ctx: StageContext, shared: Any, fp: str) -> dict:
    return run_shard(stage, ctx, shard, shared, fp)


_REMOTES: dict = {}


def _remote(fn, cpus: float, gpus: float):
    import ray

    key = (fn, cpus, gpus)
    if key not in _REMOTES:
        # max_calls=0: Ray's default for GPU tasks is a fresh worker per call (seconds each, CUDA set-up
        # included); a shard task keeps nothing on the GPU worth releasing between calls.
        _REMOTES[key] = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=3, max_calls=0)(fn)
    return _REMOTES[key]
