"""A revoked client SVID stops opening the mTLS doors (policy port, audit port) within
one deny-list poll, though its chain still verifies at the handshake."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc
from tests.integration.server_harness import TRUST_DOMAIN, RunningServer, running_server
from tests.integration.test_audit_api import _issue
from tests.integration.test_policy_port import (
    ADMIN,
    AUDIT_TOKEN,
    POLICY_TOKEN,
    _channel,
    _explain,
    _ext_authz,
    _policies,
    _policy_channel,
    _refusals,
    _token_file,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AUDITOR = "spiffe://example.org/ns/audit/sa/auditor"
POLL = timedelta(milliseconds=200)
#: One poll, and room for a loaded machine.
WITHIN_ONE_POLL = POLL.total_seconds() + 2.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(
        tmp_path,
        policy_dir=_policies(tmp_path),
        policy_listen="127.0.0.1:0",
        policy_admin=(ADMIN,),
        policy_token_file=_token_file(tmp_path, "policy-token", POLICY_TOKEN),
        auditor=(AUDITOR,),
        audit_token_file=_token_file(tmp_path, "audit-token", AUDIT_TOKEN),
        audit_listen="127.0.0.1:0",
        journal_poll=POLL,
    ):
        yield running


def _revoke(server: RunningServer, *selector: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshca", "revoke", "--data-dir", str(server.settings.data_dir),
         "--trust-domain", TRUST_DOMAIN, *selector, "--reason", "key left on a laptop"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


async def _code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _eventually(check: object, want: grpc.StatusCode) -> grpc.StatusCode:
    """The code ``check()`` gives once it is ``want``, or the last one after one poll."""
    deadline = asyncio.get_running_loop().time() + WITHIN_ONE_POLL
    while True:
        code = await check()  # type: ignore[operator]
        if code == want or asyncio.get_running_loop().time() > deadline:
            return code
        await asyncio.sleep(0.05)


async def test_revoked_svids_are_refused_on_the_policy_and_audit_ports(
    server: RunningServer,
) -> None:
    proxy = await _issue(server, "shop", "frontend")
    other_proxy = await _issue(server, "shop", "backend")
    admin = await _issue(server, "ops", "policy-admin")
    auditor = await _issue(server, "audit", "auditor")
    denied = grpc.StatusCode.PERMISSION_DENIED

    async def ext_authz(client: tuple[bytes, bytes]) -> grpc.StatusCode:
        async with _policy_channel(server, client) as channel:
            return await _code_of(_ext_authz(channel))

    async def explain() -> grpc.StatusCode:
        async with _policy_channel(server, admin) as channel:
            return await _code_of(_explain(channel))

    async def audit() -> grpc.StatusCode:
        async with _channel(server, server.worker.audit_port, auditor) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            return await _code_of(stub.GetLogInfo(audit_pb2.GetLogInfoRequest(), timeout=10))

    # Before: every one of them is served.
    assert await ext_authz(proxy) == grpc.StatusCode.OK
    assert await explain() == grpc.StatusCode.OK
    assert await audit() == grpc.StatusCode.OK

    # By serial (the proxy), by key (the admin), by SPIFFE ID (the auditor).
    _revoke(server, "--serial", f"{_leaf(proxy[1]).serial_number:x}")
    spki = _leaf(admin[1]).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    _revoke(server, "--key-sha256", hashlib.sha256(spki).hexdigest())
    _revoke(server, "--spiffe-id", AUDITOR)

    assert await _eventually(lambda: ext_authz(proxy), denied) == denied
    assert await _eventually(explain, denied) == denied
    assert await _eventually(audit, denied) == denied
    # Another SVID of the same service is not touched; the admin's token still works.
    assert await ext_authz(other_proxy) == grpc.StatusCode.OK
    async with _policy_channel(server, other_proxy) as channel:
        assert await _code_of(
            _explain(channel, [("authorization", f"Bearer {POLICY_TOKEN}")])
        ) == grpc.StatusCode.OK

    # The policy doors record whom they refused, and why, naming no more than the entry.
    refused = _refusals(server, "envoy.service.auth.v3.Authorization/Check")
    assert ("revoked-svid", "spiffe://example.org/ns/shop/sa/frontend") in refused
    refused = _refusals(server, "meshca.v1.PolicyService/Explain")
    assert ("revoked-svid", ADMIN) in refused
