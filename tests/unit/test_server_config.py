"""Shipped teacher-server configs and Kubernetes manifests parse and agree; --help lists every option."""

from pathlib import Path

import pytest
import yaml

from distill_core.config import build, describe, load_config
from teacher_server.__main__ import main
from teacher_server.config import ServerConfig, split_address

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "teacher"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("teacher_server*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
  cfg = load_config(ServerConfig, path)
  assert cfg.batcher.buckets and cfg.limits.max_k >= 1


def _manifests():
  docs = {}
  for path in sorted(DEPLOY.glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
      docs[doc.get("kind")] = doc
  return docs


def test_configmap_matches_tpu_config():
  embedded = yaml.safe_load(_manifests()["ConfigMap"]["data"]["server.yaml"])
  shipped = load_config(ServerConfig, REPO / "configs" / "teacher_server_tpu.yaml")
  assert build(ServerConfig, embedded) == shipped


def test_deployment_agrees_with_config():
  docs = _manifests()
  cfg = build(ServerConfig, yaml.safe_load(docs["ConfigMap"]["data"]["server.yaml"]))
  pod = docs["Deployment"]["spec"]["template"]["spec"]
  container = pod["containers"][0]
  ports = {p["name"]: p["containerPort"] for p in container["ports"]}
  assert ports == {"grpc": split_address(cfg.address, "address")[1],
                   "metrics": split_address(cfg.metrics_address, "metrics_address")[1],
                   "health": split_address(cfg.health_address, "health_address")[1]}
  for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # plaintext: the kubelet speaks no TLS
    assert container[probe]["grpc"]["port"] == ports["health"]
  assert not cfg.security.authenticate_health  # the built-in gRPC probes send no token
  mounts = {m["mountPath"] for m in container["volumeMounts"]}
  needed = {str(Path(cfg.security.auth_token_file).parent), cfg.model.path, "/etc/teacher"}
  assert needed <= mounts
  assert container["args"] == ["--config", "/etc/teacher/server.yaml"]
  assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_grace_s
  tpus = container["resources"]["limits"]["google.com/tpu"]
  assert cfg.mesh.data * cfg.mesh.fsdp == tpus and all(b % tpus == 0 for b, _ in cfg.batcher.buckets)
  service = docs["Service"]["spec"]
  assert service["clusterIP"] == "None" and service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_help_lists_every_option(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  keys = [line.split(" ", 1)[0].rstrip(":") for line in describe(ServerConfig)]
  assert len(keys) > 30
  for key in keys:
    assert f"  {key} " in out or f"  {key}:" in out, key


def test_bad_override_is_reported(capsys):
  assert main(["limits.max_k=0"]) == 2
  assert "limits.max_k" in capsys.readouterr().err
  assert main(["model.source=hf"]) == 2
  assert "model.path is required" in capsys.readouterr().err


def test_docs_describe_every_option():
  text = (REPO / "docs" / "teacher_server.md").read_text()
  for line in describe(ServerConfig):
    key = line.split(" ", 1)[0].rstrip(":")
    if "(" in line.split(":", 1)[0]:  # a leaf option, not a section
      assert f"`{key}`" in text, key
