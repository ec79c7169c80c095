"""Kubernetes manifests: every object of the base and each overlay, rendered, validated
against the pinned Kubernetes version's schemas (kubernetes-validate, strict: unknown fields
are errors) and the RayJob against the KubeRay CRD's openAPIV3Schema; then the deployment
rules of issue #8 (probes, resources, GPUs, Redis isolation, token, config)."""

from __future__ import annotations

import base64
import copy
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hapo.config import MAKE_API_TOKEN, ConfigError, load_config
from tests.deploy.conftest import KUSTOMIZATIONS, REPO, TEST_TOKEN

K8S_VERSION = "1.30.0"
KUBERAY_CRD = REPO / "deploy" / "schemas" / "kuberay-v1.7.0-ray.io_rayjobs.yaml"
HAPO_PORTS = {"rollout": 8001, "reward": 8002, "trainer": 8000}


@cache
def rayjob_schema() -> dict[str, Any]:
    """The v1 openAPIV3Schema of the vendored KubeRay CRD, made strict: objects that list
    their properties and do not preserve unknown fields reject others, as the API server's
    strict field validation (kubectl's default) does."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    # metadata is `type: object` in CRDs; the API server checks it as ObjectMeta.
    return schema


def validate_rayjob(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayJob"
    jsonschema.Draft4Validator(rayjob_schema()).validate(obj)
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(meta, K8S_VERSION, strict=True)  # ObjectMeta of the RayJob


def validate_object(obj: dict[str, Any]) -> None:
    if obj.get("kind") == "RayJob":
        validate_rayjob(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod template in an object."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [(obj["metadata"]["name"], spec["template"]["spec"])]
    if obj["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        found = [("ray-head", cluster["headGroupSpec"]["template"]["spec"])]
        for group in cluster["workerGroupSpecs"]:
            found.append((f"ray-{group['groupName']}", group["template"]["spec"]))
        return found
    return []


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


# ------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_against_pinned_kubernetes_and_kuberay_schemas(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    assert objects
    for obj in objects:
        validate_object(obj)


def test_validators_reject_broken_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["overlays/gpu"]
    deployment = copy.deepcopy(find(objects, "Deployment", "rollout"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(deployment)
    typo = copy.deepcopy(find(objects, "Deployment", "reward"))
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError):  # strict: unknown field
        validate_object(typo)
    rayjob = find(objects, "RayJob", "trainer")
    for mutate in (
        lambda job: job["spec"].__setitem__("entrypointt", "hapo"),
        lambda job: job["spec"].__setitem__("shutdownAfterJobFinishes", "yes"),
        lambda job: job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0].__setitem__("imagePullPolicy", 3),
        lambda job: job["metadata"].__setitem__("labels", {"a": 1}),
    ):
        broken = copy.deepcopy(rayjob)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_object(broken)


# ------------------------------------------------------------------------ rules


def hapo_containers(objects: list[dict[str, Any]]):
    for obj in objects:
        for label, spec in pod_specs(obj):
            for kind in ("initContainers", "containers"):
                for container in spec.get(kind, []):
                    if container["image"].startswith("hapo-rl:"):
                        yield obj, label, kind, container, spec


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_containers_have_requests_limits_and_run_unprivileged(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    for obj in rendered[kustomization]:
        for label, spec in pod_specs(obj):
            assert spec["securityContext"]["runAsNonRoot"] is True, label
            for container in spec.get("initContainers", []) + spec["containers"]:
                resources = container["resources"]
                assert resources["requests"] and resources["limits"], (label, container["name"])
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_service_containers_probe_healthz_and_readyz_on_their_port(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    checked = set()
    for obj, _, kind, container, _ in hapo_containers(rendered[kustomization]):
        if kind != "containers" or obj["kind"] == "RayJob":
            continue  # the Ray head's API starts with the job (see rayjob.yaml)
        service = container["args"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == HAPO_PORTS[service]
        liveness = container["livenessProbe"]
        if service == "trainer":  # a stalled run (503 on /readyz) restarts the pod: it resumes
            assert liveness["httpGet"] == {"path": "/readyz", "port": "http"}
            assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300
        else:
            assert liveness["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        if service == "trainer":  # weights to every replica behind the headless Service
            assert env["HAPO_TRAINER_ROLLOUT_URLS"] == "[http://rollout:8001]"
            assert env["HAPO_TRAINER_ROLLOUT_DISCOVERY"] == "dns"
            assert (
                find(rendered[kustomization], "Service", "rollout")["spec"]["clusterIP"] == "None"
            )
        assert env["HAPO_API_HOST"] == "0.0.0.0"
        assert env["HAPO_REDIS_URL"] == "redis://redis:6379/0"
        checked.add(service)
    with_trainer_pod = kustomization in ("overlays/cpu", "overlays/gpu-single")
    expected = {"rollout", "reward"} | ({"trainer"} if with_trainer_pod else set())
    assert checked == expected


@pytest.mark.parametrize("kustomization", ["overlays/gpu", "overlays/gpu-single"])
def test_gpu_overlays_give_rollout_and_trainer_gpus(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    rollout = find(objects, "Deployment", "rollout")["spec"]["template"]["spec"]
    (container,) = rollout["containers"]
    assert container["image"].endswith("-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if kustomization == "overlays/gpu":
        rayjob = find(objects, "RayJob", "trainer")
        (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "trainer.backend=ray" in rayjob["spec"]["entrypoint"].split()
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        head_env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
        assert head_env["HAPO_TRAINER_ROLLOUT_DISCOVERY"] == "dns"  # both rollout replicas
        assert not [
            o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "trainer"
        ]
    else:
        trainer = find(objects, "Deployment", "trainer")["spec"]["template"]["spec"]
        assert trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for _obj, label, _, c, _ in hapo_containers(objects):
        if c["image"].endswith("-cuda"):
            assert {e["name"]: e.get("value") for e in c["env"]}["HAPO_MODEL_PATH"] == (
                "/models/model"
            ), label


def test_cpu_overlay_uses_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = yaml.safe_dump_all(rendered["overlays/cpu"])
    assert "nvidia.com/gpu" not in text and "-cuda" not in text


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_hapo_services_reach_redis(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    policy = find(objects, "NetworkPolicy", "redis-clients-only")["spec"]
    redis = find(objects, "StatefulSet", "redis")
    assert policy["podSelector"]["matchLabels"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    client_label = source["podSelector"]["matchLabels"]
    assert set(source) == {"podSelector"}  # no namespaceSelector / ipBlock
    for obj in objects:
        templates = []
        if obj["kind"] in ("Deployment", "StatefulSet"):
            templates = [obj["spec"]["template"]]
        elif obj["kind"] == "RayJob":
            cluster = obj["spec"]["rayClusterSpec"]
            templates = [cluster["headGroupSpec"]["template"]] + [
                g["template"] for g in cluster["workerGroupSpecs"]
            ]
        for template in templates:
            labels = template["metadata"]["labels"]
            is_client = client_label.items() <= labels.items()
            assert is_client == (obj["metadata"]["name"] != "redis"), obj["metadata"]["name"]


def redis_server_words(container: dict[str, Any]) -> list[str]:
    """The ``redis-server`` command line in the Redis container's start script."""
    shell, flag, script = container["command"]
    assert (shell, flag) == ("sh", "-c") and "args" not in container
    (line,) = [line for line in script.splitlines() if line.startswith("exec redis-server")]
    return line.split()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_redis_requires_the_generated_password_and_every_client_has_it(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    secret = find(objects, "Secret", "hapo-redis-password")
    assert base64.b64decode(secret["data"]["HAPO_REDIS_PASSWORD"]).decode() == TEST_TOKEN
    from_secret = {
        "name": "HAPO_REDIS_PASSWORD",
        "valueFrom": {
            "secretKeyRef": {"name": "hapo-redis-password", "key": "HAPO_REDIS_PASSWORD"}
        },
    }
    (redis,) = find(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    assert from_secret in redis["env"]
    script = redis["command"][2]
    # On stdin ("redis-server -"), never on a command line; k8s leaves "$NAME" (no
    # parentheses) to the container's shell.
    assert redis_server_words(redis)[:3] == ["exec", "redis-server", "-"]
    assert 'requirepass "$HAPO_REDIS_PASSWORD"' in script
    assert script.startswith('test -n "${HAPO_REDIS_PASSWORD:-}" || {')  # none: no start
    assert 'REDISCLI_AUTH="$HAPO_REDIS_PASSWORD"' in redis["readinessProbe"]["exec"]["command"][2]
    clients = 0
    for _, label, _, container, _ in hapo_containers(objects):
        names = [env["name"] for env in container.get("env", [])]
        if "HAPO_REDIS_URL" in names:
            assert from_secret in container["env"], label
            clients += 1
    assert clients >= 2


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (``matchLabels``, ``matchExpressions``) selects ``labels``;
    written from the Kubernetes API reference, independently of the manifests."""
    if selector.get("matchLabels", {}).items() - labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = (
            expression["key"],
            expression["operator"],
            expression.get("values", []),
        )
        present = key in labels
        if not {
            "Exists": present,
            "DoesNotExist": not present,
            "In": present and labels[key] in values,
            "NotIn": not present or labels[key] not in values,
        }[operator]:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=lambda: {"name": "hapo"})
    """The pod's namespace's labels; the manifests' own namespace is ``{"name": "hapo"}``."""


def admits(policies: list[dict[str, Any]], target: Pod, source: Pod, port: int) -> bool:
    """Whether a TCP connection from ``source`` to ``port`` of ``target`` (a pod of the
    manifests' namespace) is allowed under ``policies`` (NetworkPolicy ingress semantics:
    a pod no policy selects admits everything; a selected pod admits what some rule of
    some policy selecting it admits)."""
    applicable = [
        p["spec"] for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target.labels)
    ]  # fmt: skip
    if not applicable:
        return True
    same_namespace = source.namespace_labels == target.namespace_labels

    def peer_admits(peer: dict[str, Any]) -> bool:
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], source.namespace_labels)
        else:
            in_namespace = same_namespace
        return in_namespace and selects(peer.get("podSelector", {}), source.labels)

    for spec in applicable:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            port_ok = not ports or any(p.get("port") in (None, port) for p in ports)
            peers = rule.get("from")
            if port_ok and (not peers or any(peer_admits(peer) for peer in peers)):
                return True
    return False


