"""The ``mlcseg`` command line: one shape for every command (input, --out, --backbone, --weights, --address,
--config, key=value overrides). Results go to stdout (``--json`` for scripts), logs and progress to stderr; every
expected failure is one line on stderr and an exit code from :data:`~mlcseg_ray.cli.errors.EXIT_CODES`.

Heavy modules (torch, Ray, the stages) are imported inside the commands, so that ``mlcseg --help`` and a bad
option answer at once."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from ..core.config import Config, parse_overrides
from ..core.inputs import INPUT_FIELDS, InputSpec
from ..core.progress import ConsoleHandler, console, shown
from ..core.progress import out as stdout
from ..core.run_dir import printable
from . import jobs, results
from .errors import EXIT_CODES, error, one_line_errors
from .options import (
    Address,
    Backbone,
    ConfigFile,
    Fit,
    Freeze,
    Json,
    Out,
    Overrides,
    Weights,
    takes_inputs,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Training-free unsupervised segmentation on Ray. Exit codes: "
    + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
    + ".",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        stdout.print(f"mlcseg_ray {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    pass


def _check_out(out: str) -> None:
    """Before anything is created: --out must be a folder (or not exist yet) that can be written. (A bucket's
    permissions show at its first write: a refusal there is one line and exit 5.)"""
    from ..core.storage import as_location, is_local

    out = as_location(out)
    if not is_local(out):
        return
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is a file; give a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(parent))


# Runs ----------------------------------------------------------------------------------------------------------
def _config(
    config: Path | None, overrides: list[str] | None, backbone: str | None = None, weights: str | None = None
) -> Config:
    extra = list(overrides or [])
    if backbone:
        extra.append(f"backbone={backbone}")
    if weights:
        extra.append(f"weights={weights}")
    return Config.load(config, extra)


def _run_stages(
    stages: list[str] | None,
    out: str,
    config: Path | None,
    overrides: list[str] | None,
    backbone: str | None,
    weights: str | None,
    address: str | None,
    as_json: bool = False,
    inputs: InputSpec = InputSpec(),
) -> None:
    from ..backends.ray_runtime import init_ray, ray_output_to_log
    from ..core.run_dir import RunDir
    from ..core.storage import use_endpoint
    from ..pipeline import Pipeline

    fd, ray_log = tempfile.mkstemp(prefix="mlcseg-ray-", suffix=".log")
    os.close(fd)
    try:
        with one_line_errors(out):
            use_endpoint(parse_overrides(overrides or []).get("s3_endpoint_url"))  # before the bucket's config.yaml
            if config is None and RunDir(out).config.is_file():
                config = RunDir(out).config  # a rerun starts from the folder's config; overrides change it
            cfg = _config(config, overrides, backbone, weights)  # a bad config creates nothing
            use_endpoint(cfg.s3_endpoint_url)
            _check_out(out)
            # Ray's own lines go to the run's log (RUN/logs/); stdout is for the result alone
            with ray_output_to_log(Path(ray_log)), contextlib.redirect_stdout(sys.stderr):
                if address:
                    init_ray(address)  # an unreachable cluster creates nothing either
                given = {name: getattr(inputs, name) for name in INPUT_FIELDS}
                pipe = Pipeline(out, cfg, address=address, **given)
                summary = pipe.run(stages, print_summary=False)
    except KeyboardInterrupt:
        error(f"interrupted; finished shards are kept: rerun the same command to resume ({out})")
        raise typer.Exit(130) from None
    finally:
        _keep_log(Path(ray_log), RunDir(out))
    _report(pipe, summary, as_json)


def _keep_log(log: Path, run: Any) -> None:
    """The command's Ray log into ``RUN/logs/`` where the run folder exists (and the log holds anything)."""
    from ..core.storage import atomic_write_bytes

    try:
        if log.exists() and log.stat().st_size and run.root.is_dir():
            atomic_write_bytes(run.logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", log.read_bytes())
    except Exception:  # a store that went away: the log stays behind, the run's own error is what the user sees
        console.print(f"[yellow]Ray's log of this command: {shown(log)}[/]", soft_wrap=True, highlight=False)
        return
    log.unlink(missing_ok=True)


def _report(pipe: Any, summary: list[dict], as_json: bool) -> None:
    """The result of a run on stdout: the summary (and metrics), as a table or JSON; exit 3 if images failed."""
    from ..core.progress import summary_table
    from .console import print_metrics

    run = pipe.run_dir
    evaluated = any(r["stage"] == "evaluate" for r in summary)
    metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() and evaluated else None
    rec = run.read_record()
    status = run.status_summary()
    flags = dict(sorted(status.flags.items()))
    failed = status.failed
    if as_json:
        payload = {
            "run": str(run.root),
            "stages": summary,
            "images": status.images,
            "flagged": flags,
            "failed": failed,
            "random_weights": bool(rec.get("backbone", {}).get("random_weights")),
        }
        if metrics:
            payload["metrics"] = {k: v for k, v in metrics.items() if k != "confusion"}
        stdout.print_json(json.dumps(payload, default=str))
    else:
        summary_table(f"mlcseg: {run.root}", summary)
        if metrics:
            print_metrics(metrics)
        if flags:  # kept, but worth a look: empty scenes, whole-image masks, doubtful pseudo-labels
            stdout.print(f"flagged: {', '.join(f'{n} {f}' for f, n in flags.items())}", highlight=False)
        stdout.print(f"outputs in {printable(str(run.root))}", highlight=False, soft_wrap=True)
    if failed:
        console.print(f"[yellow]{failed} image(s) failed: mlcseg errors {shown(run.root)}[/]", soft_wrap=True)
        raise typer.Exit(3)


def _input_command(name: str, stages: list[str] | None, doc: str) -> None:
    """A command that takes an input (``run``, ``extract``) and runs ``stages`` (None: every stage)."""

    def command(
        out: str = Out,
        backbone: str | None = Backbone,
        weights: str | None = Weights,
        fit: str | None = Fit,
        freeze: bool = Freeze,
        address: str | None = Address,
        config: Path | None = ConfigFile,
        as_json: bool = Json,
        overrides: list[str] | None = Overrides,
        inputs: InputSpec = InputSpec(),
    ) -> None:
        overrides = [*(overrides or []), *([f"fit={fit}"] if fit else []), *(["refit=false"] if freeze else [])]
        _run_stages(stages, out, config, overrides, backbone, weights, address, as_json, inputs)

    command.__doc__, command.__name__ = doc, name
    app.command(name=name)(takes_inputs(command))


_input_command(
    "run",
    None,
    "All stages: ingest, extract, cluster, refine, label, (evaluate), report. A rerun starts from RUN/config.yaml "
    "(key=value overrides change it), resumes, and recomputes what a change touches.",
)
_input_command("extract", ["ingest", "extract"], "Ingest and feature extraction into RUN/features and RUN/images.")


def _stage_command(stage: str, doc: str) -> None:
    def command(
        out: str = Out,
        address: str | None = Address,
        config: Path | None = ConfigFile,
        as_json: bool = Json,
        overrides: list[str] | None = Overrides,
    ) -> None:
        _run_stages([stage], out, config, overrides, None, None, address, as_json)

    command.__doc__ = doc + " Starts from RUN/config.yaml; key=value overrides change it."
    command.__name__ = stage
    app.command(name=stage)(command)


_stage_command("cluster", "Multilevel clustering of a feature store into patch pseudo-masks (RUN/pseudo).")
_stage_command(
    "refine",
    "Upsampling + dense CRF (crf_backend: torch on a GPU share, or DenseCRF) of the pseudo-masks into "
    "full-resolution binary masks (RUN/binary).",
)
_stage_command("label", "Regions, descriptors and K classes: class masks, regions.parquet, COCO JSON.")
_stage_command("report", "Write RUN/report.html: one self-contained file (images inlined).")


# The commands on a finished run folder (results.py) and those that talk to a cluster (jobs.py), in help's order
for name, command in (
    ("errors", results.errors),
    ("verify", results.verify),
    ("eval", results.eval_cmd),
    ("export", results.export),
    ("ablate", results.ablate),
    ("submit", jobs.submit),
    ("status", jobs.status),
    ("logs", jobs.logs),
    ("info", jobs.info),
):
    app.command(name)(command)


class _PrintableFormatter(logging.Formatter):
    """Log lines carry names from the data: their control characters are shown as escapes, never sent raw."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def main() -> None:  # pragma: no cover
    handler = ConsoleHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("mlcseg_ray").setLevel(logging.INFO)
    app()
