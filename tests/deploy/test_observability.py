"""The chart's Grafana dashboard and PrometheusRule: every query names a metric
that a running worker exports, the rules pass `promtool check rules`, and the
worker's /metrics page passes `promtool check metrics`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

import support
from support import manifests, only, render

# A plain import: without the Helm SDK these checks fail instead of passing as
# skipped (tests/run installs it from requirements.txt).
import helm_python  # noqa: E402,F401

OBSERVABILITY = {"grafana": {"dashboard": {"enabled": True}}, "prometheusRule": {"enabled": True}}

SCRIPT = """
bus.subscribe("echo")
bus.consume({ stream = "OBS", consumer = "work", subject = "obs.>",
  create_stream = { subjects = { "obs.>" } } })
bus.on("echo", function(ev) return ev.payload end)
bus.on_any(function(ev) return true end)
"""

# PromQL words that are not metric names.
PROMQL = {
    "sum", "by", "rate", "increase", "histogram_quantile", "min", "max", "le", "outcome", "kind", "pod",
    "stream", "consumer", "namespace", "service", "and", "or", "on", "without", "avg", "count",
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not installed: apt-get install prometheus (tests/run does)"
    return path


@pytest.fixture(scope="module")
def scraped(nats_server, agent_block_bin, tmp_path_factory) -> str:
    """The /metrics page of a worker that served a request and a JetStream consumer."""
    tmp = tmp_path_factory.mktemp("obs")
    script = tmp / "app.lua"
    script.write_text(SCRIPT)
    port = support.free_port()
    env = {**support.base_env(), "AGENT_BLOCK_METRICS_ADDR": f"127.0.0.1:{port}", "NATS_URL": nats_server.url}
    argv = [str(agent_block_bin), "run", str(script), "--name", "obs"]
    with support.running(argv, env, tmp / "worker.log") as worker:
        worker.wait_status(port, "/readyz", 200)
        reply = support.request(nats_server.url, [str(agent_block_bin), "request", "echo", '{"a":1}'], support.base_env())
        assert reply.returncode == 0, reply.stderr + worker.output()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            page = resp.read().decode()
        assert worker.terminate(10) == 0
    return page


def exported_names(page: str) -> set[str]:
    """Every series name the page has (histograms as _bucket, _sum and _count)."""
    names = set()
    for line in page.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b(agent_block_[a-z_]+)\b", expr))
    return words - PROMQL


def test_metrics_page_passes_promtool(scraped, tmp_path):
    result = subprocess.run([promtool(), "check", "metrics"], input=scraped, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr + scraped
    assert "agent_block_events_total" in scraped


def test_dashboard_parses_and_queries_exported_metrics(scraped):
    docs = manifests(render(OBSERVABILITY))
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    exported = exported_names(scraped)
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            assert names <= exported, f"{panel['title']}: {names - exported} not exported"
    for wanted in ["Events/s by outcome", "Handler latency", "Handlers in flight", "Queued events",
                   "JetStream redeliveries/s", "JetStream dead letters", "NATS connected"]:
        assert wanted in titles


def test_prometheus_rule_passes_promtool_and_queries_exported_metrics(scraped, tmp_path):
    docs = manifests(render(OBSERVABILITY))
    rule = only(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = exported_names(scraped)
    alerts = set()
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            alerts.add(entry["alert"])
            names = metric_names(entry["expr"])
            assert names and names <= exported, f"{entry['alert']}: {names - exported} not exported"
    assert alerts == {"AgentBlockHighErrorRatio", "AgentBlockNatsDisconnected", "AgentBlockDeadLetters",
                      "AgentBlockSlowHandlers"}


def test_dashboard_and_rule_are_off_by_default():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests(render())}
    assert not any(kind == "PrometheusRule" or name.endswith("-dashboard") for kind, name in kinds)
