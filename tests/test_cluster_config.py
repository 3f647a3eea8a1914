"""Static checks of the AWS cluster-launcher config (cluster.yaml); no cloud access."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

# EC2 families whose instances carry NVIDIA GPUs (A10G, A100, H100, L4, L40S, T4, V100).
GPU_FAMILIES = {"g4dn", "g5", "g6", "g6e", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en"}
FORBIDDEN_PORTS = (8265, 5000)  # Ray dashboard / job API, MLflow


def _load() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def _ray_schema() -> dict:
    path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    return json.loads(path.read_text())


def _ray_validate(raw: dict) -> None:
    """What `ray up` does before touching AWS: merge provider defaults, then validate."""
    validate_config(prepare_config(copy.deepcopy(raw)))


def _family(node_type: dict) -> str:
    return node_type["node_config"]["InstanceType"].split(".")[0]


def _has_gpu(node_type: dict) -> bool:
    return bool(node_type.get("resources", {}).get("GPU", 0)) or _family(node_type) in GPU_FAMILIES


@pytest.fixture(scope="module")
def cfg() -> dict:
    return _load()


def test_valid_against_ray_schema(cfg):
    jsonschema.validate(cfg, _ray_schema())  # the file as written
    _ray_validate(cfg)  # merged with ray/autoscaler/aws/defaults.yaml, as `ray up` sees it


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(not_a_ray_key=1), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="four"), id="max_workers-wrong-type"),
        pytest.param(lambda c: c.update(max_workers=-1), id="max_workers-negative"),
        pytest.param(
            lambda c: c["available_node_types"]["ray.worker.gpu"].pop("node_config"),
            id="node-type-missing-node_config",
        ),
        pytest.param(lambda c: c.update(head_node_type="nope"), id="unknown-head-node-type"),
    ],
)
def test_broken_copy_fails_validation(cfg, mutate):
    broken = copy.deepcopy(cfg)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(broken)


def test_provider_and_top_level(cfg):
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"]
    assert cfg["provider"]["cache_stopped_nodes"] is False
    assert cfg["auth"]["ssh_user"] == "ubuntu"
    assert cfg["idle_timeout_minutes"] > 0
    workers = [v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert cfg["max_workers"] == sum(node["max_workers"] for node in workers) == 6
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_gpu_worker_and_cpu_head(cfg):
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not _has_gpu(head), "head node should be a CPU instance with no GPU resources"

    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_workers = {k: v for k, v in workers.items() if _has_gpu(v)}
    assert gpu_workers, "need a GPU worker node type"
    for name, node in gpu_workers.items():
        assert _family(node) in GPU_FAMILIES, f"{name}: GPU resources on a non-GPU instance"
        assert node.get("min_workers", 0) == 0
        assert node["max_workers"] >= 1
        assert node["node_config"].get("ImageId"), f"{name}: needs a GPU-capable AMI"


def test_an_eight_gpu_node_type_for_fsdp_sized_models(cfg):
    node = cfg["available_node_types"]["ray.worker.gpu8"]
    assert node["resources"]["GPU"] == 8 and _family(node) in GPU_FAMILIES
    assert node["node_config"]["InstanceType"] in {"p4de.24xlarge", "p5.48xlarge"}


def test_setup_installs_project_and_ray(cfg):
    cmds = cfg["setup_commands"]
    mounts = {os.path.expanduser(k): v for k, v in cfg.get("file_mounts", {}).items()}
    synced = mounts.get(os.path.expanduser("~/freetf")) in (".", "./")
    from_synced_tree = synced and any(
        "pip install" in c and "-e ~/freetf" in c for c in cmds
    )
    from_git = any("pip install" in c and "git+" in c for c in cmds)
    assert from_synced_tree or from_git, "setup_commands must install this project"
    assert any("pip install" in c and "ray[default,train,tune]" in c for c in cmds)


def test_shared_storage_is_mounted(cfg):
    init = " ".join(cfg.get("initialization_commands", []))
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    assert "scaling.storage_path=/mnt/shared/ray_results" in CLUSTER_YAML.read_text()


def _rule_ports(rule: dict) -> range | None:
    if str(rule.get("IpProtocol")) == "-1":
        return range(0, 65536)
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return range(0, 65536) if lo == -1 else range(lo, hi + 1)


def _world_open(rule: dict) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return any(c and ipaddress.ip_network(c).prefixlen == 0 for c in cidrs)


def test_no_dashboard_or_mlflow_port_open_to_world(cfg):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    # The exact ingress list Ray would authorize on the security group it creates.
    rules = _create_default_inbound_rules({"sg-cluster"}, extra)
    for rule in rules:
        if _world_open(rule):
            ports = _rule_ports(rule)
            for port in FORBIDDEN_PORTS:
                assert port not in ports, f"port {port} open to the world: {rule}"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start


def test_world_open_rule_is_detected():
    """The port check itself must be able to fail."""
    bad = {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000,
           "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert _world_open(bad) and 8265 in _rule_ports(bad)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_commands_are_valid_bash(cfg):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cfg.get(key, []):
            res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert res.returncode == 0, f"{key}: {cmd!r}: {res.stderr}"
