"""The ``mlcseg`` command line: one shape for every command (input, --out, --backbone, --weights, --address,
--config, key=value overrides). Results go to stdout (``--json`` for scripts), logs and progress to stderr; every
expected failure is one line on stderr and an exit code from :data:`EXIT_CODES`."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .config import Config, ConfigError
from .progress import console, out as stdout

EXIT_CODES = {
    0: "done: every image has its outputs",
    1: "unexpected internal error (MLCSEG_DEBUG=1 shows the traceback)",
    2: "bad configuration, input or usage; or a stage whose inputs are missing or out of date",
    3: "the run finished, but some images failed (mlcseg errors RUN lists them)",
    4: "the run folder is in use by another run",
    5: "the disk is full or the run folder is not writable",
    6: "no Ray cluster answers at --address",
}

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-free unsupervised segmentation on Ray. Exit codes: " +
                       "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + ".")

# Shared options ------------------------------------------------------------------------------------------------
Images = typer.Option(None, "--images", help="folder of images (recursive)")
Voc = typer.Option(None, "--voc", help="VOC root (VOCdevkit/VOC2012 layout); evaluated at the end")
Split = typer.Option("val", "--split", help="VOC split name")
Coco = typer.Option(None, "--coco", help="COCO image folder (with --ann)")
Ann = typer.Option(None, "--ann", help="COCO instances JSON")
ManifestOpt = typer.Option(None, "--manifest", help="CSV/Parquet with a 'uri' column")
Limit = typer.Option(None, "--limit", min=1, help="only the first N images (in image-id order)")
Sample = typer.Option(None, "--sample", min=1, help="a random sample of N images (see --sample-seed)")
SampleSeed = typer.Option(0, "--sample-seed", help="seed of --sample")
Out = typer.Option(..., "--out", help="run folder")
Backbone = typer.Option(None, "--backbone", help="timm name (default vit_small_patch8_224.dino) or random-vit-s8")
Weights = typer.Option(None, "--weights", help="checkpoint: DINO/DINOv2 .pth, HF or timm safetensors")
Address = typer.Option(None, "--address", help="Ray cluster address ('auto' for a local ray start --head)")
ConfigFile = typer.Option(None, "--config", help="YAML config file")
Json = typer.Option(False, "--json", help="print the result as JSON on stdout")
Overrides = typer.Argument(None, help="key=value config overrides")


def _version(value: bool):
    if value:
        from . import __version__

        stdout.print(f"mlcseg_ray {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="print the version and exit")):
    pass


# Errors --------------------------------------------------------------------------------------------------------
def _error(e) -> None:
    """One line on stderr, never wrapped (scripts and log readers grep it)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind an exception (raised here, or inside a Ray task). Ray Data passes a task's failure on as
    text only (its traceback): there the errno is read from the text."""
    import re

    seen, texts = set(), []
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        texts += [str(e), str(getattr(e, "traceback_str", ""))]
        e = e.__cause__ or getattr(e, "cause", None)
    for text in texts:
        m = re.search(r"\[Errno (\d+)\]", text)
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}


def _unwrap(e: BaseException) -> BaseException:
    """The user-level exception behind Ray's wrappers (a task's traceback is for the logs, not the one line)."""
    seen = set()
    while type(e).__module__.startswith("ray.") and id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def _exit_code(e: BaseException) -> int:
    """Report ``e`` in one line and return its exit code."""
    from .executor import StageFailed, StageOrderError
    from .raytools import ClusterUnreachable
    from .store import RunLocked

    if isinstance(e, RunLocked):
        return _say_error(e, 4)
    if isinstance(e, ClusterUnreachable):
        return _say_error(e, 6)
    stage = e.stage if isinstance(e, StageFailed) else None
    raised = e.__cause__ if isinstance(e, StageFailed) else e
    cause = _unwrap(raised)
    os_err = _os_error(raised)
    if os_err is not None and os_err.errno in STORAGE_ERRNOS:
        where = f" while {stage} wrote" if stage else " writing"
        path = os_err.filename or getattr(e, "where", None) or "the run folder"
        return _say_error(f"{STORAGE_ERRNOS[os_err.errno]}{where} {path}", 5)
    if isinstance(cause, (ConfigError, FileNotFoundError, ValueError, StageOrderError, NotADirectoryError)):
        return _say_error(f"{stage}: {cause}" if stage and not str(cause).startswith(stage) else cause, 2)
    if os.environ.get("MLCSEG_DEBUG"):
        raise e
    return _say_error(f"{'in ' + stage + ': ' if stage else ''}{type(cause).__name__}: {cause} "
                      f"(MLCSEG_DEBUG=1 shows the traceback)", 1)


def _say_error(e, code: int) -> int:
    _error(e)
    return code


def _check_out(out: Path) -> None:
    """Before anything is created: --out must be a folder (or not exist yet) that can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is a file; give a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(parent))


