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


def test_dockerfile_uses_the_pinned_ray_gpu_image():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version_pinned()}-" in text and "-gpu" in text and ".[gpu]" in text
    assert ray.__version__ == _ray_version_pinned()
