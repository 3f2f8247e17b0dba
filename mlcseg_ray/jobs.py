"""``mlcseg submit``: the same run, sent to a remote Ray cluster through the Ray Jobs API."""
from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def entrypoint(out: str, inputs: dict) -> str:
    args = ["python", "-m", "mlcseg_ray.cli", "run", "--config", "config.yaml", "--out", out, "--address", "auto"]
    for key in ("images", "voc", "coco", "ann", "manifest"):
        if inputs.get(key):
            args += [f"--{key}", inputs[key]]
    if inputs.get("voc"):
        args += ["--split", inputs.get("split", "val")]
    for key in ("limit", "sample"):
        if inputs.get(key):
            args += [f"--{key}", str(inputs[key])]
    if inputs.get("sample"):
        args += ["--sample-seed", str(inputs.get("sample_seed", 0))]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(config: Path, pip: bool) -> dict:
    """The config travels as the job's working_dir; the package as a py_module (the cluster needs no install of
    mlcseg_ray itself, only its dependencies, which the deploy/ image has)."""
    work = Path(tempfile.mkdtemp(prefix="mlcseg-job-"))
    shutil.copy(config, work / "config.yaml")
    env = {"working_dir": str(work), "py_modules": [str(PACKAGE_DIR)]}
    if pip:
        import importlib.metadata as md

        env["pip"] = [r.split(";")[0] for r in (md.requires("mlcseg_ray") or []) if "extra ==" not in r]
    return env


def submit_run(config, address: str, out: str, inputs: dict, gpus: float = 0, pip: bool = False):
    from ray.job_submission import JobSubmissionClient

    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config not found: {config}")
    if sum(bool(inputs.get(k)) for k in ("images", "voc", "coco", "manifest")) != 1:
        raise ValueError("give exactly one input: --images, --voc, --coco (with --ann) or --manifest")
    client = JobSubmissionClient(address)
    kwargs = {"entrypoint_num_gpus": gpus} if gpus else {}
    env = runtime_env(config, pip)
    # A cluster that has just started answers "No available agent to submit job, please try again later" until
    # its job agent is up: retry that, for up to two minutes.
    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint(out, inputs), runtime_env=env, **kwargs)
            return job_id, client
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow_logs(client, job_id: str) -> str:
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))
