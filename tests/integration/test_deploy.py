"""Kubernetes manifests of deploy/ (images and pinned dependencies: tests/unit/test_deploy.py).

Every kustomization is rendered with `kubectl kustomize` and every object
validated against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields are errors) or, for JobSets, against the JobSet CRD's own schema
(vendored in tests/schemas/, unknown fields refused too). Every container's
arguments go through the real command-line parser of its program, and the
config file they name (taken from the ConfigMap the pod mounts) through the
real config loader.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from distill_core.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES_VERSION = "1.32.0"  # GKE's regular channel
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
JOBSET_SCHEMA = REPO / "tests" / "schemas" / "jobset-v1alpha2.json"
TOPOLOGY_CHIPS = {"2x4": 8, "4x4": 16, "4x8": 32, "8x8": 64}  # v5e slice topologies


def render(directory: Path) -> list[dict]:
  kubectl = shutil.which("kubectl")
  if kubectl is None:
    pytest.skip("kubectl (with its built-in kustomize) is not installed")
  out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True).stdout
  return [doc for doc in yaml.safe_load_all(out) if doc]


def _closed(schema):
  """The schema with `additionalProperties: false` on every object that lists its properties."""
  if isinstance(schema, dict):
    schema = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
      schema["additionalProperties"] = False
    return schema
  if isinstance(schema, list):
    return [_closed(v) for v in schema]
  return schema


def validate(obj: dict) -> None:
  if obj["apiVersion"] == "jobset.x-k8s.io/v1alpha2":
    schema = _closed(json.loads(JOBSET_SCHEMA.read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked with a built-in kind below
    jsonschema.validate(obj, schema)
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(meta, KUBERNETES_VERSION, strict=True)
    return
  kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def rendered(request) -> tuple[Path, list[dict]]:
  return request.param, render(request.param)


def test_every_manifest_validates(rendered):
  directory, objects = rendered
  assert objects, directory
  for obj in objects:
    try:
      validate(obj)
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
      raise AssertionError(f"{directory}: {obj['kind']}/{obj['metadata']['name']}: {e}") from None


def test_validation_catches_mistakes():
  """The validators are strict: a misspelt field and a wrong type both fail."""
  objects = render(DEPLOY / "student")
  jobset = next(o for o in objects if o["kind"] == "JobSet")
  pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  pod["containers"][0]["argz"] = pod["containers"][0].pop("args")
  with pytest.raises(jsonschema.ValidationError, match="argz"):
    validate(jobset)
  deployment = next(o for o in render(DEPLOY / "teacher") if o["kind"] == "Deployment")
  deployment["spec"]["replicas"] = "two"
  with pytest.raises(kubernetes_validate.ValidationError):
    validate(deployment)


def pod_specs(objects: list[dict]):
  """(owner object, pod spec) of every Deployment and JobSet."""
  for obj in objects:
    if obj["kind"] == "Deployment":
      yield obj, obj["spec"]["template"]["spec"]
    elif obj["kind"] == "JobSet":
      for job in obj["spec"]["replicatedJobs"]:
        yield obj, job["template"]["spec"]["template"]["spec"]


def mounted_config(objects: list[dict], pod: dict, container: dict, path: str, tmp_path: Path) -> Path:
  """The file at `path` in the container, when a ConfigMap volume provides it (copied to tmp_path)."""
  volumes = {v["name"]: v for v in pod["volumes"]}
  for mount in container["volumeMounts"]:
    if path.startswith(mount["mountPath"].rstrip("/") + "/"):
      config_map = volumes[mount["name"]]["configMap"]["name"]
      data = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map)["data"]
      name = path[len(mount["mountPath"].rstrip("/")) + 1:]
      out = tmp_path / name
      out.write_text(data[name])
      return out
  raise AssertionError(f"{container['name']}: nothing mounts {path}")


def programs():
  from student_trainer.__main__ import parse_args as student_args
  from student_trainer.config import TrainConfig
  from teacher_server.__main__ import parse_args as teacher_args
  from teacher_server.config import ServerConfig
  return {"teacher-server": (lambda argv: teacher_args(argv), ServerConfig),
          "student-trainer": (lambda argv: student_args(argv)[0], TrainConfig)}


def loaded_configs(objects: list[dict], tmp_path: Path):
  """(owner, pod, container, config) for every container, parsed exactly as its program would."""
  table = programs()
  for owner, pod in pod_specs(objects):
    for container in pod["containers"]:
      program = container["image"].split("/")[-1].split(":")[0]
      parse, schema = table[program]
      args = parse(container.get("args", []))
      path = mounted_config(objects, pod, container, args.config, tmp_path)
      yield owner, pod, container, load_config(schema, path, args.overrides)


def test_container_args_parse_with_the_real_parsers(rendered, tmp_path):
  directory, objects = rendered
  seen = [container["image"] for _, _, container, _ in loaded_configs(objects, tmp_path)]
  assert all(seen) or not list(pod_specs(objects)), directory


def env_of(container: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def volume_paths(pod: dict, container: dict, kind: str) -> dict[str, str]:
  """mountPath -> the Secret/ConfigMap name mounted there."""
  volumes = {v["name"]: v for v in pod["volumes"]}
  key = "secretName" if kind == "secret" else "name"
  return {m["mountPath"]: volumes[m["name"]][kind][key] for m in container["volumeMounts"]
          if kind in volumes[m["name"]]}


def test_student_and_teacher_fit_together(tmp_path):
  """The whole TPU deployment: the student's processes, slice, teacher address, TLS and grace agree."""
  objects = render(DEPLOY)
  configs = {c["image"].split("/")[-1].split(":")[0]: (o, p, c, cfg) for o, p, c, cfg in loaded_configs(objects, tmp_path)}
  _, _, teacher_container, server = configs["teacher-server"]
  jobset, pod, container, train = configs["student-trainer"]
  service = next(o for o in objects if o["kind"] == "Service")
  namespace = service["metadata"]["namespace"]
  grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
  assert train.teacher.remote.address == f"dns:///{service['metadata']['name']}.{namespace}.svc.cluster.local:{grpc_port}"
  assert jobset["metadata"]["namespace"] == namespace

  # jax.distributed: one process per pod of the indexed Job, coordinator = pod 0's DNS name.
  job = jobset["spec"]["replicatedJobs"][0]
  spec, env = job["template"]["spec"], env_of(container)
  assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] == int(env["JAX_NUM_PROCESSES"])
  name = jobset["metadata"]["name"]
  host, port = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)
  assert host == f"{name}-{job['name']}-0-0.{name}" and jobset["spec"]["network"]["enableDNSHostnames"]
  assert int(port) in [p["containerPort"] for p in container["ports"]]
  assert env["JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}

  # The slice: chips per host x hosts = the topology; the mesh uses them all.
  chips = container["resources"]["limits"]["google.com/tpu"]
  topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
  assert chips * spec["parallelism"] == TOPOLOGY_CHIPS[topology]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
  assert train.mesh.fsdp <= chips and (chips * spec["parallelism"]) % train.mesh.fsdp == 0
  assert train.data.batch_size % spec["parallelism"] == 0

  # Checkpoints and runs in the bucket; SIGTERM leaves time for a checkpoint.
  bucket = next(m["mountPath"] for m in container["volumeMounts"]
                if next(v for v in pod["volumes"] if v["name"] == m["name"]).get("csi", {}).get("driver")
                == "gcsfuse.csi.storage.gke.io")
  assert train.checkpoint.directory.startswith(bucket + "/") and train.run_dir.startswith(bucket + "/")
  assert pod["terminationGracePeriodSeconds"] >= 300

  # TLS whenever a token is configured, on both sides, with every file mounted from a Secret.
  assert server.security.auth_token_file and server.security.tls_cert and server.security.tls_key
  remote = train.teacher.remote
  assert remote.token_file and remote.root_certificates
  student_secrets = volume_paths(pod, container, "secret")
  teacher_pod = next(p for o, p in pod_specs(objects) if o["kind"] == "Deployment")
  teacher_secrets = volume_paths(teacher_pod, teacher_container, "secret")
  for path, secrets in ((remote.token_file, student_secrets), (remote.root_certificates, student_secrets),
                        (server.security.auth_token_file, teacher_secrets), (server.security.tls_cert, teacher_secrets)):
    assert str(Path(path).parent) in secrets, path
  assert student_secrets[str(Path(remote.token_file).parent)] == teacher_secrets[
      str(Path(server.security.auth_token_file).parent)]  # one token Secret for both


@pytest.mark.parametrize("directory", [DEPLOY, DEPLOY / "gpu"], ids=["tpu", "gpu"])
def test_pods_are_non_root_with_read_only_root(directory):
  for _, pod in pod_specs(render(directory)):
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"]:
      sc = container["securityContext"]
      assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
      assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]]


