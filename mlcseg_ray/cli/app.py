"""The ``mlcseg`` command line: one shape for every command (input, --out, --backbone, --weights, --address,
--config, key=value overrides). Results go to stdout (``--json`` for scripts), logs and progress to stderr; every
expected failure is one line on stderr and an exit code from :data:`~mlcseg_ray.cli.errors.EXIT_CODES`.

Heavy modules (torch, Ray, the stages) are imported inside the commands, so that ``mlcseg --help`` and a bad
option answer at once."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..core.config import Config, parse_overrides
from ..core.inputs import INPUT_FIELDS, InputSpec
from ..core.progress import console, shown
from ..core.progress import out as stdout
from ..core.store import printable
from .errors import EXIT_CODES, error, one_line_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Training-free unsupervised segmentation on Ray. Exit codes: "
    + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
    + ".",
)

# Shared options ------------------------------------------------------------------------------------------------
Split = typer.Option("val", "--split", help="VOC split name")
# The input options, declared once: every command that takes an input gets them all (:func:`takes_inputs`).
INPUT_OPTIONS: dict[str, tuple[Any, Any]] = {
    "images": (
        str | None,
        typer.Option(None, "--images", help="folder or bucket prefix (s3://, gs://) of images, recursive"),
    ),
    "voc": (
        str | None,
        typer.Option(None, "--voc", help="VOC root (VOCdevkit/VOC2012 layout); evaluated at the end"),
    ),
    "split": (str, Split),
    "coco": (str | None, typer.Option(None, "--coco", help="COCO image folder (with --ann)")),
    "ann": (str | None, typer.Option(None, "--ann", help="COCO instances JSON")),
    "manifest": (str | None, typer.Option(None, "--manifest", help="CSV/Parquet with a 'uri' column")),
    "limit": (int | None, typer.Option(None, "--limit", min=1, help="only the first N images (in image-id order)")),
    "sample": (
        int | None,
        typer.Option(None, "--sample", min=1, help="a random sample of N images (see --sample-seed)"),
    ),
    "sample_seed": (int, typer.Option(0, "--sample-seed", help="seed of --sample")),
}
assert tuple(INPUT_OPTIONS) == INPUT_FIELDS, "every input field has its option"
Out = typer.Option(..., "--out", help="run folder")
Backbone = typer.Option(None, "--backbone", help="timm name (default vit_small_patch8_224.dino) or random-vit-s8")
Weights = typer.Option(None, "--weights", help="checkpoint: DINO/DINOv2 .pth, HF or timm safetensors")
Address = typer.Option(None, "--address", help="Ray cluster address ('auto' for a local ray start --head)")
ConfigFile = typer.Option(None, "--config", help="YAML config file")
Json = typer.Option(False, "--json", help="print the result as JSON on stdout")
Overrides = typer.Argument(None, help="key=value config overrides")


def takes_inputs(command: Callable[..., None]) -> Callable[..., None]:
    """Gives ``command`` the input options of :data:`INPUT_OPTIONS`; it receives them as one ``inputs:
    InputSpec``."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "inputs"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in INPUT_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        spec = InputSpec(**{name: kwargs.pop(name) for name in INPUT_FIELDS})
        command(inputs=spec, **kwargs)

    wrapper.__signature__ = sig.replace(
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's
    return wrapper


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
    from ..core.storage import use_endpoint
    from ..core.store import RunDir
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
    from ..core.store import atomic_write_bytes

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
        address: str | None = Address,
        config: Path | None = ConfigFile,
        as_json: bool = Json,
        overrides: list[str] | None = Overrides,
        inputs: InputSpec = InputSpec(),
    ) -> None:
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


