import os

import pytest

# Ray would otherwise swap 127.0.0.1 for this machine's interface address; tests stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, on loopback only."""
    import ray

    from mlcseg_ray.backends.cluster import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray
