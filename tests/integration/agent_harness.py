"""Real ``meshca agent`` processes against an in-process server, for the agent tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.serve_process import REPO
from tests.integration.server_harness import RunningServer


@dataclass
class AgentProcess:
    socket: Path
    token_file: Path
    out_dir: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    serving: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def log(self, last: int = 60) -> str:
        return "".join(self.output[-last:])

    def wait_for_log(self, pattern: str, timeout: float = 20, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output[since:]:
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")

    def health(self, service: str = "") -> str:
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_health(self, status: str, service: str = "", timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = self.health(service)
            if seen == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"health {service!r} is {seen}, not {status}:\n{self.log()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self.reader is not None:
                self.reader.join(10)
            if self.process.stdout is not None:
                self.process.stdout.close()


def short_dir() -> Path:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="mca-", dir="/tmp"))


def agent_command(
    target: str, token_file: Path, socket: Path, *extra: str, ca_file: Path | None = None
) -> list[str]:
    trust = ["--ca-file", str(ca_file), "--server-name", "localhost"] if ca_file else []
    return [
        sys.executable,
        "-m",
        "meshca",
        "agent",
        "--server",
        target,
        "--token-file",
        str(token_file),
        "--socket",
        str(socket),
        *trust,
        *extra,
    ]


def start_agent_process(
    command: list[str], socket: Path, token_file: Path, out_dir: Path, wait: bool = True
) -> AgentProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p
    )
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        cwd=REPO,
    )
    agent = AgentProcess(socket, token_file, out_dir, process)

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            agent.output.append(line)
            if "serving on unix:" in line:
                agent.serving.set()
        agent.serving.set()

    agent.reader = threading.Thread(target=collect, daemon=True)
    agent.reader.start()
    if wait:
        assert agent.serving.wait(30) and process.poll() is None, agent.log()
    return agent


def launch_agent(
    server: RunningServer, directory: Path, *extra: str, name: str = "web"
) -> AgentProcess:
    """An agent for service account ``name`` in namespace default, with --out-dir."""
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(server.roots_pem)
    token_file = directory / f"{name}.token"
    token_file.write_text(server.minter.mint(service_account=name))
    socket = directory / f"{name}.sock"
    out_dir = directory / f"{name}-out"
    command = agent_command(
        server.target,
        token_file,
        socket,
        "--out-dir",
        str(out_dir),
        *extra,
        ca_file=ca_file,
    )
    return start_agent_process(command, socket, token_file, out_dir)