@app.command()
def errors(run_dir: str = typer.Argument(..., metavar="RUN", help="run folder"), as_json: bool = Json) -> None:
    """What each stage did, every image that failed and why, and the files ingest skipped."""
    from rich.table import Table

    from ..core.store import RunDir

    run = RunDir(run_dir)
    if not run.run_record.exists():
        error(f"{run_dir} is not a run folder (no run.json)")
        raise typer.Exit(2)
    rec = run.read_record()
    images = run.status_summary().images
    problems = run.read_status(problems_only=True)  # the failed and the flagged: what this command lists
    failed = [r for r in problems if r["status"] != "ok"]
    flagged = [r for r in problems if r["flag"]]
    flag_counts = dict(sorted(Counter(r["flag"] for r in flagged).items()))
    skipped = rec.get("skipped_files", {})
    stages = {
        name: {k: v for k, v in s.items() if k in ("images", "errors", "seconds", "shards_done", "shards_skipped")}
        for name, s in rec.get("stages", {}).items()
    }
    if as_json:
        stdout.print_json(
            json.dumps(
                {
                    "run": str(run.root),
                    "images": images,
                    "stages": stages,
                    "failed": failed,
                    "flagged": flagged,
                    "flag_counts": flag_counts,
                    "skipped_files": skipped,
                }
            )
        )
        return
    t = Table(title=f"stages of {printable(str(run.root))}")
    for col in ("stage", "images", "errors", "seconds"):
        t.add_column(col)
    for name, s in stages.items():
        t.add_row(name, str(s.get("images", "-")), str(s.get("errors", 0)), str(s.get("seconds", "-")))
    stdout.print(t)
    stdout.print(
        f"{images} images: {images - len(failed)} ok, {len(failed)} failed, {len(flagged)} flagged"
        + (f" ({', '.join(f'{n} {f}' for f, n in flag_counts.items())})" if flagged else ""),
        highlight=False,
    )
    if failed:
        t = Table(title="failed images")
        for col in ("image", "stage", "reason"):
            t.add_column(col)
        for r in failed:
            t.add_row(printable(r["image_id"]), r["stage"] or "-", printable(r["error"] or ""))
        stdout.print(t)
    if skipped.get("count"):
        stdout.print(
            f"ingest skipped {skipped['count']} file(s) that are not images by extension "
            f"({', '.join(f'{k}: {v}' for k, v in skipped.get('by_extension', {}).items())}): "
            f"{printable(', '.join(skipped.get('files', [])[:20]))}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def verify(run_dir: str = typer.Argument(..., metavar="RUN", help="run folder"), as_json: bool = Json) -> None:
    """Check every output the run folder records (present, same size and checksum, Parquet readable); changes
    nothing. Exit 8 when something is damaged: a rerun of the same command recomputes just that."""
    from ..core.integrity import verify_run
    from ..core.store import RunDir

    run = RunDir(run_dir)
    if not run.run_record.exists():
        error(f"{run_dir} is not a run folder (no run.json)")
        raise typer.Exit(2)
    report = verify_run(run)
    damaged = {stage: problems for stage, problems in report.items() if problems}
    if as_json:
        stdout.print_json(json.dumps({"run": str(run.root), "stages": report, "damaged": bool(damaged)}))
    else:
        for stage, problems in report.items():
            stdout.print(f"{stage}: {'ok' if not problems else f'{len(problems)} problem(s)'}", highlight=False)
            for p in problems[:20]:
                stdout.print(f"  {printable(p)}", highlight=False, soft_wrap=True)
            if len(problems) > 20:
                stdout.print(f"  ... and {len(problems) - 20} more", highlight=False)
    if damaged:
        console.print(
            f"[yellow]damaged: rerun `mlcseg run --out {shown(run.root)}` to recompute what is listed[/]",
            soft_wrap=True,
        )
        raise typer.Exit(8)


@app.command("eval")
def eval_cmd(
    pred: str = typer.Argument(..., help="run folder, or a folder of predicted masks"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option("voc21", "--protocol", help="voc21, coco81, cocostuff27, binary, folder"),
    split: str = Split,
    ignore: int | None = typer.Option(
        None, "--ignore", help="a label value to leave out (folder, binary); VOC and COCO always ignore 255"
    ),
    matching: str = typer.Option("hungarian", "--matching", help="hungarian or majority (not for binary)"),
    out: str | None = typer.Option(
        None,
        "--out",
        help="where metrics.json and confusion.png go (default: the run folder, or PRED_eval/ beside a plain folder)",
    ),
    address: str | None = Address,
    as_json: bool = Json,
) -> None:
    """Dataset-wide metrics of predictions against ground truth.

    Predictions and ground truth are matched by file name without extension (PRED/2007_000129.png with
    GT/SegmentationClass/2007_000129.png); a ground-truth image without a prediction counts as all background and is
    listed. Label maps are single-channel PNGs (palette or grey). For --protocol binary, masks may be PNG (0/1, 0/255,
    palette, 1-bit), JPEG (thresholded at 128: lossy edges), BMP, TIFF or GIF; foreground is > 0 and nothing is
    ignored unless --ignore says so; foreground is matched to foreground (no Hungarian matching). Other protocols
    match predicted ids to classes with the Hungarian algorithm over the whole split.
    """
    from ..backends import make_backend
    from ..backends.ray_runtime import check_address
    from ..library.evaluation import evaluate_folder
    from .console import print_metrics

    with one_line_errors():
        map_fn = None
        if address:  # the evaluation's chunks as tasks on that cluster
            check_address(address)
            map_fn = make_backend("ray", address).map
        metrics = evaluate_folder(
            pred, gt, protocol, split=split, ignore=ignore, matching=matching, out=out, map_fn=map_fn, remember=True
        )
    if as_json:
        stdout.print_json(json.dumps({k: v for k, v in metrics.items() if k != "confusion"}))
    else:
        print_metrics(metrics)


@app.command()
def export(
    run_dir: str = typer.Argument(..., metavar="RUN", help="run folder (labelled)"),
    fmt: str = typer.Option(..., "--format", help="coco, voc or yolo-seg"),
    out: str = typer.Option(..., "--out", help="where the dataset goes: a folder or a bucket prefix"),
    copy_images: bool = typer.Option(
        False, "--copy-images", help="copy the images in (coco: images/, voc: JPEGImages/); yolo-seg always does"
    ),
    min_confidence: float | None = typer.Option(None, "--min-confidence", help="only images at least this sure"),
    max_confidence: float | None = typer.Option(
        None, "--max-confidence", help="only images at most this sure (the doubtful ones, for review)"
    ),
    as_json: bool = Json,
) -> None:
    """The run's pseudo-labels as a dataset the next tool loads: coco (detectron2, mmdetection, Datumaro, FiftyOne),
    voc (CVAT's segmentation-mask import, Datumaro, mmsegmentation), yolo-seg (Ultralytics)."""
    from ..core.store import RunDir
    from ..formats.exports import export_run

    with one_line_errors(out):
        run = RunDir(run_dir)
        if not run.run_record.exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json)")
        done = export_run(run, fmt, out, copy_images, min_confidence, max_confidence)
    if as_json:
        stdout.print_json(json.dumps(done.__dict__))
    else:
        stdout.print(
            f"{done.format}: {done.images} images, {done.annotations} regions, {done.classes} classes in "
            f"{printable(done.out)}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def ablate(
    run_dir: str = typer.Argument(..., metavar="RUN", help="run folder (clustered)"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option(
        "voc21",
        "--protocol",
        help="voc21, coco81, cocostuff27, binary, folder: how to read GT; foreground is every class > 0",
    ),
    split: str = Split,
    ignore: int | None = typer.Option(None, "--ignore", help="a label value to leave out (folder, binary)"),
    refine_top: int = typer.Option(2, "--refine-top", min=0, help="refine this many best rules with the run's CRF"),
    as_json: bool = Json,
) -> None:
    """Foreground IoU of every clustering level and combine rule on a labelled subset, from one cluster run.

    Nothing is extracted or clustered again: the run's pseudo-masks hold the three level masks and each level's
    weight per image. Each rule is scored at patch resolution (upsampled as the refine stage does), and the best
    --refine-top rules also after the run's CRF. Writes RUN/ablation.json and adds a section to RUN/report.html.
    Pick the winner for your data with combine=RULE (e.g. mlcseg cluster --out RUN combine=image).
    """
    from ..core.progress import progress_bar
    from ..core.store import RunDir
    from ..formats.datasets import load_ground_truth
    from ..library.clustering import read_pseudo
    from ..library.report_page import write_report
    from ..models.backbones import untrained_warning
    from ..tools.ablate import ablate as run_ablation
    from .console import print_ablation

    with one_line_errors():
        run = RunDir(run_dir)
        if not run.config.exists():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
        cfg = Config.load(run.config)
        truth = load_ground_truth(gt, protocol, split=split, ignore=ignore)
        warning = untrained_warning(run.read_record().get("backbone", {}))
        if warning:
            console.print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
        clustered = read_pseudo(run, ["image_id"])
        ids = set(clustered.column(0).to_pylist()) if clustered.num_rows else set()
        if not ids:
            raise ValueError(
                f"{run_dir} has no clustered image (every image failed, or cluster has not run): "
                f"`mlcseg errors {run_dir}` says why"
            )
        n = len(ids & set(truth.image_ids))
        with (
            run.lock("mlcseg ablate"),
            progress_bar("ablate", n * (1 + (refine_top if cfg.crf else 0)), "images") as advance,
        ):
            result = run_ablation(run, truth, cfg, refine_top, on_image=advance)
            if run.report.exists():
                write_report(run, cfg)
    if as_json:
        stdout.print_json(json.dumps(result))
        return
    print_ablation(result, protocol)


@app.command()
@takes_inputs
def submit(
    config: Path = typer.Argument(..., help="YAML config of the run"),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265"),
    out: str = typer.Option(..., "--out", help="run folder, as seen from the cluster (shared storage)"),
    gpus: float = typer.Option(0, "--gpus", help="GPUs reserved for the job's driver (entrypoint_num_gpus)"),
    pip: bool = typer.Option(False, "--pip", help="also pip-install the package's requirements in the job's env"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's logs until it ends"),
    inputs: InputSpec = InputSpec(),
) -> None:
    """Send a whole run to a Ray cluster through the Ray Jobs API; prints the job id."""
    from ..backends.ray_runtime import check_address
    from ..tools.jobs import follow_logs, submit_run

    with one_line_errors():
        Config.load(config)  # a bad config fails here, not on the cluster
        check_address(address)
        job_id, client = submit_run(config, address, out, inputs, gpus=gpus, pip=pip)
    print(job_id)
    if follow:
        status = follow_logs(client, job_id)
        console.print(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str = typer.Argument(...), address: str = typer.Option(..., "--address")) -> None:
    """Status of a submitted job."""
    from ..tools.jobs import job_call

    with one_line_errors():
        print(job_call(address, lambda client: client.get_job_status(job_id)))


@app.command()
def logs(
    job_id: str = typer.Argument(...),
    address: str = typer.Option(..., "--address"),
    follow: bool = typer.Option(False, "--follow"),
) -> None:
    """Logs of a submitted job."""
    from ..tools.jobs import follow_logs, job_call

    with one_line_errors():
        if follow:
            job_call(address, lambda client: follow_logs(client, job_id))
        else:
            print(job_call(address, lambda client: client.get_job_logs(job_id)), end="")


@app.command()
def info(address: str | None = Address, as_json: bool = Json) -> None:
    """Versions, backbones and whether their weights are found, CUDA, the Ray cluster's resources."""
    import importlib.metadata as md

    from rich.table import Table

    from .. import __version__
    from ..models.backbones import PRETRAINED_BACKBONES, RANDOM_BACKBONES

    packages = {}
    for pkg in ("torch", "timm", "ray", "faiss-cpu", "pyarrow", "numpy", "pydensecrf2", "pycocotools"):
        try:
            packages[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            packages[pkg] = None
    backbones = {name: _weights_status(name) for name in PRETRAINED_BACKBONES}
    backbones.update({name: "random (tests/demo only)" for name in RANDOM_BACKBONES})
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except Exception:  # info must never crash
        cuda = False
    cluster = None
    if address:
        from ..backends.ray_runtime import cluster_resources, init_ray

        with one_line_errors():
            init_ray(address)
            cluster = cluster_resources()
    if as_json:
        stdout.print_json(
            json.dumps(
                {
                    "version": __version__,
                    "packages": packages,
                    "backbones": backbones,
                    "cuda": cuda,
                    "ray_cluster": cluster,
                }
            )
        )
        return
    t = Table(title=f"mlcseg_ray {__version__}")
    t.add_column("package")
    t.add_column("version")
    for pkg, v in packages.items():
        t.add_row(pkg, v or "not installed")
    stdout.print(t)
    b = Table(title="backbones")
    b.add_column("name")
    b.add_column("weights")
    for name, w in backbones.items():
        b.add_row(name, w)
    stdout.print(b)
    stdout.print(f"CUDA available: {cuda}", highlight=False)
    stdout.print(
        f"Ray cluster at {address}: {cluster}"
        if address
        else "Ray: embedded (started per command); pass --address to query a cluster",
        highlight=False,
    )


def _weights_status(name: str) -> str:
    from ..models.backbones import cached_weights

    try:
        cached = cached_weights(name)
        return f"cached: {cached}" if cached else "not cached (use --weights PATH)"
    except Exception as e:  # info must never crash
        return f"unknown ({type(e).__name__})"


class _PrintableFormatter(logging.Formatter):
    """Log lines carry names from the data: their control characters are shown as escapes, never sent raw."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def main() -> None:  # pragma: no cover
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("mlcseg_ray").setLevel(logging.INFO)
    app()
