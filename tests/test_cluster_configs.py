"""The deployment files in cluster/ are valid: Ray's own launcher validation for gcp.yaml, the fields KubeRay
requires for the RayCluster / RayJob manifests, and a runtime_env that Ray accepts. Offline, seconds.

Run: python -m pytest tests/test_cluster_configs.py -q
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _load(name: str) -> dict:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test: validation must not contact GCP."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher (GCP)


def _prepared_gcp() -> dict:
    # What `ray up` does before it talks to GCP: merge the provider defaults, fold setup commands, fill
    # per-type worker bounds (prepare_config), then check against ray-schema.json (validate_config).
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load("gcp.yaml")))
    validate_config(config)
    return config


def test_gcp_yaml_passes_ray_launcher_validation(offline):
    config = _prepared_gcp()
    assert config["provider"]["type"] == "gcp"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0

    machines = {t["node_config"]["machineType"]: t for name, t in types.items() if name != config["head_node_type"]}
    assert {"a3-highgpu-8g", "a2-highgpu-8g", "a2-ultragpu-8g"} <= set(machines)
    for t in machines.values():
        assert t["resources"]["GPU"] == 8
        assert 0 == t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        # GPU VMs cannot live-migrate, and workers need a service account to reach gs:// buckets.
        assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert "cloud-platform" in t["node_config"]["serviceAccounts"][0]["scopes"][0]


def test_gcp_yaml_installs_the_project_and_enables_token_auth(offline):
    config = _prepared_gcp()
    # prepare_config merged setup_commands into both lists; both must install this project.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install -e ." in c for c in config[key]), key
    assert "~/shortcut-ray" in config["file_mounts"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert ".venv" in config["rsync_exclude"]


def test_ray_launcher_validation_rejects_a_broken_config(offline):
    """Guards the test above: the validator really checks the schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(_load("gcp.yaml"))
    config["available_node_types"]["gpu_8x_h100"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


# --------------------------------------------------------------------------------------------------
# KubeRay


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _check_token_auth(container: dict) -> None:
    env = _env(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"], container["name"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    # KubeRay's CRD types rayStartParams as map[string]string: a bare number or bool is rejected.
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    for c in _containers(head["template"]):
        _check_token_auth(c)
        assert "MLFLOW_TRACKING_URI" in _env(c)
        assert "2.60.0" in c["image"]

    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        pod = g["template"]["spec"]
        assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
        for c in _containers(g["template"]):
            _check_token_auth(c)
            assert "MLFLOW_TRACKING_URI" in _env(c)
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) > 0, g["groupName"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]


def test_kuberay_raycluster_manifest():
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])
    selectors = {g["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
                 for g in doc["spec"]["workerGroupSpecs"]}
    assert selectors == {"nvidia-h100-80gb", "nvidia-tesla-a100", "nvidia-a100-80gb"}


def test_kuberay_rayjob_manifest():
    from ray.runtime_env import RuntimeEnv

    doc = _load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train --preset ")
    _check_cluster_spec(spec["rayClusterSpec"])
    # The submitter pod runs `ray job submit`, so it needs the token too.
    submitter = spec["submitterPodTemplate"]
    assert submitter["spec"]["restartPolicy"] == "Never"
    for c in _containers(submitter):
        _check_token_auth(c)
    # runtimeEnvYAML is a YAML string inside YAML; Ray must accept what it holds.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


# --------------------------------------------------------------------------------------------------
# runtime_env for `ray job submit`


def test_runtime_env_yaml():
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own field validation (types of working_dir, excludes, env_vars)
    assert env["working_dir"] == "."
    assert any(e.strip("/") == ".venv" for e in env["excludes"])
    assert any(e.strip("/") == ".git" for e in env["excludes"])
    # env var values must be strings: an unquoted `false` in YAML would be a bool and Ray rejects it.
    assert env["env_vars"]["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]


def test_readme_commands_reference_the_entry_points():
    text = (CLUSTER / "README.md").read_text()
    assert "ray up cluster/gcp.yaml" in text
    assert "--runtime-env cluster/runtime_env.yaml" in text
    assert "python -m jobs.train --preset" in text
    assert "kubectl apply -f cluster/kuberay-rayjob.yaml" in text


# --------------------------------------------------------------------------------------------------
# Safe by default (issue: security defaults): nothing reachable from outside the cluster's network


def _docs(name: str) -> list[dict]:
    with open(CLUSTER / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _walk(node):
    """Every (key, value) pair in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_gcp_nodes_have_no_external_ip(offline):
    raw = _load("gcp.yaml")
    assert raw["provider"]["use_internal_ips"] is True
    config = _prepared_gcp()
    for name, t in config["available_node_types"].items():
        for nic in t["node_config"]["networkInterfaces"]:
            assert not nic.get("accessConfigs"), f"{name} gets an external IP"
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "0.0.0.0" not in commands  # dashboard / metrics stay on the default (localhost / internal)


def test_kuberay_exposes_nothing_outside_the_cluster():
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in _docs(name):
            for key, value in _walk(doc):
                assert not (key in ("serviceType", "type") and value in ("LoadBalancer", "NodePort")), name
            env = [v for k, v in _walk(doc) if k == "env"]
            for block in env:
                for e in block:
                    if e["name"] == "MLFLOW_TRACKING_URI":
                        assert ".svc.cluster.local" in e["value"] or e["value"].startswith("https://"), e


def test_kuberay_network_policy_admits_only_ray_pods():
    (policy,) = _docs("kuberay-networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["apiVersion"] == "networking.k8s.io/v1"
    ray_pods = {"ray.io/is-ray-node": "yes"}
    assert policy["spec"]["podSelector"]["matchLabels"] == ray_pods
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        peers = rule["from"]
        if rule.get("ports"):  # a rule that opens ports to more than Ray pods: only the token-authenticated API
            assert [p["port"] for p in rule["ports"]] == [8265]
        else:
            assert peers == [{"podSelector": {"matchLabels": ray_pods}}]
    assert "kubectl apply -f cluster/kuberay-networkpolicy.yaml" in (CLUSTER / "README.md").read_text()


def test_runtime_env_mlflow_is_cluster_internal_and_readme_says_how_to_reach_it():
    env = _load("runtime_env.yaml")
    assert "INTERNAL" in env["env_vars"]["MLFLOW_TRACKING_URI"] or env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("https://")
    text = (CLUSTER / "README.md").read_text()
    assert "--tunnel-through-iap" in text and "kubectl port-forward" in text and "basic-auth" in text
    assert "35.235.240.0/20" in text and "0.0.0.0/0" not in text.replace("not 0.0.0.0/0", "")