# Runs ----------------------------------------------------------------------------------------------------------
def _config(config: Optional[Path], overrides: Optional[List[str]], backbone=None, weights=None) -> Config:
    extra = list(overrides or [])
    if backbone:
        extra.append(f"backbone={backbone}")
    if weights:
        extra.append(f"weights={weights}")
    return Config.load(config, extra)


def _run_stages(stages, out, config, overrides, backbone, weights, address, as_json=False, **inputs) -> None:
    from .pipeline import Pipeline

    try:
        if config is None and (Path(out) / "config.yaml").is_file():
            config = Path(out) / "config.yaml"  # a rerun starts from the folder's config; overrides change it
        cfg = _config(config, overrides, backbone, weights)  # a bad config creates nothing
        _check_out(out)
        if address:
            from .raytools import init_ray

            init_ray(address)  # an unreachable cluster creates nothing either
        pipe = Pipeline(out, cfg, address=address, **inputs)
        with contextlib.redirect_stdout(sys.stderr):  # Ray's worker logs: stdout is for the result alone
            summary = pipe.run(stages, print_summary=False)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        raise typer.Exit(_exit_code(e))
    _report(pipe, summary, as_json)


def _report(pipe, summary: list[dict], as_json: bool) -> None:
    """The result of a run on stdout: the summary (and metrics), as a table or JSON; exit 3 if images failed."""
    from .progress import summary_table

    run = pipe.run_dir
    failed = pipe.failed_images()
    metrics = json.loads(run.metrics.read_text()) if run.metrics.exists() and any(
        r["stage"] == "evaluate" for r in summary) else None
    rec = run.read_record()
    if as_json:
        payload = {"run": str(run.root), "stages": summary, "images": len(run.read_status()), "failed": failed,
                   "random_weights": bool(rec.get("backbone", {}).get("random_weights"))}
        if metrics:
            payload["metrics"] = {k: v for k, v in metrics.items() if k != "confusion"}
        stdout.print_json(json.dumps(payload, default=str))
    else:
        summary_table(f"mlcseg: {run.root}", summary)
        if metrics:
            from .evaluate import print_metrics

            print_metrics(metrics)
        stdout.print(f"outputs in {run.root}", highlight=False, soft_wrap=True)
    if failed:
        console.print(f"[yellow]{failed} image(s) failed: mlcseg errors {run.root}[/]", soft_wrap=True)
        raise typer.Exit(3)


@app.command()
def run(
    out: Path = Out, images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split,
    coco: Optional[str] = Coco, ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    limit: Optional[int] = Limit, sample: Optional[int] = Sample, sample_seed: int = SampleSeed,
    backbone: Optional[str] = Backbone, weights: Optional[str] = Weights, address: Optional[str] = Address,
    config: Optional[Path] = ConfigFile, as_json: bool = Json, overrides: Optional[List[str]] = Overrides,
):
    """All stages: ingest, extract, cluster, refine, label, (evaluate), report. A rerun starts from RUN/config.yaml
    (key=value overrides change it), resumes, and recomputes what a change touches."""
    _run_stages(None, out, config, overrides, backbone, weights, address, as_json, images=images, voc=voc,
                split=split, coco=coco, ann=ann, manifest=manifest, limit=limit, sample=sample,
                sample_seed=sample_seed)


