"""cluster/: the launcher YAML and KubeRay manifests validate against the schemas Ray and KubeRay ship."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"


def _crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def test_cluster_launcher_yaml_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert config["available_node_types"]["gpu_worker"]["max_workers"] > config["available_node_types"]["gpu_worker"]["min_workers"]


@pytest.mark.skipif(not CRDS.is_dir(), reason="the KubeRay CRDs live in ../shared/kuberay-crds")
@pytest.mark.parametrize("manifest", sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_v1_7_crd(manifest):
    document = yaml.safe_load(manifest.read_text())
    assert document["apiVersion"] == "ray.io/v1"
    jsonschema.validate(document, _crd_schema(document["kind"]))
    text = manifest.read_text()
    assert "jobs/" in text or "ptm_ray.serve:build_app" in text or document["kind"] == "RayCluster"
    assert "RAY_AUTH_MODE" in text  # token auth stays on


def test_kuberay_manifests_cover_cluster_jobs_and_service():
    kinds = sorted(yaml.safe_load(p.read_text())["kind"] for p in (ROOT / "cluster" / "kuberay").glob("*.yaml"))
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]


def test_a_broken_manifest_is_caught():
    document = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-finetune.yaml").read_text())
    document["spec"]["entrypoint"] = ["python", "jobs/finetune.py"]  # must be a string
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(document, _crd_schema("RayJob"))
