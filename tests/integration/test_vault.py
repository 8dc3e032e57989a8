"""meshca with Vault (a real OpenBao): PKI upstream, Transit-held keys, root rotation in
Vault, logins, token renewal, and Vault going away and coming back."""

from __future__ import annotations

import asyncio
import io
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.vault.client import VaultAuth, VaultClient
from meshca.adapters.vault.transit_key import TransitKeyManager, TransitSigningKey
from meshca.app import AUTHORITY_HEALTH
from meshca.cli import main as meshca_main
from meshca.cli.ca_cmd import load_bundle
from meshca.core.authority import build_root
from meshca.core.errors import BackendUnavailable
from tests.core.builders import NOW, TRUST_DOMAIN, csr_pem
from tests.fixtures_k8s import K8sApiStandIn
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.server_harness import RunningServer, running_server

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {
    "journal_poll": timedelta(seconds=0.1),
    "max_svid_ttl": timedelta(seconds=4),
    "svid_ttl": timedelta(seconds=4),
    "propagation_delay": timedelta(seconds=2),
}


async def _issue(server: RunningServer) -> list[x509.Certificate]:
    async with server.channel() as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()),
            metadata=[("authorization", f"Bearer {server.minter.mint()}")],
        )
    return [x509.load_pem_x509_certificate(p.encode()) for p in response.cert_chain]


def _verify(chain: list[x509.Certificate], roots: tuple[x509.Certificate, ...]) -> None:
    verifier = PolicyBuilder().store(Store(list(roots))).build_client_verifier()
    verifier.verify(chain[0], chain[1:-1])


def _private_keys_on_disk(directory: Path) -> list[Path]:
    return [
        p
        for p in directory.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()[:1_000_000]
    ]


def _vault_root(server: OpenBao, mount: str) -> x509.Certificate:
    pem = server.call("GET", f"{mount}/cert/ca")["data"]["certificate"]
    return x509.load_pem_x509_certificate(pem.encode())


async def test_upstream_intermediate_is_signed_by_vault_and_chains_to_its_root(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=False)
    async for server in running_server(tmp_path, **FAST, **overrides):
        vault_root = _vault_root(openbao, overrides["vault_pki_mount"])
        chain = await _issue(server)
        assert chain[-1] == vault_root
        assert load_bundle(server.settings.data_dir) == (vault_root,)
        _verify(chain, (vault_root,))
        # The intermediate's key is meshca's (a file); the root's never was. (The other
        # file is the JWT-SVID signing key's.)
        assert len(list((server.settings.data_dir / "ca" / "keys").glob("intermediate-*.key"))) == 1
        assert len(list((server.settings.data_dir / "ca" / "keys").glob("*.key"))) == 2
        code = meshca_main(
            [
                "ca",
                "rotate",
                "--root",
                "--data-dir",
                str(server.settings.data_dir),
                "--vault-upstream",
                "--vault-addr",
                openbao.addr,
                "--trust-domain",
                server.settings.trust_domain,
            ]
        )
        assert code == 1, "roots come from Vault"


async def test_transit_mode_keeps_no_ca_key_on_disk(openbao: OpenBao, tmp_path: Path) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    async for server in running_server(tmp_path, **FAST, **overrides):
        vault_root = _vault_root(openbao, overrides["vault_pki_mount"])
        chain = await _issue(server)
        assert chain[-1] == vault_root
        _verify(chain, (vault_root,))
        signer = server.worker.authorities.current().signer
        assert isinstance(signer, TransitSigningKey)
        code = await asyncio.to_thread(
            meshca_main,
            [
                "ca",
                "rotate",
                "--intermediate",
                "--data-dir",
                str(server.settings.data_dir),
                "--trust-domain",
                server.settings.trust_domain,
                "--max-svid-ttl",
                "4s",
                "--propagation-delay",
                "2s",
                "--vault-addr",
                openbao.addr,
                "--vault-upstream",
                "--vault-transit",
                "--vault-pki-mount",
                overrides["vault_pki_mount"],
                "--vault-transit-mount",
                overrides["vault_transit_mount"],
                "--vault-token-file",
                str(overrides["vault_token_file"]),
            ],
        )
        assert code == 0
        for _ in range(50):
            if server.worker.authorities.current().certificate != chain[1]:
                break
            await asyncio.sleep(0.1)
        renewed = await _issue(server)
        assert renewed[1] != chain[1] and renewed[-1] == vault_root
    # No CA key anywhere: not in the CA directory, not in the database.
    assert _private_keys_on_disk(tmp_path / "data" / "ca") == []
    assert b"PRIVATE KEY" not in (tmp_path / "data" / "meshca.db").read_bytes()
    assert not list((tmp_path / "data" / "ca").glob("keys/*"))