def test_gpu_variant_asks_for_gpus_only():
  for owner, pod in pod_specs(render(DEPLOY / "gpu")):
    limits = pod["containers"][0]["resources"]["limits"]
    assert "google.com/tpu" not in limits and limits["nvidia.com/gpu"] > 0, owner["metadata"]["name"]
    assert not any(k.startswith("cloud.google.com/gke-tpu") for k in pod["nodeSelector"])
    assert pod["containers"][0]["image"].endswith("-cuda12")


# -- the README's overlay -------------------------------------------------------------------------


def test_readme_overlay_sets_images_and_bucket(tmp_path):
  """deploy/README.md step 6, as pasted: the overlay replaces the images and the bucket name."""
  text = (DEPLOY / "README.md").read_text()
  block = re.search(r"cat > my-deploy/kustomization.yaml <<EOF\n(.*?)\nEOF\n", text, re.S).group(1)
  registry, bucket = "europe-docker.pkg.dev/p/distill", "p-distill"
  for base in ("../deploy", "../deploy/gpu"):
    root = tmp_path / base.replace("/", "_").strip("._")
    (root / "my-deploy").mkdir(parents=True)
    (root / "deploy").symlink_to(DEPLOY)
    body = block.replace("$REGISTRY", registry).replace("$BUCKET", bucket).replace("- ../deploy\n", f"- {base}\n")
    (root / "my-deploy" / "kustomization.yaml").write_text(body + "\n")
    objects = render(root / "my-deploy")
    images = {c["image"] for _, pod in pod_specs(objects) for c in pod["containers"]}
    assert images == {f"{registry}/teacher-server:0.1.0", f"{registry}/student-trainer:0.1.0"}
    jobset = next(o for o in objects if o["kind"] == "JobSet")
    volumes = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["volumes"]
    assert [v["csi"]["volumeAttributes"]["bucketName"] for v in volumes if "csi" in v] == [bucket]
