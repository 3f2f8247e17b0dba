"""Cluster launcher YAMLs validate against the schema that ships inside the ray package; Kubernetes manifests have
the KubeRay shape; the Docker image's Ray version is the one the package pins."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_yaml_matches_ray_schema(name):
    cfg = yaml.safe_load((ROOT / "cluster_configs" / name).read_text())
    jsonschema.validate(cfg, json.loads(SCHEMA.read_text()))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] > 0 for t in types.values())


def test_schema_rejects_a_broken_config():
    cfg = yaml.safe_load((ROOT / "cluster_configs" / "aws-gpu.yaml").read_text())
    cfg["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, json.loads(SCHEMA.read_text()))


def _ray_version_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def test_kuberay_manifests():
    pinned = _ray_version_pinned()
    rc = yaml.safe_load((ROOT / "cluster_configs" / "kuberay-raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"] == pinned
    gpu = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"]
    job = yaml.safe_load((ROOT / "deploy" / "rayjob-coco.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "mlcseg_ray.cli run" in job["spec"]["entrypoint"] and "--coco" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned


def test_the_bucket_rayjob_needs_no_shared_volume_and_its_command_parses():
    import typer.main

    from mlcseg_ray.cli.app import app

    job = yaml.safe_load((ROOT / "deploy" / "rayjob-coco-s3.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == _ray_version_pinned()
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert all("volumes" not in p and all("volumeMounts" not in c for c in p["containers"]) for p in pods)
    words = job["spec"]["entrypoint"].split()
    assert words[:4] == ["python", "-m", "mlcseg_ray.cli", "run"]
    args = words[4:]
    for flag in ("--coco", "--ann", "--out", "--weights"):
        assert args[args.index(flag) + 1].startswith("s3://"), flag
    # the CLI itself accepts every option and key=value of the entrypoint
    command = typer.main.get_command(app).commands["run"]
    ctx = command.make_context("run", list(args))
    assert ctx.params["out"] == args[args.index("--out") + 1]
    from mlcseg_ray.core.config import Config

    Config.load(None, ctx.params["overrides"])


def test_dockerfile_uses_the_pinned_ray_gpu_image():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version_pinned()}-" in text and "-gpu" in text and ".[gpu]" in text
    assert ray.__version__ == _ray_version_pinned()
