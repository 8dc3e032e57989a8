"""OpenBao's PKI engine as the baseline, in two set-ups with the same signing role.

- ``openbao_pki``: the in-memory dev server. It stores nothing durably.
- ``openbao_raft_pki``: a durable server as one would run it: integrated (raft) storage
  on disk and a file audit device, so every request is written to the audit file and
  every certificate to the raft log before the answer leaves.

The role keeps OpenBao's default ``no_store=false``: every certificate it signs is stored,
which is what a stock PKI mount does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from procs import LOCALHOST, free_port, managed_group
from target import Counter, Target
from workload import SPIFFE_ID, TRUST_DOMAIN, leaf_uri_sans

__all__ = ["ROLE", "openbao_pki", "openbao_raft_pki"]

ROLE = "bench"
MOUNT = "pki"
SIGN_PATH = f"{MOUNT}/sign/{ROLE}"
START_TIMEOUT = 30.0
# No proxy, whatever the environment says: every call goes straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Api:
    """Just enough of OpenBao's HTTP API, over urllib, for setup and one check."""

    def __init__(self, addr: str, token: str | None) -> None:
        self.addr = addr
        self.token = token

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["X-Vault-Token"] = self.token
        request = urllib.request.Request(
            f"{self.addr}/v1/{path}", data=data, method=method, headers=headers
        )
        with _OPENER.open(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def wait_for(
        self, path: str, accept: Callable[[Any], bool], proc_alive: Any, timeout: float
    ) -> None:
        """GET ``path`` until a 2xx answer satisfies ``accept``.

        Any other status (sys/health answers 429 on a standby, 501 before init, 503
        sealed) or a refused connection means "not yet".
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if accept(self.call("GET", path)):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if not proc_alive():
                raise RuntimeError("bao server exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao at {self.addr}: {path} not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def wait_ready(self, proc_alive: Any, timeout: float) -> None:
        """Until sys/health says unsealed and active (a 200; standby answers 429)."""
        self.wait_for(
            "sys/health", lambda h: bool(h) and not h.get("sealed", True), proc_alive, timeout
        )


def _env(workdir: Path, addr: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "BAO_ADDR": addr,
    }


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
    with managed_group(argv, workdir / "openbao.log", env=_env(workdir, addr)) as proc:
        api = _Api(addr, token)
        api.wait_ready(lambda: proc.poll() is None, START_TIMEOUT)
        _configure(api)
        yield _target("openbao", api, workdir, csr_pem, proc.pid)


@contextlib.contextmanager
def openbao_raft_pki(bao: Path, workdir: Path, csr_pem: str) -> Iterator[Target]:
    """Start a durable ``bao server -config``: raft storage and a file audit device.

    Initialised over the API with one key share, unsealed, and used once it is the active
    node; then the same PKI set-up and check as the dev server. The unseal key and root
    token stay in this process's memory. The server is stopped when the block exits; its
    raft data and audit file live in ``workdir``.
    """
    home = workdir / "openbao-raft"
    (home / "raft").mkdir(parents=True)
    audit_file = home / "audit.log"
    port, cluster_port = free_port(), free_port()
    addr = f"http://{LOCALHOST}:{port}"
    config = home / "server.hcl"
    config.write_text(_raft_config(home / "raft", audit_file, port, cluster_port))
    argv = [str(bao), "server", f"-config={config}"]
    with managed_group(argv, workdir / "openbao-raft.log", env=_env(home, addr)) as proc:
        alive = lambda: proc.poll() is None  # noqa: E731
        api = _Api(addr, None)
        api.wait_for("sys/init", lambda s: s is not None, alive, START_TIMEOUT)
        init = api.call("POST", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        unsealed = api.call("POST", "sys/unseal", {"key": init["keys"][0]})
        if unsealed.get("sealed", True):
            raise RuntimeError(f"OpenBao stayed sealed after its one key share: {unsealed!r:.300}")
        api.token = init["root_token"]
        api.wait_ready(alive, START_TIMEOUT)
        api.wait_for("sys/leader", lambda s: bool(s) and s.get("is_self"), alive, START_TIMEOUT)
        _configure(api)
        if not audit_file.exists():
            raise RuntimeError(f"OpenBao wrote no audit file at {audit_file}")
        audited = _AuditedSignings(audit_file)
        counters = (
            Counter(f"completed {SIGN_PATH} responses in OpenBao's audit file", audited.count),
            # Each stored certificate is a raft log entry; housekeeping may add more.
            Counter("OpenBao's raft commit index", lambda: _raft_index(api), exact=False),
        )
        yield _target("openbao-raft", api, workdir, csr_pem, proc.pid, counters)


def _raft_config(raft_dir: Path, audit_file: Path, port: int, cluster_port: int) -> str:
    """The server's HCL. json.dumps quotes each string the way HCL reads it."""
    q = json.dumps
    return f"""\
storage "raft" {{
  path    = {q(str(raft_dir))}
  node_id = "bench"
}}

listener "tcp" {{
  address     = {q(f"{LOCALHOST}:{port}")}
  tls_disable = true
}}

api_addr      = {q(f"http://{LOCALHOST}:{port}")}
cluster_addr  = {q(f"https://{LOCALHOST}:{cluster_port}")}
disable_mlock = true

# OpenBao 2.x enables audit devices only from its configuration, not over the API.
audit "file" "bench-audit" {{
  options {{
    file_path = {q(str(audit_file))}
  }}
}}
"""


def _target(
    name: str,
    api: _Api,
    workdir: Path,
    csr_pem: str,
    pgid: int,
    counters: tuple[Counter, ...] = (),
) -> Target:
    """Write the request body, check one real signing, describe the target for h2load."""
    body = workdir / f"{name}-body.json"
    body.write_text(json.dumps(_sign_payload(csr_pem)))
    _check_one(api, csr_pem)
    return Target(
        name=name,
        url=f"{api.addr}/v1/{SIGN_PATH}",
        headers=["Content-Type: application/json", f"X-Vault-Token: {api.token}"],
        body=body,
        http1=True,
        pgid=pgid,
        counters=counters,
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
    answer = api.call("POST", SIGN_PATH, _sign_payload(csr_pem))
    cert = (answer or {}).get("data", {}).get("certificate")
    if not cert:
        raise RuntimeError(f"OpenBao returned no certificate: {answer!r:.300}")
    uris = leaf_uri_sans(cert)
    if uris != [SPIFFE_ID]:
        raise RuntimeError(f"OpenBao's certificate has URI SANs {uris}, expected {SPIFFE_ID}")


def _raft_index(api: _Api) -> int:
    """The raft log's commit index, from sys/leader (unauthenticated, not audited)."""
    return int(api.call("GET", "sys/leader")["raft_committed_index"])


class _AuditedSignings:
    """Counts the audit file's response entries for successful signings, incrementally.

    Each call reads only what was appended since the last one, up to the last complete
    line, so the count is cumulative and cheap however large the file grows.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._count = 0

    def count(self) -> int:
        with self._path.open("rb") as audit:
            audit.seek(self._offset)
            chunk = audit.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            entry = json.loads(line)
            if (
                entry.get("type") == "response"
                and entry.get("request", {}).get("path") == SIGN_PATH
                and not entry.get("error")
                and entry.get("response", {}).get("data", {}).get("certificate")
            ):
                self._count += 1
        return self._count
