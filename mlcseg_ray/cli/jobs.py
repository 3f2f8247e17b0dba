"""The commands that talk to a Ray cluster: jobs (submit, status, logs) and what a machine or cluster has (info)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..core.config import Config
from ..core.inputs import InputSpec
from ..core.progress import console
from ..core.progress import out as stdout
from .errors import one_line_errors
from .options import Address, Json, takes_inputs


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


def status(job_id: str = typer.Argument(...), address: str = typer.Option(..., "--address")) -> None:
    """Status of a submitted job."""
    from ..tools.jobs import job_call

    with one_line_errors():
        print(job_call(address, lambda client: client.get_job_status(job_id)))


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


def info(address: str | None = Address, as_json: bool = Json) -> None:
    """Versions, backbones and whether their weights are found, CUDA, the Ray cluster's resources."""
    import importlib.metadata as md

    from rich.table import Table

    from .. import __version__
    from ..models.backbones import PRETRAINED_BACKBONES, RANDOM_BACKBONES, SIMULATED_BACKBONE

    packages = {}
    for pkg in ("torch", "timm", "ray", "faiss-cpu", "pyarrow", "numpy", "pydensecrf2", "pycocotools"):
        try:
            packages[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            packages[pkg] = None
    backbones = {name: _weights_status(name) for name in PRETRAINED_BACKBONES}
    backbones.update({name: "random (tests/demo only)" for name in RANDOM_BACKBONES})
    backbones[SIMULATED_BACKBONE] = "simulated (a timing stand-in, never for results)"
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
