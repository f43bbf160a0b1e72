"""The deployment files really start the product: the worker binary runs with
exactly the args and env the rendered Deployment (or the compose worker
service) gives it, against a private nats-server, and its probes, a request
and a clean SIGTERM shutdown behave as the manifests assume.

Only what exists solely inside a cluster or compose network is rewritten:
the script mount becomes a temp dir, NATS and the metrics listener move to
loopback, and an OTLP endpoint host becomes a closed loopback port (the
exporter still runs, nothing leaves this machine)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

import support
from support import manifests, only, render

CHART_CASES = {
    "defaults": {},
    # Every worker setting the chart can pass, so a name the binary does not
    # accept (or a value it cannot parse) fails here.
    "all-settings": {
        "worker": {
            "name": "chart-live",
            "workers": 2,
            "concurrency": 4,
            "handlerTimeout": "5s",
            "graceSeconds": 3,
            "luaMemoryLimit": "64MiB",
            "connectTimeout": "30s",
            "logFormat": "pretty",
        },
        "otel": {"endpoint": "http://otel-collector:4318"},
    },
}


def loopback_otel(env: dict[str, str]) -> None:
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{support.free_port()}"


def exercise(worker, port, ready_path, live_path, grace, bin_path, nats_url, demo_argv=None):
    """Ready, alive, answers a request, then drains and exits 0 on SIGTERM."""
    worker.wait_status(port, ready_path, 200)
    assert support.http_status(port, live_path) == 200
    argv = demo_argv or ["request", "echo", '{"hello":"world"}', "--timeout", "5s"]
    reply = support.request(nats_url, [str(bin_path), *argv], support.base_env())
    assert reply.returncode == 0, reply.stdout + reply.stderr + worker.output()
    assert json.loads(reply.stdout) == {"hello": "world"}
    # Prometheus scrapes the same listener the probes use.
    assert support.http_status(port, "/metrics") == 200
    code = worker.terminate(grace)
    assert code == 0, f"exit {code} after SIGTERM:\n{worker.output()}"


@pytest.mark.parametrize("case", list(CHART_CASES))
def test_rendered_deployment_runs_the_worker(case, nats_server, agent_block_bin, tmp_path):
    docs = manifests(render(CHART_CASES[case]))
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = only(docs, "ConfigMap")

    # The image's ENTRYPOINT is the binary under test.
    command = container.get("command") or support.image_entrypoint()
    assert command == ["/usr/local/bin/agent-block"]

    # The ConfigMap's files stand in for the volume mount.
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, source in configmap["data"].items():
        (scripts / name).write_text(source)
    args = [a.replace(mount["mountPath"], str(scripts)) for a in container["args"]]

    env = {**support.base_env(), **{e["name"]: e["value"] for e in container["env"]}}
    env["AGENT_BLOCK_NATS_URL"] = nats_server.url
    loopback_otel(env)

    # The probes name a container port; the rendered metrics address must
    # listen on it, then moves to a free loopback port for this test.
    probe = container["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["AGENT_BLOCK_METRICS_ADDR"] == f"0.0.0.0:{ports[probe['port']]}"
    assert container["livenessProbe"]["httpGet"]["port"] == probe["port"]
    port = support.free_port()
    env["AGENT_BLOCK_METRICS_ADDR"] = f"127.0.0.1:{port}"

    grace = support.seconds(env["AGENT_BLOCK_GRACE"])
    with support.running([str(agent_block_bin), *args], env, tmp_path / "worker.log") as worker:
        exercise(worker, port, probe["path"], container["livenessProbe"]["httpGet"]["path"],
                 grace, agent_block_bin, nats_server.url)


def test_compose_worker_runs_and_demo_gets_its_answer(nats_server, agent_block_bin, tmp_path):
    services = yaml.safe_load(support.COMPOSE_FILE.read_text())["services"]
    worker_svc, demo_svc = services["worker"], services["demo"]

    # "./lua/examples:/scripts:ro" -> the repository's lua/examples.
    host, target = worker_svc["volumes"][0].split(":")[:2]
    scripts = (support.REPO / host).resolve()
    assert (scripts / "echo.lua").is_file()
    args = [a.replace(target, str(scripts)) for a in worker_svc["command"]]

    env = {**support.base_env(), **{k: str(v) for k, v in worker_svc["environment"].items()}}
    env["NATS_URL"] = nats_server.url
    loopback_otel(env)

    # The healthcheck asks /readyz on the port of AGENT_BLOCK_METRICS_ADDR.
    check = worker_svc["healthcheck"]["test"]
    assert check[:3] == ["CMD", "bash", "-c"]
    listen_port = env["AGENT_BLOCK_METRICS_ADDR"].rsplit(":", 1)[1]
    match = re.search(r"/dev/tcp/127\.0\.0\.1/(\d+).*GET (/\S+)", check[3])
    assert match and match.group(1) == listen_port
    port = support.free_port()
    env["AGENT_BLOCK_METRICS_ADDR"] = f"127.0.0.1:{port}"

    grace = support.seconds(env["AGENT_BLOCK_GRACE"])
    with support.running([str(agent_block_bin), *args], env, tmp_path / "worker.log") as worker:
        worker.wait_status(port, match.group(2), 200)
        # The compose healthcheck command itself, pointed at this port.
        healthcheck = subprocess.run(
            ["bash", "-c", check[3].replace(f"/{listen_port} ", f"/{port} ")], timeout=10
        )
        assert healthcheck.returncode == 0, worker.output()
        exercise(worker, port, match.group(2), "/healthz", grace, agent_block_bin,
                 nats_server.url, demo_argv=demo_svc["command"])
