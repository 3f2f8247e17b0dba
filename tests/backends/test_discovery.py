"""How Ray is found, as a user meets it: a ``ray start --head`` running beside an embedded run, a stale record of
one, ``--address auto`` and ``HOST:PORT`` to a loopback-only head, and job submission to a head with Ray's default
token authentication (the session's head, ``cluster``)."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY, copy_voc_images, mlcseg
from helpers.ray_head import end, free_port, started_under

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

QUICK = [*TINY, "max_side=64", "shard_size=2"]


def _run(images, out, env, *extra, command="run", timeout=300):
    t0 = time.monotonic()
    res = mlcseg(command, "--images", images, "--out", out, "--json", *QUICK, *extra, env=env, timeout=timeout)
    return res, time.monotonic() - t0


def _backend(run) -> dict:
    return json.loads((run / "run.json").read_text())["backend"]


def test_embedded_and_joined_runs_find_the_right_ray(cluster, tiny_run, tmp_path):
    """Which Ray a command finds, told by an extraction (the first stage that starts Ray); a whole run joined to the
    head is the session's ``tiny_run``."""
    images = copy_voc_images(tmp_path / "images", 2)
    env = cluster.env
    assert Path(env["RAY_TMPDIR"], "ray", "ray_current_cluster").read_text().strip() == cluster.address
    assert _backend(Path(tiny_run.out)) == {"name": "ray", "embedded": False, "address": cluster.address}

    # no --address beside a running head: a Ray of its own, on loopback
    res, _ = _run(images, tmp_path / "embedded", env, command="extract")
    assert res.returncode == 0, res.stderr[-3000:]
    ray_info = _backend(tmp_path / "embedded")
    assert ray_info["embedded"] and ray_info["address"] != cluster.address, ray_info

    # --address auto and HOST:PORT join that head
    for address in ("auto", cluster.address):
        out = tmp_path / f"joined-{address.replace(':', '_')}"
        res, _ = _run(images, out, env, "--address", address, command="extract")
        assert res.returncode == 0, (address, res.stderr[-3000:])
        assert _backend(out)["address"] == cluster.address and not _backend(out)["embedded"], _backend(out)

    # a head that is gone leaves its record (an address no one answers at): an embedded run does not wait on it,
    # `auto` says so at once
    stale = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
    (stale / "ray").mkdir()
    (stale / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    stale_env = {**env, "RAY_TMPDIR": str(stale)}
    try:
        res, seconds = _run(images, tmp_path / "after", stale_env, command="extract", timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _backend(tmp_path / "after")["embedded"]
        res, seconds = _run(images, tmp_path / "auto-stale", stale_env, "--address", "auto", timeout=120)
        assert res.returncode == 6 and seconds < 60, (res.returncode, seconds, res.stderr[-2000:])
        assert res.stderr.count("\n") == 1 and "no Ray cluster answers" in res.stderr
        assert not (tmp_path / "auto-stale").exists()  # an unreachable cluster creates nothing
    finally:
        end(started_under(str(stale)))
        shutil.rmtree(stale, ignore_errors=True)


def test_an_address_that_is_no_address_is_a_usage_error(tmp_path):
    res = mlcseg("run", "--images", tmp_path, "--out", tmp_path / "run", "--address", "foo:bar:baz", timeout=60)
    assert res.returncode == 2 and "is not HOST:PORT" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_jobs_with_rays_default_token_authentication(cluster, tmp_path):
    """Submission, status and logs against a head as Ray 2.60 starts it (token on), and each failure one line."""
    images = copy_voc_images(tmp_path / "images", 2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("\n".join(t.replace("=", ": ") for t in QUICK) + "\n")
    env, url = cluster.env, cluster.dashboard_url
    res = mlcseg(
        "submit",
        cfg,
        "--address",
        url,
        "--images",
        images,
        "--out",
        tmp_path / "run",
        "--follow",
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " INFO " not in res.stderr  # no packaging chatter from Ray
    job_id = res.stdout.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in mlcseg("status", job_id, "--address", url, env=env).stdout
    assert "mlcseg" in mlcseg("logs", job_id, "--address", url, env=env).stdout
    assert len(list((tmp_path / "run" / "masks").glob("*.png"))) == 2

    bad = mlcseg("status", "raysubmit_nosuchjob", "--address", url, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no job" in bad.stderr, bad.stderr
    home = tmp_path / "home"  # a machine without the head's token
    no_token = {**env, "HOME": str(home), "RAY_AUTH_TOKEN_PATH": ""}
    no_token.pop("RAY_AUTH_TOKEN", None)
    bad = mlcseg("status", job_id, "--address", url, env=no_token)
    assert bad.returncode == 7 and bad.stderr.count("\n") == 1 and "token" in bad.stderr, bad.stderr
    bad = mlcseg("logs", job_id, "--address", url, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert bad.returncode == 7 and bad.stderr.count("\n") == 1 and "refused" in bad.stderr, bad.stderr
    gone = f"http://127.0.0.1:{free_port()}"  # a head that is gone: no one answers at its dashboard's address
    bad = mlcseg("status", job_id, "--address", gone, env=env, timeout=60)
    assert bad.returncode == 6 and bad.stderr.count("\n") == 1, bad.stderr
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"  # these tests ran with Ray's default authentication
