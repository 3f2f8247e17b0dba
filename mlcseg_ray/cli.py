"""The ``mlcseg`` command line: one shape for every command (input, --out, --backbone, --weights, --address,
--config, key=value overrides)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .config import Config, ConfigError
from .progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free unsupervised segmentation on Ray.")

# Shared options ------------------------------------------------------------------------------------------------
Images = typer.Option(None, "--images", help="folder of images (recursive)")
Voc = typer.Option(None, "--voc", help="VOC root (VOCdevkit/VOC2012 layout)")
Split = typer.Option("val", "--split", help="VOC split name")
Coco = typer.Option(None, "--coco", help="COCO image folder (with --ann)")
Ann = typer.Option(None, "--ann", help="COCO instances JSON")
ManifestOpt = typer.Option(None, "--manifest", help="CSV/Parquet with a 'uri' column")
Out = typer.Option(..., "--out", help="run folder")
Backbone = typer.Option(None, "--backbone", help="timm name (default vit_small_patch8_224.dino) or random-vit-s8")
Weights = typer.Option(None, "--weights", help="checkpoint: DINO/DINOv2 .pth, HF or timm safetensors")
Address = typer.Option(None, "--address", help="Ray cluster address ('auto' for a local ray start --head)")
ConfigFile = typer.Option(None, "--config", help="YAML config file")
Overrides = typer.Argument(None, help="key=value config overrides")


def _error(e) -> None:
    """One line on stderr, never wrapped (scripts and log readers grep it)."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)


def _config(config: Optional[Path], overrides: Optional[List[str]], backbone=None, weights=None) -> Config:
    extra = list(overrides or [])
    if backbone:
        extra.append(f"backbone={backbone}")
    if weights:
        extra.append(f"weights={weights}")
    return Config.load(config, extra)


def _pipeline(out, cfg, address, images=None, voc=None, split="val", coco=None, ann=None, manifest=None, **kw):
    from .pipeline import Pipeline

    return Pipeline(
        out, cfg, images=images, voc=voc, split=split, coco=coco, ann=ann, manifest=manifest, address=address, **kw
    )


def _finish(pipe) -> None:
    failed = pipe.failed_images()
    console.print(f"outputs in [bold]{pipe.run_dir.root}[/]")
    if failed:
        console.print(f"[yellow]{failed} image(s) failed; see status/error in {pipe.run_dir.status}[/]")
        raise typer.Exit(3)


def _run_stages(stages, out, config, overrides, backbone, weights, address, **inputs) -> None:
    from .executor import StageOrderError
    from .store import RunLocked

    try:
        cfg = _config(config, overrides, backbone, weights)
        pipe = _pipeline(out, cfg, address, **inputs)
        pipe.run(stages)
    except RunLocked as e:
        _error(e)
        raise typer.Exit(4)
    except (ConfigError, FileNotFoundError, ValueError, StageOrderError) as e:
        _error(e)
        raise typer.Exit(2)
    _finish(pipe)


@app.command()
def run(
    out: Path = Out, images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split,
    coco: Optional[str] = Coco, ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    backbone: Optional[str] = Backbone, weights: Optional[str] = Weights, address: Optional[str] = Address,
    config: Optional[Path] = ConfigFile, overrides: Optional[List[str]] = Overrides,
):
    """All stages: ingest, extract, cluster, refine, label, (evaluate), report. Rerun to resume."""
    _run_stages(None, out, config, overrides, backbone, weights, address,
                images=images, voc=voc, split=split, coco=coco, ann=ann, manifest=manifest)


@app.command()
def extract(
    out: Path = Out, images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split,
    coco: Optional[str] = Coco, ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    backbone: Optional[str] = Backbone, weights: Optional[str] = Weights, address: Optional[str] = Address,
    config: Optional[Path] = ConfigFile, overrides: Optional[List[str]] = Overrides,
):
    """Ingest and feature extraction into RUN/features and RUN/images."""
    _run_stages(["ingest", "extract"], out, config, overrides, backbone, weights, address,
                images=images, voc=voc, split=split, coco=coco, ann=ann, manifest=manifest)


