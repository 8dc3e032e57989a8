"""The open-files limit a worker raises at start, and the connections it leaves room for."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from meshca.adapters.grpc.server import ConnectionLimits
from meshca.adapters.open_files import MAX_CONNECTIONS_PER_WORKER, connection_cap


@pytest.mark.parametrize(
    ("open_files", "cap"),
    [
        pytest.param(256, 192, id="ok/tiny-limit-keeps-a-quarter"),
        pytest.param(1024, 768, id="ok/common-default"),
        pytest.param(4096, 3072, id="ok/reserves-1024"),
        pytest.param(1_048_576, MAX_CONNECTIONS_PER_WORKER, id="ok/ceiling"),
        pytest.param(resource.RLIM_INFINITY, MAX_CONNECTIONS_PER_WORKER, id="ok/unlimited"),
        pytest.param(40, 64, id="ok/floor"),
    ],
)
def test_connection_cap(open_files: int, cap: int) -> None:
    assert connection_cap(open_files) == cap


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    # In a child process with a low soft limit, so this process's limit is left alone.
    code = (
        "import resource\n"
        "from meshca.adapters.open_files import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "got = raise_open_files_limit()\n"
        "assert got == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (got, hard)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_connection_limits_become_grpc_options() -> None:
    options = dict(ConnectionLimits(idle_seconds=2.5, max_connections=900).options())
    assert options["grpc.max_connection_idle_ms"] == 2500
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.http2.ping_timeout_ms"] == options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.max_concurrent_streams"] == 1024
    assert options["grpc.max_allowed_incoming_connections"] == 900
    assert "grpc.max_allowed_incoming_connections" not in dict(ConnectionLimits().options())