@app.command()
def extract(
    out: Path = Out, images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split,
    coco: Optional[str] = Coco, ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    limit: Optional[int] = Limit, sample: Optional[int] = Sample, sample_seed: int = SampleSeed,
    backbone: Optional[str] = Backbone, weights: Optional[str] = Weights, address: Optional[str] = Address,
    config: Optional[Path] = ConfigFile, as_json: bool = Json, overrides: Optional[List[str]] = Overrides,
):
    """Ingest and feature extraction into RUN/features and RUN/images."""
    _run_stages(["ingest", "extract"], out, config, overrides, backbone, weights, address, as_json, images=images,
                voc=voc, split=split, coco=coco, ann=ann, manifest=manifest, limit=limit, sample=sample,
                sample_seed=sample_seed)


def _stage_command(stage: str, doc: str):
    def command(
        out: Path = Out, address: Optional[str] = Address, config: Optional[Path] = ConfigFile,
        as_json: bool = Json, overrides: Optional[List[str]] = Overrides,
    ):
        _run_stages([stage], out, config, overrides, None, None, address, as_json)

    command.__doc__ = doc + " Starts from RUN/config.yaml; key=value overrides change it."
    command.__name__ = stage
    app.command(name=stage)(command)


_stage_command("cluster", "Multilevel clustering of a feature store into patch pseudo-masks (RUN/pseudo).")
_stage_command("refine", "Upsampling + DenseCRF of the pseudo-masks into full-resolution binary masks (RUN/binary).")
_stage_command("label", "Regions, descriptors and K classes: class masks, regions.parquet, COCO JSON.")
_stage_command("report", "Write RUN/report.html: one self-contained file (images inlined).")


