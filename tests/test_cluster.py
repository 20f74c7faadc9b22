"""cluster/: the launcher YAML and KubeRay manifests validate against Ray's and KubeRay's schemas, and say what a
cluster needs to start, survive failures and serve safely (checked on the parsed documents, beyond the schemas).

The KubeRay v1.7.0 CRD schemas are vendored in tests/data/kuberay-crds/ (source, licence and changes in its
README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from ptm_ray.config import Config, ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "kuberay-crds"
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
API_KEY_ENV = "PTM_RAY_API_KEY"  # the variable every serving pod gets from the API-key Secret
URI_SCHEMES = ("s3://", "gs://")
# serve.* fields that `ptm-ray deploy` itself uses (the Serve config around the app), not the running ingress
DEPLOY_ONLY = {"registry", "models", "proxy_location", "app_name", "route_prefix", "config_out"}
RAY_CONTAINER = 0  # KubeRay runs Ray in the first container of each pod template (utils.RayContainerIndex)


def _strict(node: Any) -> Any:
    """A CRD schema as ``kubectl apply`` enforces it (strict field validation, its default): an unknown field,
    a misspelt ``authOption`` say, is an error instead of being dropped without a word."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: ({name: _strict(sub) for name, sub in value.items()} if key == "properties" else _strict(value))
           for key, value in node.items()}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _strict(json.loads((CRDS / f"ray.io_{kind.lower()}s.v1.json").read_text()))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # once: it takes seconds on these schemas
    return cls(schema)


def _validate_crd(document: dict, kind: str) -> None:
    """``jsonschema.validate`` against the vendored CRD schema of ``kind``, its checked validator reused."""
    error = jsonschema.exceptions.best_match(_crd_validator(kind).iter_errors(document))
    if error is not None:
        raise error


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cluster_spec(document: dict) -> dict:
    """The RayClusterSpec of a RayCluster, RayJob (``rayClusterSpec``) or RayService (``rayClusterConfig``)."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[document["kind"]](document["spec"])


def _groups(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group spec) for the head group and each worker group."""
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _env(group: dict) -> dict[str, dict]:
    return {e["name"]: e for e in group["template"]["spec"]["containers"][RAY_CONTAINER].get("env", [])}


def _serves(document: dict) -> bool:
    """A RayService, or a cluster whose head exposes Serve's HTTP port."""
    head = _cluster_spec(document)["headGroupSpec"]["template"]["spec"]["containers"][RAY_CONTAINER]
    return document["kind"] == "RayService" or any(p["containerPort"] == 8000 for p in head.get("ports", []))


def _job_config(entrypoint: str) -> tuple[str, Config]:
    """The script and validated ptm_ray config of a RayJob entrypoint (``python jobs/x.py --config F k=v ...``)."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[2] == "--config", f"unexpected entrypoint {entrypoint!r}"
    assert (ROOT / argv[1]).is_file(), f"{argv[1]} is not a script of this project"
    return argv[1], load_config(ROOT / argv[3], argv[4:])


def _cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity (``8``, ``"8"``, ``"500m"``) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_starts(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, arguments) of each ``ray start`` in a list of launcher shell commands."""
    starts = []
    for command in commands:
        argv = shlex.split(command)
        for i in range(len(argv) - 1):
            if Path(argv[i]).name == "ray" and argv[i + 1] == "start":
                first = i  # the NAME=value words right before the command are its environment
                while first > 0 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[first - 1]):
                    first -= 1
                starts.append((dict(a.split("=", 1) for a in argv[first:i]), argv[i + 2:]))
    return starts


# --- the cluster launcher (ray up) ---

def test_cluster_launcher_yaml_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(LAUNCHER)
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert config["available_node_types"]["gpu_worker"]["max_workers"] > config["available_node_types"]["gpu_worker"]["min_workers"]


