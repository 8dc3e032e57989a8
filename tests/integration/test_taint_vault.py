"""``meshca ca taint`` with keys in Vault's Transit engine and roots in Vault's PKI.

- upstream PKI + Transit: tainting the intermediate gets a successor signed by Vault,
  its key in Transit, used by the server within a poll; tainting Vault's root is refused
  with what to do in Vault, and changes nothing;
- self-managed root with its key in Transit: an emergency root taint makes a new root in
  Transit and the server signs under it within a poll.
"""

from __future__ import annotations

import asyncio
import io
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.cli import main as meshca_main
from meshca.core.rotation import AuthoritySet
from tests.core.builders import csr_pem
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.server_harness import RunningServer, running_server

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {
    "journal_poll": timedelta(seconds=0.2),
    "max_svid_ttl": timedelta(minutes=10),
    "svid_ttl": timedelta(minutes=10),
    "propagation_delay": timedelta(minutes=10),
}


def _cli(server: RunningServer, overrides: dict[str, Any], *args: str) -> tuple[int, str, str]:
    flags = [
        "--data-dir", str(server.settings.data_dir),
        "--trust-domain", server.settings.trust_domain,
        "--vault-addr", overrides["vault_addr"],
        "--vault-pki-mount", overrides["vault_pki_mount"],
        "--vault-transit-mount", overrides["vault_transit_mount"],
        "--vault-token-file", str(overrides["vault_token_file"]),
        "--max-svid-ttl", "10m", "--propagation-delay", "10m",
    ]  # fmt: skip
    if overrides["vault_upstream"]:
        flags.append("--vault-upstream")
    if overrides["vault_transit"]:
        flags.append("--vault-transit")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(["ca", *args, *flags])
    return code, out.getvalue(), err.getvalue()


def _journal(server: RunningServer) -> AuthoritySet:
    engine = make_engine(server.settings.effective_database_url)
    try:
        return SqlAuthorityJournal(engine).load()
    finally:
        engine.dispose()


async def _issue(server: RunningServer) -> list[x509.Certificate]:
    from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
    from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc

    async with server.channel() as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()),
            metadata=[("authorization", f"Bearer {server.minter.mint()}")],
        )
    return [x509.load_pem_x509_certificate(p.encode()) for p in response.cert_chain]


async def _until_issuer(server: RunningServer, issuer: x509.Certificate) -> list[x509.Certificate]:
    for _ in range(50):
        chain = await _issue(server)
        if chain[1] == issuer:
            return chain
        await asyncio.sleep(0.1)
    raise AssertionError("the server never signed with the successor")


async def test_upstream_pki_and_transit_taint_intermediate_refuse_vault_root(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    async for server in running_server(tmp_path, **FAST, **overrides):
        before = _journal(server)
        root, inter = before.active_root, before.active_intermediate
        assert root is not None and inter is not None and inter.key_ref is not None
        assert inter.key_ref.startswith("transit:")
        assert (await _issue(server))[1] == inter.certificate

        code, out, err = await asyncio.to_thread(
            _cli, server, overrides, "taint", root.id, "--reason", "vault root leaked"
        )
        assert code == 2, out
        assert "refused: root" in err and "pki/root/rotate/internal" in err
        assert _journal(server).signature() == before.signature()

        code, out, err = await asyncio.to_thread(
            _cli, server, overrides, "taint", inter.id, "--reason", "transit key exported"
        )
        assert code == 0, err
        after = _journal(server)
        successor = after.active_intermediate
        assert successor is not None and successor.id != inter.id
        assert successor.key_ref is not None and successor.key_ref.startswith("transit:")
        assert successor.parent_id == root.id  # signed by Vault under the same root
        chain = await _until_issuer(server, successor.certificate)
        assert chain[-1] == root.certificate


async def test_transit_self_managed_root_emergency_taint(openbao: OpenBao, tmp_path: Path) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    async for server in running_server(tmp_path, **FAST, **overrides):
        root = _journal(server).active_root
        assert root is not None
        code, out, err = await asyncio.to_thread(
            _cli, server, overrides, "taint", root.id, "--reason", "root key exported",
            "--emergency", "--yes-i-understand-peers-may-fail",
        )  # fmt: skip
        assert code == 0, err
        assert "peers that may fail: 1" in out  # the server's own serving certificate
        after = _journal(server)
        new_root, inter = after.active_root, after.active_intermediate
        assert new_root is not None and new_root.id != root.id
        assert new_root.key_ref is not None and new_root.key_ref.startswith("transit:")
        assert inter is not None and inter.parent_id == new_root.id
        chain = await _until_issuer(server, inter.certificate)
        assert chain[-1] == new_root.certificate
        assert after.get(root.id).state == "retired"  # type: ignore[union-attr]
