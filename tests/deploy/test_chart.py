"""The Helm chart, rendered by real Helm (helm-python-sdk): lint, strict Kubernetes schemas, the KEDA ScaledObject
schema, the pod contract with the server, pools, and the KEDA queries under `promtool test rules`."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from tests.deploy.helm_child import HELM, HelmError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sie"
EXAMPLES = ROOT / "deploy" / "helm" / "examples"
PROMTOOL_TEST = ROOT / "deploy" / "prometheus" / "keda-query-test.yaml"
KUBE_VERSION = "1.30.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")

helm = HELM  # real Helm, in a child process of its own (helm_child.py says why)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


EVERYTHING = {
    "keda": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "auth": {"existingSecret": "sie-auth"},
    "cache": {"persistentVolumeClaim": {"enabled": True, "storageClassName": "nfs"}},
    "bundle": {"extraFiles": {"mine.yaml": "sie_id: me/mine\n"}},
    "env": {"SIE_MAX_BATCH_ITEMS": "128"},
    "logs": {"json": True, "accessLog": True},
    "tracing": {"otlpEndpoint": "http://otel-collector.monitoring:4318", "serviceName": "embeddings"},
    "cors": {"allowOrigins": ["https://app.example.com", "http://localhost:3000"]},
    "modelStore": {"enabled": True},
}
CASES = {
    "default": {},
    "gpu": example("gpu.yaml"),
    "keda": {"keda": {"enabled": True}},
    "two-pools": example("two-pools.yaml"),
    "everything": EVERYTHING,
}


def render(values: dict[str, Any], name: str = "sie", namespace: str = "sie") -> list[dict[str, Any]]:
    """The manifests Helm renders, blank documents (disabled templates) dropped."""
    out = helm.render(CHART, copy.deepcopy(values), name=name, namespace=namespace)
    docs = [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)]
    return [d for d in docs if d]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in kinds(docs, kind) if d["metadata"]["name"] == name]
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def closed(schema: Any) -> Any:
    """The schema with unknown properties refused: the cloudcoil models accept any extra field."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(v) for v in schema]
    return schema


