"""OpenBao's PKI engine as the baseline: an in-memory dev server with one signing role.

The role keeps OpenBao's default ``no_store=false``: every certificate it signs is stored
(in memory here), which is what a stock PKI mount does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from procs import LOCALHOST, free_port, managed_group
from target import Target
from workload import SPIFFE_ID, TRUST_DOMAIN, leaf_uri_sans

__all__ = ["ROLE", "openbao_pki"]

ROLE = "bench"
MOUNT = "pki"
START_TIMEOUT = 30.0
# No proxy, whatever the environment says: every call goes straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Api:
    """Just enough of OpenBao's HTTP API, over urllib, for setup and one check."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr = addr
        self._token = token

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"{self.addr}/v1/{path}",
            data=data,
            method=method,
            headers={"X-Vault-Token": self._token, "Content-Type": "application/json"},
        )
        with _OPENER.open(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def wait_ready(self, proc_alive: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = self.call("GET", "sys/health")
                if health and not health.get("sealed", True):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if not proc_alive():
                raise RuntimeError("bao server exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao at {self.addr} not ready after {timeout:.0f}s")
            time.sleep(0.2)


@contextlib.contextmanager
def openbao_pki(bao: Path, workdir: Path, csr_pem: str) -> Iterator[Target]:
    """Start ``bao server -dev`` on a free 127.0.0.1 port, set up PKI, check one signing.

    The server is stopped when the block exits. Its HOME is ``workdir``, and
    ``-dev-no-store-token`` keeps it from writing a token file anywhere.
    """
    token = secrets.token_urlsafe(24)
    port = free_port()
    addr = f"http://{LOCALHOST}:{port}"
    argv = [
        str(bao),
        "server",
        "-dev",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address={LOCALHOST}:{port}",
        "-dev-no-store-token",
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "BAO_ADDR": addr,
    }
    with managed_group(argv, workdir / "openbao.log", env=env) as proc:
        api = _Api(addr, token)
        api.wait_ready(lambda: proc.poll() is None, START_TIMEOUT)
        _configure(api)
        body = workdir / "openbao-body.json"
        body.write_text(json.dumps(_sign_payload(csr_pem)))
        _check_one(api, csr_pem)
        yield Target(
            name="openbao",
            url=f"{addr}/v1/{MOUNT}/sign/{ROLE}",
            headers=["Content-Type: application/json", f"X-Vault-Token: {token}"],
            body=body,
            http1=True,
            pgid=proc.pid,
        )


def _sign_payload(csr_pem: str) -> dict[str, Any]:
    return {"csr": csr_pem, "uri_sans": SPIFFE_ID, "ttl": "1h"}


def _configure(api: _Api) -> None:
    api.call("POST", f"sys/mounts/{MOUNT}", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
    api.call(
        "POST",
        f"{MOUNT}/root/generate/internal",
        {"common_name": "bench root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"},
    )
    api.call(
        "POST",
        f"{MOUNT}/roles/{ROLE}",
        {
            "allowed_uri_sans": [f"spiffe://{TRUST_DOMAIN}/*"],
            "allow_any_name": True,
            "enforce_hostnames": False,
            "require_cn": False,
            "key_type": "any",
            "ttl": "1h",
            "max_ttl": "1h",
            # no_store stays at its default (false): issued certificates are stored.
        },
    )


def _check_one(api: _Api, csr_pem: str) -> None:
    """Sign once with urllib and check the answer really is our SPIFFE certificate."""
    answer = api.call("POST", f"{MOUNT}/sign/{ROLE}", _sign_payload(csr_pem))
    cert = (answer or {}).get("data", {}).get("certificate")
    if not cert:
        raise RuntimeError(f"OpenBao returned no certificate: {answer!r:.300}")
    uris = leaf_uri_sans(cert)
    if uris != [SPIFFE_ID]:
        raise RuntimeError(f"OpenBao's certificate has URI SANs {uris}, expected {SPIFFE_ID}")