async def test_self_managed_root_with_its_key_in_transit(openbao: OpenBao, tmp_path: Path) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    async for server in running_server(tmp_path, **FAST, **overrides):
        roots = load_bundle(server.settings.data_dir)
        chain = await _issue(server)
        _verify(chain, roots)
        assert "meshca root" in roots[0].subject.rfc4514_string()
    assert _private_keys_on_disk(tmp_path / "data" / "ca") == []


async def test_a_root_rotated_in_vault_is_published_first_and_used_after_the_delay(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=False)
    mount = overrides["vault_pki_mount"]
    async for server in running_server(tmp_path, **FAST, **overrides):
        old_root = _vault_root(openbao, mount)
        assert (await _issue(server))[-1] == old_root
        # Vault's operator rotates the root and makes the new one the default at once.
        new_root = x509.load_pem_x509_certificate(
            openbao.rotate_root(mount, "vault root 2", make_default=True).encode()
        )
        for _ in range(50):
            if len(server.worker.bundle.current().roots) == 2:
                break
            await asyncio.sleep(0.1)
        assert server.worker.bundle.current().roots == (old_root, new_root)
        # Published, not yet used: every proxy must have it before it meets it.
        assert (await _issue(server))[-1] == old_root
        for _ in range(60):
            chain = await _issue(server)
            if chain[-1] == new_root:
                break
            await asyncio.sleep(0.1)
        assert chain[-1] == new_root
        assert server.worker.bundle.current().roots == (new_root, old_root)
        _verify(chain, (new_root, old_root))


@pytest.mark.parametrize("dedicated_openbao", [True], ids=["raft"], indirect=True)
async def test_vault_outage_and_restart(dedicated_openbao: OpenBao, tmp_path: Path) -> None:
    overrides = vault_overrides(dedicated_openbao, tmp_path, transit=False)
    async for server in running_server(tmp_path, **FAST, **overrides):
        first = await _issue(server)
        dedicated_openbao.kill()
        # Vault is gone: the intermediate's key is ours, so issuance goes on...
        for _ in range(3):
            chain = await _issue(server)
            assert chain[1] == first[1]
        # ...while meshca says it is degraded, in health, and retries with backoff.
        for _ in range(50):
            if server.worker.rotator.degraded:
                break
            await asyncio.sleep(0.1)
        assert server.worker.rotator.degraded and "unreachable" in server.worker.rotator.degraded
        async with server.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=AUTHORITY_HEALTH))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
        out = io.StringIO()
        with redirect_stdout(out):
            await asyncio.to_thread(
                meshca_main,
                [
                    "ca",
                    "status",
                    "--data-dir",
                    str(server.settings.data_dir),
                    "--trust-domain",
                    server.settings.trust_domain,
                    "--max-svid-ttl",
                    "4s",
                    "--propagation-delay",
                    "2s",
                    "--vault-addr",
                    dedicated_openbao.addr,
                    "--vault-upstream",
                    "--vault-token-file",
                    str(overrides["vault_token_file"]),
                ],
            )
        assert "vault: DEGRADED" in out.getvalue()
        # Vault comes back (same storage, unsealed again): meshca recovers by itself.
        dedicated_openbao.start()
        for _ in range(100):
            if server.worker.rotator.degraded is None:
                break
            await asyncio.sleep(0.1)
        assert server.worker.rotator.degraded is None
        reports = await asyncio.to_thread(server.worker.authorities.rotate_intermediate)
        assert reports
        chain = await _issue(server)
        assert chain[1] != first[1] and chain[-1] == first[-1]