SCALED_OBJECT_SCHEMA = closed(ScaledObject.model_json_schema(by_alias=True))


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case: str) -> None:
    result = helm.lint(CHART, copy.deepcopy(CASES[case]), kube_version=KUBE_VERSION)
    assert result["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); warnings (2) and errors (4) fail.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("case", CASES)
def test_core_manifests_validate_strictly(case: str) -> None:
    docs = render(CASES[case])
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    assert {"Deployment", "Service", "ConfigMap"} <= {d["kind"] for d in core}
    for doc in core:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", ["keda", "two-pools", "everything"])
def test_scaled_objects_validate_against_keda_schema(case: str) -> None:
    docs = render(CASES[case])
    scaled = kinds(docs, "ScaledObject")
    assert len(scaled) == len(kinds(docs, "Deployment")) >= 1
    for doc in scaled:
        ScaledObject.model_validate(doc)
        jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
        deployment = one(docs, "Deployment", doc["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in deployment["spec"]  # the HPA owns it; an upgrade must not reset it


def test_keda_schema_check_catches_mistakes() -> None:
    (doc,) = kinds(render(CASES["keda"]), "ScaledObject")
    bad = copy.deepcopy(doc)
    bad["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)
    typo = copy.deepcopy(doc)
    typo["spec"]["cooldownPeriods"] = 300
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCALED_OBJECT_SCHEMA)


def test_keda_off_renders_no_scaled_object_and_fixed_replicas() -> None:
    docs = render({})
    assert kinds(docs, "ScaledObject") == []
    (deployment,) = kinds(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1


def test_pod_runs_the_server_with_its_contract() -> None:
    docs = render({})
    deployment = one(docs, "Deployment", "sie-default")
    c = container(deployment)
    assert c["command"] == ["sie-server"]
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--bundle", "/etc/sie/bundle",
                         "--device", "cpu", "-m", "sentence-transformers/all-MiniLM-L6-v2"]
    e = env(deployment)
    assert e["SIE_POOL"] == "default"
    assert e["SIE_POOL_MAP"] == "/etc/sie/pools/pools.json"
    assert e["HF_HOME"].startswith("/var/cache/sie")
    assert "SIE_API_KEY" not in e
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"bundle": "/etc/sie/bundle", "pools": "/etc/sie/pools", "cache": "/var/cache/sie",
                      "tmp": "/tmp"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["bundle"]["configMap"]["name"] == "sie-bundle"
    assert volumes["pools"]["configMap"]["name"] == "sie-pools"
    assert "emptyDir" in volumes["cache"] and "emptyDir" in volumes["tmp"]
    # a read-only root: everything the server writes goes to the cache volume or /tmp
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))


def test_logs_tracing_cors_and_the_model_store_become_flags_per_pool() -> None:
    docs = render(example("two-pools.yaml") | {k: EVERYTHING[k] for k in ("logs", "tracing", "cors", "modelStore")})
    for deployment in kinds(docs, "Deployment"):
        args = container(deployment)["args"]
        pool = env(deployment)["SIE_POOL"]
        tail = args[args.index("--json-output"):]
        assert tail == ["--json-output", "--access-log", "--otlp-endpoint", "http://otel-collector.monitoring:4318",
                        "--otlp-service-name", "embeddings", "--cors-allow-origin", "https://app.example.com",
                        "--cors-allow-origin", "http://localhost:3000", "--model-store",
                        f"/var/cache/sie/model-store/{pool}.json"]  # each pool its own store: none sees another's
    assert len({container(d)["args"][-1] for d in kinds(docs, "Deployment")}) == 2
    off = container(one(render({}), "Deployment", "sie-default"))["args"]
    assert not {"--json-output", "--otlp-endpoint", "--cors-allow-origin", "--model-store"} & set(off)


def test_probes_and_shutdown_cover_loads_and_drain() -> None:
    deployment = one(render({"shutdown": {"drainDeadlineSeconds": 45}}), "Deployment", "sie-default")
    c = container(deployment)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # first model loads
    assert env(deployment)["SIE_SHUTDOWN_DEADLINE_S"] == "45"
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # uvicorn drains HTTP within the deadline, then the pool drains batches within another.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == sleep + 2 * 45 + 5


def test_gpu_pool_requests_gpus_and_cpu_pool_does_not() -> None:
    docs = render(CASES["two-pools"])
    gpu, cpu = one(docs, "Deployment", "sie-gpu"), one(docs, "Deployment", "sie-cpu")
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(gpu)["resources"]["limits"]["memory"] == "24Gi"
    assert container(gpu)["args"][container(gpu)["args"].index("--device") + 1] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        gpu["spec"]["template"]["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(container(cpu)["resources"])
    assert "tolerations" not in cpu["spec"]["template"]["spec"]
    assert env(cpu)["SIE_MEMORY_BUDGET"] == "6GiB"
    pinned = one(render(CASES["gpu"]), "Deployment", "sie-gpu")
    assert pinned["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}


def test_each_pool_runs_its_own_image_and_the_gpu_examples_name_the_cuda_one() -> None:
    docs = render(CASES["two-pools"] | {"image": {"repository": "registry.example.com/sie", "tag": "0.1.0",
                                                  "pullPolicy": "Always"}})
    gpu, cpu = container(one(docs, "Deployment", "sie-gpu")), container(one(docs, "Deployment", "sie-cpu"))
    assert gpu["image"] == "registry.example.com/sie:0.1.0-cuda" and cpu["image"] == "registry.example.com/sie:0.1.0"
    assert gpu["imagePullPolicy"] == cpu["imagePullPolicy"] == "Always"  # what the pool does not set comes from above
    for case in ("gpu", "two-pools"):
        for deployment in kinds(render(CASES[case]), "Deployment"):
            if "nvidia.com/gpu" in json.dumps(container(deployment).get("resources", {})):
                assert container(deployment)["image"].endswith("-cuda"), case
    assert container(one(render({}), "Deployment", "sie-default"))["image"] == "sie-server:0.1.0"


def test_runtime_class_and_host_pid_are_per_pool_and_host_pid_is_opt_in() -> None:
    example_pod = one(render(CASES["gpu"]), "Deployment", "sie-gpu")["spec"]["template"]["spec"]
    assert example_pod["runtimeClassName"] == "nvidia" and "hostPID" not in example_pod
    pools = copy.deepcopy(CASES["gpu"]["pools"])
    pools[0]["hostPID"] = True
    opted = one(render({"pools": pools}), "Deployment", "sie-gpu")
    kubernetes_validate.validate(opted, KUBE_VERSION, strict=True)
    assert opted["spec"]["template"]["spec"]["hostPID"] is True
    default_pod = one(render({}), "Deployment", "sie-default")["spec"]["template"]["spec"]
    assert "hostPID" not in default_pod and "runtimeClassName" not in default_pod


def test_worker_threads_follow_the_pod_s_cpu_request() -> None:
    deployment = one(render({}), "Deployment", "sie-default")
    assert env(deployment)["SIE_WORKER_THREADS"] == {
        "resourceFieldRef": {"containerName": "sie", "resource": "requests.cpu", "divisor": "1"}}
    told = one(render({"env": {"SIE_WORKER_THREADS": "3"}}), "Deployment", "sie-default")
    assert env(told)["SIE_WORKER_THREADS"] == "3"  # an explicit value wins, and appears once
    assert [e["name"] for e in container(told)["env"]].count("SIE_WORKER_THREADS") == 1


def test_api_key_and_admin_token_come_from_the_secret() -> None:
    e = env(one(render(EVERYTHING), "Deployment", "sie-default"))
    assert e["SIE_API_KEY"] == {"secretKeyRef": {"name": "sie-auth", "key": "api-key"}}
    assert e["SIE_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "sie-auth", "key": "admin-token", "optional": True}}
    assert e["SIE_MAX_BATCH_ITEMS"] == "128"


def test_pools_get_a_deployment_service_and_pool_map_entry_each() -> None:
    docs = render(CASES["two-pools"], name="prod", namespace="ml")
    assert {d["metadata"]["name"] for d in kinds(docs, "Deployment")} == {"prod-sie-cpu", "prod-sie-gpu"}
    pool_map = json.loads(one(docs, "ConfigMap", "prod-sie-pools")["data"]["pools.json"])
    assert pool_map == {
        "sentence-transformers/all-MiniLM-L6-v2": "http://prod-sie-cpu.ml.svc:8080",
        "BAAI/bge-small-en-v1.5": "http://prod-sie-cpu.ml.svc:8080",
        "BAAI/bge-m3": "http://prod-sie-gpu.ml.svc:8080",
    }
    entry = one(docs, "Service", "prod-sie")
    for deployment in kinds(docs, "Deployment"):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        pool = pod_labels["sie/pool"]
        service = one(docs, "Service", f"prod-sie-{pool}")
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert entry["spec"]["selector"].items() <= pod_labels.items()  # the entry Service reaches every pool
        assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        assert pool_map[container(deployment)["args"][-1]] == f"http://{service['metadata']['name']}.ml.svc:8080"
        assert env(deployment)["SIE_POOL"] == pool
    # Pods of one pool never match another pool's Service.
    cpu_pods = one(docs, "Deployment", "prod-sie-cpu")["spec"]["template"]["metadata"]["labels"]
    assert not one(docs, "Service", "prod-sie-gpu")["spec"]["selector"].items() <= cpu_pods.items()


@pytest.mark.parametrize(("pools", "message"), [
    ([{"name": "a", "models": ["m"]}, {"name": "b", "models": ["m"]}], 'model "m" is in pools "a" and "b"'),
    ([{"name": "A_b", "models": ["m"]}], "not a valid pool name"),
    ([{"name": "a", "models": []}], 'pool "a" lists no models'),
])
def test_bad_pools_fail_to_render(pools: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(HelmError, match=message):
        render({"pools": pools})


def test_scale_to_zero_adds_a_wake_trigger() -> None:
    docs = render(CASES["two-pools"])
    gpu, cpu = one(docs, "ScaledObject", "sie-gpu"), one(docs, "ScaledObject", "sie-cpu")
    assert gpu["spec"]["minReplicaCount"] == 0
    assert [t["name"] for t in gpu["spec"]["triggers"]] == ["queue-depth", "wake"]
    assert cpu["spec"]["minReplicaCount"] == 1
    assert [t["name"] for t in cpu["spec"]["triggers"]] == ["queue-depth"]
    queue = cpu["spec"]["triggers"][0]["metadata"]
    assert queue["threshold"] == "32" and queue["activationThreshold"] == "0"
    behavior = cpu["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert cpu["spec"]["cooldownPeriod"] == 300


def test_promtool_file_tests_the_rendered_queries() -> None:
    docs = render(CASES["two-pools"])
    queries = {t["metadata"]["query"] for so in kinds(docs, "ScaledObject") for t in so["spec"]["triggers"]}
    tested = {case["expr"] for group in yaml.safe_load(PROMTOOL_TEST.read_text())["tests"]
              for case in group["promql_expr_test"] if case["exp_samples"]}
    assert queries == tested


def test_promtool_keda_query_returns_expected_values() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install --no-install-recommends prometheus)")
    result = subprocess.run([promtool, "test", "rules", str(PROMTOOL_TEST)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bundle_config_map_holds_the_default_bundle_plus_extra_files() -> None:
    data = one(render(EVERYTHING), "ConfigMap", "sie-bundle")["data"]
    shipped = {p.name: p.read_text().strip() for p in (ROOT / "bundles" / "default").glob("*.yaml")}
    assert {k: v.strip() for k, v in data.items() if k != "mine.yaml"} == shipped
    assert data["mine.yaml"].strip() == "sie_id: me/mine"
    replaced = one(render({"bundle": {"extraFiles": {"bge-m3.yaml": "sie_id: BAAI/bge-m3\n"}}}), "ConfigMap",
                   "sie-bundle")["data"]
    assert replaced["bge-m3.yaml"].strip() == "sie_id: BAAI/bge-m3"


def test_example_pools_serve_bundle_models() -> None:
    shipped = {doc["sie_id"] for p in (ROOT / "bundles" / "default").glob("*.yaml")
               for doc in yaml.safe_load_all(p.read_text()) if doc}
    for values in (CASES["gpu"], CASES["two-pools"], yaml.safe_load((CHART / "values.yaml").read_text())):
        for pool in values["pools"]:
            assert set(pool["models"]) <= shipped, pool["name"]


def test_optional_objects() -> None:
    docs = render(EVERYTHING)
    assert {d["metadata"]["name"] for d in kinds(docs, "PodDisruptionBudget")} == {"sie-default"}
    (claim,) = kinds(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    volumes = {v["name"]: v for v in one(docs, "Deployment", "sie-default")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (monitor,) = kinds(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # It selects the pool Services only: the entry Service would scrape every pod a second time.
    assert monitor["spec"]["selector"]["matchExpressions"] == [{"key": "sie/pool", "operator": "Exists"}]
    assert "sie/pool" not in one(docs, "Service", "sie")["metadata"]["labels"]
    shared = render({"cache": {"persistentVolumeClaim": {"existingClaim": "models"}}})
    assert kinds(shared, "PersistentVolumeClaim") == []
    assert not {"PodDisruptionBudget", "ServiceMonitor", "ScaledObject"} & {d["kind"] for d in shared}


def test_dashboards_ship_as_a_sidecar_config_map() -> None:
    cm = one(render({}), "ConfigMap", "sie-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: json.loads(p.read_text()) for p in (ROOT / "deploy" / "grafana").glob("*.json")}
    assert files and {k: json.loads(v) for k, v in cm["data"].items()} == files
    off = render({"grafanaDashboards": {"enabled": False}})
    assert "sie-dashboards" not in {d["metadata"]["name"] for d in kinds(off, "ConfigMap")}