def template_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The labels of every pod template, by ``pod_specs``'s label."""
    found = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            found[obj["metadata"]["name"]] = obj["spec"]["template"]["metadata"]["labels"]
        elif obj["kind"] == "RayJob":
            cluster = obj["spec"]["rayClusterSpec"]
            found["ray-head"] = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in cluster["workerGroupSpecs"]:
                found[f"ray-{group['groupName']}"] = group["template"]["metadata"]["labels"]
    return found


STRANGER = Pod({"app": "someone-elses"})
"""A pod of the same namespace that is not part of HAPO-RL."""
OUTSIDER = Pod({"app.kubernetes.io/name": "trainer"}, {"name": "elsewhere"})
"""A pod of another namespace, labelled like the trainer."""


@pytest.mark.parametrize("kustomization", ["overlays/cpu", "overlays/gpu", "overlays/gpu-single"])
def test_network_policies_admit_each_component_only_what_it_needs(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {name: Pod(labels) for name, labels in template_labels(objects).items()}
    trainer = pods.get("trainer") or pods["ray-head"]
    for name, pod in pods.items():  # every component is behind some policy
        assert any(selects(p["spec"]["podSelector"], pod.labels) for p in policies), name

    def check(target: Pod, source: Pod, port: int, expected: bool) -> None:
        assert admits(policies, target, source, port) is expected, (target, source, port)

    for client in ("rollout", "reward"):
        check(pods["redis"], pods[client], 6379, True)
    check(pods["redis"], trainer, 6379, True)
    for stranger in (STRANGER, OUTSIDER):
        check(pods["redis"], stranger, 6379, False)
        check(pods["rollout"], stranger, 8001, False)
        check(pods["reward"], stranger, 8002, False)
        check(trainer, stranger, 29500, False)
    check(pods["rollout"], trainer, 8001, True)  # the weight routes
    check(pods["rollout"], trainer, 41234, True)  # NCCL's sockets: any port
    check(pods["rollout"], pods["reward"], 8001, False)
    check(pods["reward"], trainer, 8002, False)
    check(trainer, pods["rollout"], 29500, True)  # the rendezvous
    check(trainer, pods["rollout"], 41234, True)
    check(trainer, STRANGER, 8000, True)  # the control API, from this namespace
    check(trainer, OUTSIDER, 8000, False)
    check(trainer, pods["reward"], 29500, False)
    if "ray-head" in pods:
        head, worker = pods["ray-head"], pods["ray-gpu"]
        submitter = Pod({"batch.kubernetes.io/job-name": "trainer"})
        operator = Pod({"app.kubernetes.io/name": "kuberay-operator"}, {"name": "ray-system"})
        for port in (6379, 8265, 10001, 20001):  # GCS, dashboard, client, a worker port
            check(head, worker, port, True)
            check(worker, head, port, True)
            check(head, STRANGER, port, False)
            check(head, OUTSIDER, port, False)
            check(head, pods["rollout"], port, True)  # NCCL (the driver pushes weights)
            check(worker, pods["rollout"], port, False)
        for source in (submitter, operator):
            check(head, source, 8265, True)
            check(head, source, 10001, False)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_redis_keeps_an_aof_on_a_pvc(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    redis = find(rendered[kustomization], "StatefulSet", "redis")["spec"]
    args = redis_server_words(redis["template"]["spec"]["containers"][0])
    assert args[args.index("--appendonly") + 1] == "yes"
    # Bounded, below the container's limit (room for an AOF rewrite's fork); past it writes
    # fail, stream entries are never evicted.
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    limit = redis["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert (maxmemory, limit) == ("2gb", "4Gi")
    mount = redis["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_token_comes_from_the_generated_secret_and_reward_scales(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str
) -> None:
    objects = rendered[kustomization]
    secret = find(objects, "Secret", "hapo-api-token")
    assert base64.b64decode(secret["data"]["HAPO_API_TOKEN"]).decode() == TEST_TOKEN
    for _, label, _, container, _ in hapo_containers(objects):
        for env in container.get("env", []):
            if env["name"] == "HAPO_API_TOKEN":
                assert "value" not in env, label
                assert env["valueFrom"]["secretKeyRef"] == {
                    "name": "hapo-api-token",
                    "key": "HAPO_API_TOKEN",
                }
    hpa = find(objects, "HorizontalPodAutoscaler", "reward")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "reward" and hpa["minReplicas"] >= 2
    pdb = find(objects, "PodDisruptionBudget", "rollout")["spec"]
    assert pdb["selector"]["matchLabels"] == {"app.kubernetes.io/name": "rollout"}


def test_configmap_carries_the_same_run_config_as_compose(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    configmap = find(rendered["base"], "ConfigMap", "hapo-config")
    assert configmap["data"]["hapo.yaml"] == (REPO / "deploy/config/hapo.yaml").read_text()


@pytest.mark.parametrize(
    ("name", "variable", "key"),
    [
        ("api-token", "HAPO_API_TOKEN", "api.token"),
        ("redis-password", "HAPO_REDIS_PASSWORD", "redis.password"),
    ],
)
def test_the_secret_files_are_git_ignored_and_none_is_committed(
    name: str, variable: str, key: str
) -> None:
    ignored = (REPO / "deploy" / ".gitignore").read_text().split()
    assert f"/k8s/base/{name}.env" in ignored and f"/compose/{name}.env" in ignored
    for example in (f"k8s/base/{name}.env.example", f"compose/{name}.env.example"):
        lines = (REPO / "deploy" / example).read_text().splitlines()
        assert f"{variable}=" in lines  # empty: a user must fill it in
        assert any(MAKE_API_TOKEN in line for line in lines)  # and is told how
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be at least 16"):
            load_config(environ={variable: ""})  # left empty, the services refuse it


def test_rayjob_ray_version_is_the_images_ray(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rayjob = find(rendered["overlays/gpu"], "RayJob", "trainer")
    constraints = (REPO / "constraints/cpu.txt").read_text().splitlines()
    (ray,) = [line.split("==")[1] for line in constraints if line.startswith("ray==")]
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray
    assert f"ARG RAY_VERSION={ray}" in dockerfile


def test_vendored_kuberay_crd_is_the_recorded_upstream_file() -> None:
    import hashlib

    source = (REPO / "deploy" / "schemas" / "README.md").read_text()
    digest = hashlib.sha256(KUBERAY_CRD.read_bytes()).hexdigest()
    assert digest in source