def _stage_command(stage: str, doc: str):
    def command(
        out: Path = Out, address: Optional[str] = Address, config: Optional[Path] = ConfigFile,
        overrides: Optional[List[str]] = Overrides,
    ):
        cfg_file = config or (out / "config.yaml" if (out / "config.yaml").exists() else None)
        _run_stages([stage], out, cfg_file, overrides, None, None, address)

    command.__doc__ = doc
    command.__name__ = stage
    app.command(name=stage)(command)


_stage_command("cluster", "Multilevel clustering of a feature store into patch pseudo-masks (RUN/pseudo).")
_stage_command("refine", "Upsampling + DenseCRF of the pseudo-masks into full-resolution binary masks (RUN/binary).")
_stage_command("label", "Regions, descriptors and K classes: class masks, regions.parquet, COCO JSON.")
_stage_command("report", "Write RUN/report.html.")


@app.command("eval")
def eval_cmd(
    pred: Path = typer.Argument(..., help="run folder or folder of predicted label PNGs"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder / instances JSON, label folder"),
    protocol: str = typer.Option("voc21", "--protocol", help="voc21, coco81, cocostuff27, binary, folder"),
    split: str = Split,
    ignore: int = typer.Option(255, "--ignore", help="ignore value (folder protocol)"),
    matching: str = typer.Option("hungarian", "--matching", help="hungarian or majority"),
    out: Optional[Path] = typer.Option(None, "--out", help="where metrics.json goes (default: PRED if a run)"),
    address: Optional[str] = Address,
):
    """Dataset-wide Hungarian-matched mIoU of predictions against ground truth."""
    from .evaluate import EvalError, evaluate_folder, print_metrics

    try:
        metrics = evaluate_folder(pred, gt, protocol, split=split, ignore=ignore, matching=matching, out=out,
                                  address=address)
    except (EvalError, FileNotFoundError, ValueError) as e:
        _error(e)
        raise typer.Exit(2)
    print_metrics(metrics)


@app.command()
def submit(
    config: Path = typer.Argument(..., help="YAML config of the run"),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265"),
    out: str = typer.Option(..., "--out", help="run folder, as seen from the cluster (shared storage)"),
    images: Optional[str] = Images, voc: Optional[str] = Voc, split: str = Split, coco: Optional[str] = Coco,
    ann: Optional[str] = Ann, manifest: Optional[str] = ManifestOpt,
    gpus: float = typer.Option(0, "--gpus", help="GPUs reserved for the job's driver (entrypoint_num_gpus)"),
    pip: bool = typer.Option(False, "--pip", help="also pip-install the package's requirements in the job's env"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's logs until it ends"),
):
    """Send a whole run to a Ray cluster through the Ray Jobs API; prints the job id."""
    from .jobs import submit_run

    try:
        Config.load(config)  # a bad config fails here, not on the cluster
        job_id, client = submit_run(config, address, out, dict(images=images, voc=voc, split=split, coco=coco,
                                                                ann=ann, manifest=manifest), gpus=gpus, pip=pip)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, ConnectionError) as e:
        _error(e)
        raise typer.Exit(2)
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
def info(address: Optional[str] = Address):
    """Versions, backbones and whether their weights are found, Ray status."""
    import importlib.metadata as md

    from rich.table import Table

    from . import __version__
    from .backbones import PRETRAINED_BACKBONES, RANDOM_BACKBONES

    t = Table(title=f"mlcseg_ray {__version__}")
    t.add_column("package")
    t.add_column("version")
    for pkg in ("torch", "timm", "ray", "faiss-cpu", "pyarrow", "numpy", "pydensecrf2", "pycocotools"):
        try:
            t.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            t.add_row(pkg, "not installed")
    console.print(t)
    b = Table(title="backbones")
    b.add_column("name")
    b.add_column("weights")
    for name in PRETRAINED_BACKBONES:
        b.add_row(name, _weights_status(name))
    for name in RANDOM_BACKBONES:
        b.add_row(name, "random (tests/demo only)")
    console.print(b)
    try:
        import torch

        console.print(f"CUDA available: {torch.cuda.is_available()}")
    except Exception:
        pass
    if address:
        import ray

        ray.init(address=address, logging_level=logging.ERROR)
        console.print(f"Ray cluster at {address}: {ray.cluster_resources()}")
    else:
        console.print("Ray: embedded (started per command); pass --address to query a cluster")


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
