"""``mlcseg submit``: the same run, sent to a remote Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from ..core.errors import ClusterAuthError, ClusterUnreachable
from ..core.inputs import INPUT_FIELDS, InputSpec

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # mlcseg_ray/, shipped as a py_module


def entrypoint(out: str, inputs: InputSpec) -> str:
    """The job's command: ``mlcseg run`` on the cluster, with the same input options as given here."""
    args = ["python", "-m", "mlcseg_ray.cli", "run", "--config", "config.yaml", "--out", out, "--address", "auto"]
    defaults = InputSpec()
    for name in INPUT_FIELDS:
        value = getattr(inputs, name)
        if value is not None and value != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", str(value)]
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


def auth_token() -> str | None:
    """The cluster token, where Ray keeps it (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names,
    ``~/.ray/auth_token``); None where there is none or ``RAY_AUTH_MODE=disabled``. Ray's own client sends it only
    when ``RAY_AUTH_MODE=token`` is set in the caller's environment, while Ray 2.60's ``ray start --head`` turns
    token authentication on without it."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def job_client(address: str) -> JobSubmissionClient:
    """A Ray Jobs client for the dashboard at ``address``, sending the cluster token where there is one. A
    refused token or a cluster that wants one is :class:`ClusterAuthError`; no dashboard there, ClusterUnreachable."""
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if not os.environ.get("MLCSEG_DEBUG"):  # Ray's INFO lines (packaging, uploads) are not the tool's output
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise ClusterAuthError(_auth_message(address, token, e)) from None
    except ConnectionError as e:
        raise ClusterUnreachable(f"no Ray dashboard answers at --address {address} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _auth_message(address: str, token: str | None, e: BaseException) -> str:
    if token is None:
        return (
            f"the Ray cluster at {address} wants a token and none was found: set RAY_AUTH_TOKEN (or "
            f"RAY_AUTH_TOKEN_PATH), or copy the head's ~/.ray/auth_token here"
        )
    return f"the Ray cluster at {address} refused the token ({_first_line(e)}): is it this cluster's token?"


def job_call(address: str, call: Callable[[JobSubmissionClient], object]) -> object:
    """``call(client)`` with the Jobs API's failures as one-line errors: an unknown job id, a refused token, no
    dashboard at ``address``."""
    client = job_client(address)
    try:
        return call(client)
    except AuthenticationError as e:
        raise ClusterAuthError(_auth_message(address, auth_token(), e)) from None
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise ValueError(f"no job with that id at {address}: {_first_line(e)}") from None
        raise


def submit_run(
    config: Path, address: str, out: str, inputs: InputSpec, gpus: float = 0, pip: bool = False
) -> tuple[str, JobSubmissionClient]:
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config not found: {config}")
    inputs.validate()
    client = job_client(address)
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


def follow_logs(client: JobSubmissionClient, job_id: str) -> str:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))