async def test_transit_outage_refuses_with_unavailable(
    dedicated_openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(dedicated_openbao, tmp_path, transit=True)
    async for server in running_server(tmp_path, **FAST, **overrides):
        await _issue(server)
        dedicated_openbao.kill()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _issue(server)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_approle_login_and_token_renewal(openbao: OpenBao, tmp_path: Path) -> None:
    mount = "approle"
    try:
        openbao.call("POST", f"sys/auth/{mount}", {"type": "approle"})
    except Exception:
        pass  # enabled by an earlier run on this server
    openbao.call(
        "POST",
        "sys/policies/acl/meshca-transit",
        {"policy": 'path "transit-*" { capabilities = ["create", "read", "update", "list"] }'},
    )
    openbao.call(
        "POST",
        f"auth/{mount}/role/meshca",
        {"token_policies": ["meshca-transit"], "token_ttl": "60s", "token_max_ttl": "90s"},
    )
    role_id = openbao.call("GET", f"auth/{mount}/role/meshca/role-id")["data"]["role_id"]
    secret_id = openbao.call("POST", f"auth/{mount}/role/meshca/secret-id", {})["data"]["secret_id"]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    clock = [0.0]
    client = VaultClient(
        openbao.addr,
        VaultAuth(method="approle", role_id=role_id, secret_id_file=secret_file),
        monotonic=lambda: clock[0],
    )
    transit = "transit-approle"
    try:
        openbao.new_transit(transit)
    except Exception:
        pass
    keys = TransitKeyManager(client, transit, prefix="meshca-approle")
    _ref, key = keys.create("root")
    root = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=1), 1 << 100)
    root.verify_directly_issued_by(root)
    first_token = client.raw.token
    clock[0] += 31  # past half the 60 s TTL: renewed, same token
    keys.load(_ref)
    assert client.raw.token == first_token
    clock[0] += 1000  # the renewal fails past the max TTL: logs in again
    with pytest.raises(BackendUnavailable):
        TransitKeyManager(client, "no-such-mount", "x").load("transit:nothing")
    keys.load(_ref)


def test_transit_key_refuses_to_reveal_itself(openbao: OpenBao, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(openbao.root_token)
    client = VaultClient(openbao.addr, VaultAuth(token_file=token))
    openbao.new_transit("transit-reveal")
    key_ref, key = TransitKeyManager(client, "transit-reveal", "meshca-t").create("root")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(UnsupportedAlgorithm):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    assert key_ref in TransitKeyManager(client, "transit-reveal", "meshca-t").listed()
    TransitKeyManager(client, "transit-reveal", "meshca-t").delete(key_ref)
    assert key_ref not in TransitKeyManager(client, "transit-reveal", "meshca-t").listed()


def test_kubernetes_login_through_the_api_servers_token_review(
    openbao: OpenBao, k8s_api_tls: K8sApiStandIn, tmp_path: Path
) -> None:
    """meshca logs in with its service-account token; Vault asks the API server about it."""
    api = k8s_api_tls
    api.clock._now = datetime.now(UTC).replace(microsecond=0)  # Vault checks with its own clock
    mount = "kubernetes-meshca"
    openbao.call("POST", f"sys/auth/{mount}", {"type": "kubernetes"})
    openbao.call(
        "POST",
        f"auth/{mount}/config",
        {
            "kubernetes_host": api.url,
            "kubernetes_ca_cert": Path(api.ca_file or "").read_text(),
            "token_reviewer_jwt": api.caller_token,
            "disable_local_ca_jwt": True,
        },
    )
    openbao.call(
        "POST",
        f"auth/{mount}/role/meshca",
        {
            "bound_service_account_names": ["meshca"],
            "bound_service_account_namespaces": ["meshca"],
            "audience": "vault",
            "token_policies": ["meshca-transit-k8s"],
            "token_ttl": "60s",
        },
    )
    openbao.call(
        "POST",
        "sys/policies/acl/meshca-transit-k8s",
        {"policy": 'path "transit-k8s/*" { capabilities = ["create", "read", "update"] }'},
    )
    openbao.new_transit("transit-k8s")
    jwt_file = tmp_path / "token"
    jwt_file.write_text(
        api.minter.token(namespace="meshca", service_account="meshca", aud=["vault"])
    )
    client = VaultClient(
        openbao.addr, VaultAuth(method="kubernetes", role="meshca", jwt_file=jwt_file, mount=mount)
    )
    keys = TransitKeyManager(client, "transit-k8s", prefix="meshca-k8s")
    _ref, key = keys.create("root")
    root = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=1), 1 << 100)
    root.verify_directly_issued_by(root)  # signed through transit with the Kubernetes login
    [review] = api.review_requests
    assert review["spec"]["audiences"] == ["vault"]

    # A token for another service account is refused by Vault: meshca reports it.
    jwt_file.write_text(api.minter.token(namespace="shop", service_account="cart", aud=["vault"]))
    stranger = VaultClient(
        openbao.addr, VaultAuth(method="kubernetes", role="meshca", jwt_file=jwt_file, mount=mount)
    )
    with pytest.raises(BackendUnavailable) as refused:
        TransitKeyManager(stranger, "transit-k8s", prefix="meshca-k8s").load(_ref)
    assert "denied" in str(refused.value) or "not authorized" in str(refused.value), refused.value
