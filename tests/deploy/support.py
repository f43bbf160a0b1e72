"""Helpers shared by the deployment tests: paths, chart rendering, tools,
and running the real worker binary the way a manifest describes it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "agent-block"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

# A worker should be ready in well under a second (the design aims at 200 ms),
# but a debug build on a busy 2-core CI machine, next to a nats-server that is
# still warming up JetStream, can be much slower. 20 s only bounds a worker
# that never becomes ready.
READY_TIMEOUT = 20.0


def tool(name: str) -> str | None:
    """A tool from this interpreter's venv bin/ (where pip puts hadolint,
    kubernetes-validate and nats-server), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def agent_block_bin() -> Path:
    return (REPO / os.environ.get("AGENT_BLOCK_BIN", "target/debug/agent-block")).resolve()


# --- chart -----------------------------------------------------------------

def render(values: dict | None = None, name: str = "demo", namespace: str = "work") -> dict[str, str]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name=name, namespace=namespace)


def manifests(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object in a render (NOTES.txt and empty files left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def seconds(duration: str) -> float:
    """The few humantime forms the deployment files use: "10s", "500ms", "1m"."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit) and duration[: -len(unit)].strip().isdigit():
            return int(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"unsupported duration {duration!r}")


# --- Dockerfile ------------------------------------------------------------

def dockerfile_final_stage() -> dict[str, str]:
    """Instruction -> argument text of the last stage (the runtime image)."""
    stage: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = {}
        stage[word] = rest.strip()
    return stage


def image_entrypoint() -> list[str]:
    return json.loads(dockerfile_final_stage()["ENTRYPOINT"])


# --- running the worker ----------------------------------------------------

# Ports handed to workers come from a range this process owns, never from
# binding port 0 and releasing it (another process could take the number in
# between). A listener on a range's first port claims the range for the life of
# the process; the Rust tests follow the same rule (tests/common), so they pick
# other ranges. The ranges lie below Linux's ephemeral ports (32768-60999).
_PORT_RANGES_START, _PORT_RANGE_SIZE, _PORT_RANGES = 20000, 200, 60
_port_claims: list[socket.socket] = []
_next_port = _port_range_end = 0


def free_port() -> int:
    """A port no other test is given."""
    global _next_port, _port_range_end
    if _next_port >= _port_range_end:
        first = os.getpid() % _PORT_RANGES
        for i in range(_PORT_RANGES):
            start = _PORT_RANGES_START + ((first + i) % _PORT_RANGES) * _PORT_RANGE_SIZE
            claim = socket.socket()
            try:
                claim.bind(("127.0.0.1", start))
                claim.listen(1)
            except OSError:
                claim.close()
                continue
            _port_claims.append(claim)
            _next_port, _port_range_end = start + 1, start + _PORT_RANGE_SIZE
            break
        else:
            raise RuntimeError("no free test port range between 20000 and 32000")
    port = _next_port
    _next_port += 1
    return port


def need_tool(name: str, install: str) -> str:
    """The path of a tool a check cannot run without. Missing, the check fails:
    tests/run installs every tool, so a skip would hide a broken install."""
    import pytest

    path = tool(name)
    if path:
        return path
    pytest.fail(f"{name} not installed ({install}); tests/run installs it")


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def base_env() -> dict[str, str]:
    """A clean environment: nothing from the developer's shell (NATS_URL,
    AGENT_BLOCK_*, OTEL_*) may leak into what the manifest sets."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_BACKTRACE": "1"}


class Worker:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def wait_status(self, port: int, path: str, want: int, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"worker exited with {self.proc.returncode} before {path} was {want}:\n{self.output()}"
            )
            last = http_status(port, path)
            if last == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"{path} still {last} after {timeout}s, wanted {want}:\n{self.output()}")

    def terminate(self, grace: float) -> int:
        """SIGTERM, then the exit code; the design promises an exit within
        grace plus a second."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace + 1)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running {grace + 1}s after SIGTERM:\n{self.output()}")


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: Path):
    worker = Worker(argv, env, log)
    with open(log, "wb") as out:
        worker.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield worker
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def request(nats_url: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the client subcommand (`agent-block request ...`) against nats_url."""
    env = {**env, "NATS_URL": nats_url, "AGENT_BLOCK_NATS_URL": nats_url}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
