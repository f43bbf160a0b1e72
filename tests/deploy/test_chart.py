"""The Helm chart, rendered and linted by Helm's own Go SDK and checked against
the Kubernetes API schemas, all offline."""

from __future__ import annotations

import subprocess

import pytest
import yaml

import support
from support import manifests, only, render

# A plain import: without the Helm SDK the chart checks fail instead of passing
# as skipped (tests/run installs it from requirements.txt).
import helm_python as helm  # noqa: E402

COMMON_EXTRAS = {
    "nats": {"url": "nats://a:4222,nats://b:4222", "credentials": {"existingSecret": "nats-creds", "key": "user.creds"}},
    "worker": {
        "name": "orders",
        "workers": 2,
        "concurrency": 8,
        "luaMemoryLimit": "64MiB",
        "connectTimeout": "1m",
        "timeSlice": "5ms",
        "graceSeconds": 25,
    },
    "otel": {"endpoint": "http://otel-collector:4318"},
    "extraEnv": [{"name": "REGION", "value": "eu"}],
    "podAnnotations": {"team": "payments"},
    "podLabels": {"tier": "workers"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "workers", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "agent-block"}},
        }
    ],
    "imagePullSecrets": [{"name": "pull"}],
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "grafana": {"dashboard": {"enabled": True}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
}
KEDA = {"keda": {"enabled": True, "minReplicaCount": 0, "stream": "ORDERS", "consumer": "workers"}}
HPA = {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}

# Every optional feature on. HPA and KEDA exclude each other, hence two sets.
VALUE_SETS = {
    "defaults": {},
    "all-features-keda": {**COMMON_EXTRAS, **KEDA},
    "all-features-hpa": {**COMMON_EXTRAS, **HPA},
    "existing-configmap": {"existingConfigMap": "my-scripts", "entryScript": "main.lua"},
}
BUILT_IN = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}


@pytest.fixture(params=list(VALUE_SETS), scope="module")
def case(request):
    values = VALUE_SETS[request.param]
    return values, manifests(render(values))