@app.command()
def errors(run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder"), as_json: bool = Json):
    """What each stage did, every image that failed and why, and the files ingest skipped."""
    from rich.table import Table

    from .store import RunDir

    run = RunDir(run_dir)
    if not run.run_record.exists():
        _error(f"{run_dir} is not a run folder (no run.json)")
        raise typer.Exit(2)
    rec = run.read_record()
    status = run.read_status()
    failed = [r for r in status if r["status"] != "ok"]
    flagged = [r for r in status if r["flag"]]
    skipped = rec.get("skipped_files", {})
    stages = {name: {k: v for k, v in s.items() if k in ("images", "errors", "seconds", "shards_done",
                                                           "shards_skipped")}
              for name, s in rec.get("stages", {}).items()}
    if as_json:
        stdout.print_json(json.dumps({"run": str(run.root), "images": len(status), "stages": stages,
                                      "failed": failed, "flagged": flagged, "skipped_files": skipped}))
        return
    t = Table(title=f"stages of {run.root}")
    for col in ("stage", "images", "errors", "seconds"):
        t.add_column(col)
    for name, s in stages.items():
        t.add_row(name, str(s.get("images", "-")), str(s.get("errors", 0)), str(s.get("seconds", "-")))
    stdout.print(t)
    stdout.print(f"{len(status)} images: {len(status) - len(failed)} ok, {len(failed)} failed, {len(flagged)} "
                 f"flagged (empty or full pseudo-mask)", highlight=False)
    if failed:
        t = Table(title="failed images")
        for col in ("image", "stage", "reason"):
            t.add_column(col)
        for r in failed:
            t.add_row(r["image_id"], r["stage"] or "-", r["error"] or "")
        stdout.print(t)
    if skipped.get("count"):
        stdout.print(f"ingest skipped {skipped['count']} file(s) that are not images by extension "
                     f"({', '.join(f'{k}: {v}' for k, v in skipped.get('by_extension', {}).items())}): "
                     f"{', '.join(skipped.get('files', [])[:20])}", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(
    pred: Path = typer.Argument(..., help="run folder, or a folder of predicted masks"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option("voc21", "--protocol", help="voc21, coco81, cocostuff27, binary, folder"),
    split: str = Split,
    ignore: Optional[int] = typer.Option(None, "--ignore", help="a label value to leave out (folder, binary); "
                                                                "VOC and COCO always ignore 255"),
    matching: str = typer.Option("hungarian", "--matching", help="hungarian or majority (not for binary)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where metrics.json and confusion.png go (default: "
                                                           "the run folder, or PRED_eval/ beside a plain folder)"),
    address: Optional[str] = Address,
    as_json: bool = Json,
):
    """Dataset-wide metrics of predictions against ground truth.

    Predictions and ground truth are matched by file name without extension (PRED/2007_000129.png with
    GT/SegmentationClass/2007_000129.png); a ground-truth image without a prediction counts as all background and is
    listed. Label maps are single-channel PNGs (palette or grey). For --protocol binary, masks may be PNG (0/1, 0/255,
    palette, 1-bit), JPEG (thresholded at 128: lossy edges), BMP, TIFF or GIF; foreground is > 0 and nothing is
    ignored unless --ignore says so; foreground is matched to foreground (no Hungarian matching). Other protocols
    match predicted ids to classes with the Hungarian algorithm over the whole split.
    """
    from .evaluate import evaluate_folder, print_metrics
    from .raytools import check_address

    try:
        check_address(address)
        metrics = evaluate_folder(pred, gt, protocol, split=split, ignore=ignore, matching=matching, out=out,
                                  address=address)
    except Exception as e:  # noqa: BLE001
        raise typer.Exit(_exit_code(e))
    if as_json:
        stdout.print_json(json.dumps({k: v for k, v in metrics.items() if k != "confusion"}))
    else:
        print_metrics(metrics)


@app.command()
def ablate(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder (clustered)"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option("voc21", "--protocol", help="voc21, coco81, cocostuff27, binary, folder: how to "
                                                             "read GT; foreground is every class > 0"),
    split: str = Split,
    ignore: Optional[int] = typer.Option(None, "--ignore", help="a label value to leave out (folder, binary)"),
    refine_top: int = typer.Option(2, "--refine-top", min=0, help="refine this many best rules with the DenseCRF"),
    as_json: bool = Json,
):
    """Foreground IoU of every clustering level and combine rule on a labelled subset, from one cluster run.

    Nothing is extracted or clustered again: the run's pseudo-masks hold the three level masks and each level's
    weight per image. Each rule is scored at patch resolution (upsampled as the refine stage does), and the best
    --refine-top rules also after the DenseCRF. Writes RUN/ablation.json and adds a section to RUN/report.html.
    Pick the winner for your data with combine=RULE (e.g. mlcseg cluster --out RUN combine=image).
    """
    from .ablate import ablate as run_ablation
    from .cluster import read_pseudo
    from .evaluate import load_ground_truth
    from .progress import progress_bar
    from .report import write_report
    from .store import RunDir

    try:
        run = RunDir(run_dir)
        if not run.config.exists():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
        cfg = Config.load(run.config)
        truth = load_ground_truth(gt, protocol, split=split, ignore=ignore)
        if run.read_record().get("backbone", {}).get("random_weights"):
            from .backbones import RANDOM_WEIGHTS_WARNING

            console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]", highlight=False, soft_wrap=True)
        n = len(set(read_pseudo(run, ["image_id"]).column(0).to_pylist()) & set(truth.image_ids))
        with run.lock("mlcseg ablate"), progress_bar("ablate", n * (1 + (refine_top if cfg.crf else 0)),
                                                     "images") as advance:
            result = run_ablation(run, truth, cfg, refine_top, on_image=advance)
            if run.report.exists():
                write_report(run, cfg)
    except Exception as e:  # noqa: BLE001
        raise typer.Exit(_exit_code(e))
    if as_json:
        stdout.print_json(json.dumps(result))
        return
    from rich.table import Table

    t = Table(title=f"foreground IoU on {result['images']} images ({protocol})")
    for col in ("rule", "patch resolution", "after CRF"):
        t.add_column(col, justify="left" if col == "rule" else "right")
    for r in result["rules"]:
        mark = " (configured)" if r["rule"] == result["configured"] else ""
        refined = "-" if r["refined_iou"] is None else f"{r['refined_iou']:.3f}"
        t.add_row(r["rule"] + mark, f"{r['patch_iou']:.3f}", refined)
    stdout.print(t)
    stdout.print(f"best: {result['best']}; best single level: {result['best_single_level']}; "
                 f"notes: {'; '.join(result['notes']) or 'none'}", highlight=False, soft_wrap=True)
    if result["skipped"]:
        stdout.print(f"{len(result['skipped'])} image(s) skipped: {'; '.join(result['skipped'][:5])}",
                     highlight=False, soft_wrap=True)


@app.command()
def submit(
    config: Path = typer.Argument(..., help="YAML config of the run"),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265"),
    out: str = typer.Option(..., "--out", help="run folder, as seen from the cluster (shared storage)"),
    images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split, coco: Optional[str] = Coco,
    ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    limit: Optional[int] = Limit, sample: Optional[int] = Sample, sample_seed: int = SampleSeed,
    gpus: float = typer.Option(0, "--gpus", help="GPUs reserved for the job's driver (entrypoint_num_gpus)"),
    pip: bool = typer.Option(False, "--pip", help="also pip-install the package's requirements in the job's env"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's logs until it ends"),
):
    """Send a whole run to a Ray cluster through the Ray Jobs API; prints the job id."""
    from .jobs import submit_run
    from .raytools import check_address

    try:
        Config.load(config)  # a bad config fails here, not on the cluster
        check_address(address)
        job_id, client = submit_run(config, address, out, dict(images=images, voc=voc, split=split, coco=coco,
                                                                ann=ann, manifest=manifest, limit=limit,
                                                                sample=sample, sample_seed=sample_seed),
                                    gpus=gpus, pip=pip)
    except Exception as e:  # noqa: BLE001
        raise typer.Exit(_exit_code(e))
    print(job_id)
    if follow:
        from .jobs import follow_logs

        status = follow_logs(client, job_id)
        console.print(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str = typer.Argument(...), address: str = typer.Option(..., "--address")):
    """Status of a submitted job."""
    from ray.job_submission import JobSubmissionClient

    print(JobSubmissionClient(address).get_job_status(job_id))


@app.command()
def logs(job_id: str = typer.Argument(...), address: str = typer.Option(..., "--address"),
         follow: bool = typer.Option(False, "--follow")):
    """Logs of a submitted job."""
    from ray.job_submission import JobSubmissionClient

    from .jobs import follow_logs

    client = JobSubmissionClient(address)
    if follow:
        follow_logs(client, job_id)
    else:
        print(client.get_job_logs(job_id), end="")


@app.command()
def info(address: Optional[str] = Address, as_json: bool = Json):
    """Versions, backbones and whether their weights are found, CUDA, the Ray cluster's resources."""
    import importlib.metadata as md

    from rich.table import Table

    from . import __version__
    from .backbones import PRETRAINED_BACKBONES, RANDOM_BACKBONES

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
        try:
            import ray

            from .raytools import init_ray

            init_ray(address)
            cluster = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        except Exception as e:  # noqa: BLE001
            raise typer.Exit(_exit_code(e))
    if as_json:
        stdout.print_json(json.dumps({"version": __version__, "packages": packages, "backbones": backbones,
                                      "cuda": cuda, "ray_cluster": cluster}))
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
    stdout.print(f"Ray cluster at {address}: {cluster}" if address else
                 "Ray: embedded (started per command); pass --address to query a cluster", highlight=False)


def _weights_status(name: str) -> str:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        cached = try_to_load_from_cache(cfg.hf_hub_id, "model.safetensors") if cfg and cfg.hf_hub_id else None
        return f"cached: {cached}" if isinstance(cached, str) else "not cached (use --weights PATH)"
    except Exception as e:  # info must never crash
        return f"unknown ({type(e).__name__})"


def main():  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mlcseg_ray").setLevel(logging.INFO)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