def test_launcher_workers_join_with_the_heads_token():
    config = _load(LAUNCHER)
    token = f"/home/{config['auth']['ssh_user']}/.ray/auth_token"  # where `ray start` looks on each node
    # `ray up` copies your token to the head, whose autoscaler copies it to each worker: else workers cannot join
    assert config["file_mounts"].get(token) == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        # a token generated on a node is one the other nodes and the submitter do not hold
        assert not any("get-auth-token" in argv and "--generate" in argv for argv in map(shlex.split, commands))
    head, workers = _ray_starts(config["head_start_ray_commands"]), _ray_starts(config["worker_start_ray_commands"])
    # a node type that never runs `ray start` (or a command this parser misses) leaves the checks below vacuous
    assert len(head) == 1 and len(workers) == 1, "one `ray start` on the head and one on each worker"
    for env, _ in head + workers:
        # without token mode the dashboard and job API run anyone's code (CVE-2023-48022)
        assert env.get("RAY_AUTH_MODE") == "token"
    # `ray dashboard` reaches the head's dashboard through SSH: it never needs to listen beyond loopback
    assert "--dashboard-host=127.0.0.1" in head[0][1]


# --- KubeRay: the CRD schemas ---

@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_v1_7_crd(manifest):
    document = _load(manifest)
    assert document["apiVersion"] == "ray.io/v1"
    _validate_crd(document, document["kind"])


def test_kuberay_manifests_cover_cluster_jobs_and_service():
    kinds = sorted(_load(p)["kind"] for p in KUBERAY)
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]


def test_a_broken_manifest_is_caught():
    document = _load(ROOT / "cluster" / "kuberay" / "rayjob-finetune.yaml")
    document["spec"]["entrypoint"] = ["python", "jobs/finetune.py"]  # must be a string
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        _validate_crd(document, "RayJob")


def test_a_misspelt_field_is_caught():
    document = _load(ROOT / "cluster" / "kuberay" / "raycluster.yaml")
    document["spec"]["authOption"] = document["spec"].pop("authOptions", {"mode": "token"})
    with pytest.raises(jsonschema.ValidationError, match="'authOption' was unexpected"):
        _validate_crd(document, "RayCluster")


# --- KubeRay: what the operator needs for the cluster to start and be safe ---

@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_cluster_has_token_auth_from_the_operator(manifest):
    import ray

    spec = _cluster_spec(_load(manifest))
    auth = spec.get("authOptions", {})
    # without it no token Secret: pods in token mode without a token do not start; without token mode, open RCE
    assert auth.get("mode") == "token"
    # the v1.7 operator refuses K8s-token auth for RayJob and RayService (and below Ray 2.55 everywhere)
    assert not auth.get("enableK8sTokenAuth", False)
    # the operator refuses token mode below Ray 2.52 and picks features by this: it must be the image's Ray
    assert spec["rayVersion"] == ray.__version__
    for name, group in _groups(spec):
        env = _env(group)
        # the operator skips a variable already set: a hand-set token is not the one its own client sends (401)
        assert "RAY_AUTH_TOKEN" not in env, f"{manifest.name} {name}: RAY_AUTH_TOKEN is the operator's to set"
        # likewise a hand-set mode other than token turns auth off on that pod, which then cannot join
        assert env.get("RAY_AUTH_MODE", {"value": "token"}).get("value") == "token", f"{manifest.name} {name}"


@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_dashboard_is_reachable_inside_the_cluster_only(manifest):
    head = _cluster_spec(_load(manifest))["headGroupSpec"]
    # operator, RayJob submitter and RayService roll-out call it via the head Service: on loopback, nothing starts
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"  # unset: KubeRay's default
    # a LoadBalancer or NodePort head Service would put the dashboard (code execution per token) on the network
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    # the same, set through the head Service's own spec
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    # an Ingress would publish the dashboard beyond the cluster as well
    assert not head.get("enableIngress", False)


