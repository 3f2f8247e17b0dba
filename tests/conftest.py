import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest

# Ray would otherwise swap 127.0.0.1 for this machine's interface address; tests stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
os.environ.setdefault("YOLO_OFFLINE", "1")  # nor does Ultralytics (the yolo-seg export is read with its loader)
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


# ---------------------------------------------------------------- the session's one world (tests/helpers/world.py)
@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray in this process for the whole session, on loopback only."""
    import ray

    from mlcseg_ray.backends.ray_runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray


# What the session makes once, whatever the number of xdist workers, lives in one folder that the controller (or
# the only process) makes and removes: the head it holds is ended when the session ends.
WORLD = pytest.StashKey[Path]()


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.stash[WORLD] = Path(tempfile.mkdtemp(prefix="mlcseg-world-"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["mlcseg_world"] = str(node.config.stash[WORLD])


def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        return
    from helpers.ray_head import Head

    world = config.stash[WORLD]
    if (world / "cluster.json").exists():
        Head(**json.loads((world / "cluster.json").read_text())).stop()
    shutil.rmtree(world, ignore_errors=True)


@pytest.fixture(scope="session")
def world(pytestconfig) -> Path:
    """The folder of what the session makes once (:func:`helpers.world.made_once`)."""
    workerinput = getattr(pytestconfig, "workerinput", None)
    return Path(workerinput["mlcseg_world"]) if workerinput else pytestconfig.stash[WORLD]


@pytest.fixture(scope="session")
def cluster(world):
    """One ``ray start --head`` for the session, with Ray's default settings (token authentication on)."""
    from helpers.ray_head import Head, start_head
    from helpers.world import made_once

    return Head(**made_once(world, "cluster", lambda: asdict(start_head())))


@pytest.fixture(scope="session")
def s3():
    """One loopback S3 API server for the session (moto's server mode), the photos in ``s3://photos/set/``."""
    from helpers.s3 import S3Server

    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def photos(world):
    from helpers.world import made_once, make_photos

    return Path(made_once(world, "photos", lambda: {"path": str(make_photos(world / "photos"))})["path"])


@pytest.fixture(scope="session")
def tiny_run(photos, cluster, world):
    """The tiny run of ``photos``, joined to the session's Ray head. Read-only: copy it to change it."""
    from helpers.world import Made, made_once, make_run

    def make() -> dict:
        return asdict(make_run(photos, world / "tiny_run", "--address", cluster.address, env=cluster.env))

    return Made(**made_once(world, "tiny_run", make))


@pytest.fixture(scope="session")
def bucket_photos(s3, photos):
    from helpers.world import BUCKET_PHOTOS

    s3.upload(photos, "photos", "set")
    s3.client.create_bucket(Bucket="runs")
    return BUCKET_PHOTOS


@pytest.fixture(scope="session")
def bucket_run(s3, bucket_photos):
    """The same run as ``tiny_run`` with its images and its run folder in the bucket, on an embedded Ray."""
    from helpers.world import BUCKET_RUN, make_run

    return make_run(bucket_photos, BUCKET_RUN, env=s3.env)


# ---------------------------------------------------------------- two workers (make test: pytest -n 2 --dist loadscope)
# A module runs in one worker, so its module fixtures are made once; each worker makes the parts of the session's
# world that its tests ask for. The two bucket modules share the bucket run (a minute to make): one scope.
SHARED_SCOPES = {
    "tests/formats/test_object_storage_inputs.py": "bucket",
    "tests/formats/test_object_storage_runs.py": "bucket",
}
# The longest scopes start first, so that neither worker is left with a long one at the end (their times:
# BENCHMARKS.md, "The test suite's time"); the others follow in collection order.
LONGEST_FIRST = [
    *SHARED_SCOPES,
    "tests/core/test_reliability.py",
    "tests/backends/test_discovery.py",
    "tests/core/test_untrusted_inputs.py",
    "tests/cli/test_cli.py",
    "tests/cli/test_one_line_errors.py",
]


def pytest_collection_modifyitems(config, items):
    if config.getoption("dist", "no") == "loadscope":  # the scheduler takes the scopes in collection order
        rank = {module: n for n, module in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # pytest-xdist's own --dist loadgroup marks groups by rewriting a private node id that pytest 9.2 no longer
    # reads, so the scopes are given to the scheduler here instead.
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # by the order above, not by each scope's number of tests

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_SCOPES.get(module, module)

    return ByModule(config, log)