def test_lint_has_no_error():
    for values in VALUE_SETS.values():
        report = helm.lint(str(support.CHART), values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_values_pass_the_schema():
    with helm.Chart.load(str(support.CHART)) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(values)


@pytest.mark.parametrize("kube_version", ["1.25.0", None])
def test_built_in_kinds_pass_kubernetes_validate_strict(case, tmp_path, kube_version):
    """The oldest Kubernetes the chart admits (kubeVersion) and the newest
    schemas kubernetes-validate ships."""
    cli = support.tool("kubernetes-validate")
    assert cli, "kubernetes-validate not installed: pip install -r tests/deploy/requirements.txt"
    _, docs = case
    files = []
    for i, doc in enumerate(d for d in docs if d["apiVersion"] in BUILT_IN):
        path = tmp_path / f"{i}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    assert files
    version = ["-k", kube_version] if kube_version else []
    result = subprocess.run([cli, "--strict", "--quiet", *version, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_kind_is_known(case):
    _, docs = case
    known = BUILT_IN | {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
    assert {d["apiVersion"] for d in docs} <= known


def test_deployment_hardening_and_probes(case):
    values, docs = case
    deploy = only(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The image's USER and the chart's runAsUser must agree.
    uid = support.dockerfile_final_stage()["USER"].split(":")[0]
    assert sc["runAsUser"] == int(uid)

    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert [p["name"] for p in container["ports"]] == ["metrics"]

    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = support.seconds(env["AGENT_BLOCK_GRACE"])
    # The kubelet must never SIGKILL a worker that is still inside --grace
    # (it exits within grace + 1s).
    assert pod["terminationGracePeriodSeconds"] > grace + 1
    assert values.get("worker", {}).get("graceSeconds", 10) == grace

    autoscaled = "keda" in values or "autoscaling" in values
    assert ("replicas" in deploy["spec"]) != autoscaled


def test_settings_reach_the_worker_env():
    values = VALUE_SETS["all-features-keda"]
    container = only(manifests(render(values)), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENT_BLOCK_NATS_URL"] == "nats://a:4222,nats://b:4222"
    assert env["AGENT_BLOCK_CREDS"] == "/etc/agent-block/nats/user.creds"
    assert env["AGENT_BLOCK_NAME"] == "orders"
    assert env["AGENT_BLOCK_WORKERS"] == "2"
    assert env["AGENT_BLOCK_CONCURRENCY"] == "8"
    assert env["AGENT_BLOCK_LUA_MEMORY_LIMIT"] == "64MiB"
    assert env["AGENT_BLOCK_CONNECT_TIMEOUT"] == "1m"
    assert env["AGENT_BLOCK_TIME_SLICE"] == "5ms"
    assert env["AGENT_BLOCK_GRACE"] == "25s"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["REGION"] == "eu"
    mount = {m["name"]: m for m in container["volumeMounts"]}["nats-creds"]
    assert env["AGENT_BLOCK_CREDS"].startswith(mount["mountPath"] + "/") and mount["readOnly"]


def test_defaults_leave_runtime_defaults_alone():
    container = only(manifests(render()), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    # 0 / empty means "the binary decides" (e.g. one Lua VM per CPU).
    assert not names & {"AGENT_BLOCK_WORKERS", "AGENT_BLOCK_CONCURRENCY", "AGENT_BLOCK_CREDS",
                        "AGENT_BLOCK_LUA_MEMORY_LIMIT", "AGENT_BLOCK_CONNECT_TIMEOUT",
                        "AGENT_BLOCK_TIME_SLICE", "OTEL_EXPORTER_OTLP_ENDPOINT"}
    assert container["args"] == ["run", "/scripts/app.lua"]


def test_script_change_rolls_the_pods():
    def checksum(values):
        pod = only(manifests(render(values)), "Deployment")["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/scripts"]

    base = checksum({})
    assert base == checksum({})
    assert base != checksum({"scripts": {"app.lua": "bus.serve()\n"}})


def test_scripts_configmap_is_mounted():
    docs = manifests(render({"scripts": {"app.lua": "local m = require('lib')\n", "lib.lua": "return {}\n"}}))
    cm = only(docs, "ConfigMap")
    assert set(cm["data"]) == {"app.lua", "lib.lua"}
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in pod["volumes"]}["scripts"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]


def test_existing_configmap_replaces_the_chart_one():
    docs = manifests(render(VALUE_SETS["existing-configmap"]))
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["scripts"]["configMap"]["name"] == "my-scripts"
    assert pod["containers"][0]["args"] == ["run", "/scripts/main.lua"]


def test_keda_scaled_object_has_the_fields_its_crd_requires():
    docs = manifests(render(VALUE_SETS["all-features-keda"]))
    so = only(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["name"]
    assert so["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert meta == {
        "natsServerMonitoringEndpoint": "nats.nats.svc.cluster.local:8222",
        "account": "$G",
        "stream": "ORDERS",
        "consumer": "workers",
        "lagThreshold": "100",
        "activationLagThreshold": "0",
        "useHttps": "false",
    }
    # KEDA rejects trigger metadata that is not a string.
    assert all(isinstance(v, str) for v in meta.values())
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


def test_service_monitor_has_the_fields_its_crd_requires():
    docs = manifests(render(VALUE_SETS["all-features-hpa"]))
    sm = only(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    service = only(docs, "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_hpa_targets_the_deployment():
    docs = manifests(render(VALUE_SETS["all-features-hpa"]))
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]


def test_default_rollout_never_shrinks_the_pool():
    # README, "Shutdown, rolling updates and disruptions": a new pod is ready
    # before an old one is stopped.
    strategy = only(manifests(render()), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_default_pdb_evicts_one_pod_at_a_time():
    pdb = only(manifests(render()), "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]


def test_pdb_can_be_turned_off():
    docs = manifests(render({"podDisruptionBudget": {"enabled": False}}))
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert only(manifests(render(VALUE_SETS["all-features-hpa"])), "PodDisruptionBudget")["spec"]["maxUnavailable"] == "25%"


def test_pdb_and_service_select_the_pods():
    docs = manifests(render())
    labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert only(docs, "Service")["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize(
    "values, message",
    [
        ({**HPA, **KEDA}, "exclusive"),
        ({"entryScript": "missing.lua"}, "missing.lua"),
    ],
)
def test_render_refuses_contradictions(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


# Each bad value, and the part of Helm's message that must name it.
@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"replicaCount": "3"}, "/replicaCount"),
        ({"replicaCount": 1.5}, "/replicaCount"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
        ({"worker": {"graceSeconds": "10s"}}, "/worker/graceSeconds"),
        ({"worker": {"workers": -2}}, "/worker/workers"),
        ({"worker": {"handlerTimeout": "soon"}}, "/worker/handlerTimeout"),
        ({"worker": {"timeSlice": "fast"}}, "/worker/timeSlice"),
        ({"worker": {"logFormat": "xml"}}, "/worker/logFormat"),
        ({"worker": {"terminationGraceMarginSeconds": 0}}, "/worker/terminationGraceMarginSeconds"),
        ({"worker": {"surprise": 1}}, "surprise"),
        ({"metrics": {"port": 70000}}, "/metrics/port"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"scripts": {"app.lua": 42}}, "/scripts/app.lua"),
        ({"scripts": {"../escape.lua": "x"}}, "../escape.lua"),
        ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "/podDisruptionBudget/maxUnavailable"),
        ({"keda": {"enabled": True, "stream": "", "consumer": "c"}}, "/keda/stream"),
        ({"keda": {"lagThreshold": "10"}}, "/keda/lagThreshold"),
        ({"autoscaling": {"enabled": "yes"}}, "/autoscaling/enabled"),
        ({"prometheusRule": {"errorRatio": 5}}, "/prometheusRule/errorRatio"),
        ({"grafana": {"dashboard": {"enabled": "yes"}}}, "/grafana/dashboard/enabled"),
    ],
)
def test_schema_rejects_bad_values(values, where):
    with helm.Chart.load(str(support.CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.validate_schema(values)
    assert where in str(err.value)


def test_worker_name_is_a_valid_nats_name():
    # Helm allows dots in release names; the worker refuses them in --name.
    container = only(manifests(render(name="v1.2")), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENT_BLOCK_NAME"] == "v1-2-agent-block"