@pytest.mark.parametrize("manifest", [p for p in KUBERAY if _serves(_load(p))], ids=lambda p: p.name)
def test_every_serving_pod_has_the_api_key(manifest):
    refs = {name: _env(group).get(API_KEY_ENV, {}).get("valueFrom", {}).get("secretKeyRef")
            for name, group in _groups(_cluster_spec(_load(manifest)))}
    # the ingress replica reads the key on whichever pod it lands: without it the replica fails, with another, 401s
    assert len({json.dumps(r, sort_keys=True) for r in refs.values()}) == 1 and None not in refs.values(), refs
    # an optional key lets a pod start without it, to fail later in the replica
    assert not next(iter(refs.values())).get("optional", False)


def test_rayservice_serve_config_binds_beyond_loopback_with_the_api_key():
    document = _load(ROOT / "cluster" / "kuberay" / "rayservice.yaml")
    serve_config = yaml.safe_load(document["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    settings = app["args"]["settings"]
    # KubeRay's serve Service forwards to port 8000 of the pods: a proxy on loopback never answers it
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    # the ingress's settings describe the proxy it runs behind: a mismatch misleads every reader and check
    assert {k: settings[k] for k in ("host", "port")} == serve_config["http_options"]
    # the ingress and the tasks index these (serve.max_new_tokens, ...): a missing one is a KeyError per request
    read_by_ingress = {f.name for f in dataclasses.fields(ServeConfig)} - DEPLOY_ONLY
    assert read_by_ingress <= set(settings), f"settings lack {sorted(read_by_ingress - set(settings))}"
    # ptm_ray's own loader refuses unknown settings (a KeyError in the replica) and a host beyond loopback with no key
    overrides = [f"serve.{key}={json.dumps(value)}" for key, value in settings.items()]
    cfg = load_config(ROOT / "jobs" / "configs" / "serve.yaml", overrides)
    # the ingress reads the key from this variable: it must be the one the Secret fills on the pods
    assert cfg.serve.api_key_env == API_KEY_ENV and not cfg.serve.api_key_file


# --- KubeRay RayJobs: failures survived, relaunches resume ---

@pytest.mark.parametrize("manifest", [p for p in KUBERAY if _load(p)["kind"] == "RayJob"], ids=lambda p: p.name)
def test_rayjob_is_retried_on_a_new_cluster(manifest):
    spec = _load(manifest)["spec"]
    # the CRD takes any string: K8sJobMode's submitter Job retries; InteractiveMode would wait for a person forever
    assert spec.get("submissionMode") == "K8sJobMode"
    # each retry runs on a new RayCluster: with 0, a lost head pod or a failed run ends the job for good
    assert spec.get("backoffLimit", 0) >= 1
    # the RayCluster and its GPUs go away when the job ends
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("manifest", [p for p in KUBERAY if _load(p)["kind"] == "RayJob"], ids=lambda p: p.name)
def test_rayjob_command_line_resumes_after_failures(manifest):
    spec = _load(manifest)["spec"]
    script, cfg = _job_config(spec["entrypoint"])
    # a lost GPU node restarts the worker group from the latest checkpoint instead of ending the run
    assert cfg.scaling.max_failures >= 2
    # checkpoints must reach every node and outlive the RayCluster a retry replaces, or the retry starts over
    assert cfg.storage.path.startswith(URI_SCHEMES)
    if script == "jobs/finetune.py":
        # a retry with the same run name resumes from the latest checkpoint; an empty one starts over
        assert cfg.storage.name
    else:
        # a retry with the same experiment name restores the search; an empty one starts every trial again
        assert script == "jobs/search.py" and cfg.search.name
        # promoted versions must outlive the RayCluster, or the RayService has nothing to serve
        assert cfg.search.registry.startswith(URI_SCHEMES)
    workers = [g for _, g in _groups(spec["rayClusterSpec"])][1:]
    limits = [g["template"]["spec"]["containers"][RAY_CONTAINER]["resources"]["limits"] for g in workers]
    gpus_per_worker = cfg.scaling.resources_per_worker.get("GPU", 0)
    # a training worker that asks more than any pod has is never placed, and the run waits forever
    assert any(_cpus(lim.get("cpu", "0")) >= cfg.scaling.resources_per_worker.get("CPU", 1)
               and float(lim.get("nvidia.com/gpu", 0)) >= gpus_per_worker for lim in limits)
