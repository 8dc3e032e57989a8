"""The audit API through the real server: who may call it, queries, proofs and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc
from meshca.adapters.grpc.audit_convert import entry_from_proto, head_from_proto
from meshca.adapters.keys.log_key import load_log_key
from meshca.cli import main as meshca_main
from meshca.core.audit import entry_leaf_data
from meshca.core.log import verify_tree_head
from meshca.core.merkle import leaf_hash, verify_inclusion
from tests.core.builders import build_pki, custom_leaf, leaf_extensions, signer_key
from tests.integration.server_harness import RunningServer, running_server
from tests.integration.test_rotation_server import FAST, _ca

pytestmark = pytest.mark.integration

TOKEN = "audit-token-7f3c9e"
AUDITOR = "spiffe://example.org/ns/audit/sa/auditor"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    token_file = tmp_path / "audit-token"
    token_file.write_text(TOKEN + "\n")
    async for running in running_server(
        tmp_path,
        auditor=(AUDITOR,),
        audit_token_file=token_file,
        audit_listen="127.0.0.1:0",
    ):
        yield running


def _csr() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def _issue(server: RunningServer, namespace: str, sa: str) -> tuple[bytes, bytes]:
    """A certificate for ns/sa, as a proxy gets one: (key PEM, chain PEM)."""
    key, csr = _csr()
    async with server.channel() as channel:
        response = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr),
            metadata=[("authorization", f"Bearer {server.minter.mint(namespace, sa)}")],
            timeout=10,
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, "".join(response.cert_chain).encode()


def _audit_channel(
    server: RunningServer, *, client: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    port = server.worker.audit_port if client is not None else server.worker.port
    credentials = grpc.ssl_channel_credentials(
        server.roots_pem, *(client if client is not None else (None, None))
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


async def _list(
    channel: grpc.aio.Channel, token: str | None = None
) -> audit_pb2.ListRecordsResponse:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    return await stub.ListIssuances(audit_pb2.ListRecordsRequest(), metadata=metadata, timeout=10)


async def test_only_auditors_may_read(server: RunningServer) -> None:
    auditor = await _issue(server, "audit", "auditor")
    stranger = await _issue(server, "shop", "cart")

    async with _audit_channel(server) as channel:
        for token, code in [
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", grpc.StatusCode.UNAUTHENTICATED),
            (server.minter.mint("audit", "auditor"), grpc.StatusCode.UNAUTHENTICATED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _list(channel, token)
            assert caught.value.code() == code
        assert len((await _list(channel, TOKEN)).entries) >= 2

    async with _audit_channel(server, client=auditor) as channel:
        listed = await _list(channel)
        assert {e.record.spiffe_id for e in listed.entries} >= {AUDITOR}
    async with _audit_channel(server, client=stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list(channel)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The audit port insists on a client certificate; the main port never asks proxies.
    async with _audit_channel(server) as channel:
        assert (await _issue(server, "shop", "web"))[1]
    bare = grpc.aio.secure_channel(
        f"127.0.0.1:{server.worker.audit_port}",
        grpc.ssl_channel_credentials(server.roots_pem),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    async with bare:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list(bare, TOKEN)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def rotating_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(
        tmp_path, auditor=(AUDITOR,), audit_listen="127.0.0.1:0", **FAST
    ):
        yield running


def _foreign_auditor() -> tuple[bytes, bytes]:
    """The auditor's SPIFFE ID, signed by a CA meshca has never trusted: (key, chain) PEM."""
    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_pki(now=now - timedelta(minutes=1))
    leaf = custom_leaf(
        pki.authority,
        extensions=leaf_extensions(AUDITOR),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    )
    key_pem = signer_key("ec-p256", 0).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = (leaf, pki.intermediate, pki.root)
    return key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


async def test_audit_port_follows_root_rotation_and_renewal(
    rotating_server: RunningServer,
) -> None:
    server = rotating_server
    serving = server.worker.serving
    assert serving is not None
    (first_root,) = x509.load_pem_x509_certificates(server.roots_pem)
    before = await _issue(server, "audit", "auditor")
    async with _audit_channel(server, client=before) as channel:
        assert (await _list(channel)).entries

    code, _out, err = await asyncio.to_thread(_ca, server, "rotate", "--root")
    assert code == 0, err
    # The new root signs once its propagation delay (2s) is over.
    for _ in range(100):
        auditor = await _issue(server, "audit", "auditor")
        new_root = x509.load_pem_x509_certificates(auditor[1])[-1]
        if new_root != first_root:
            break
        await asyncio.sleep(0.1)
    assert new_root != first_root, "the new root never took over"
    # meshca's serving certificate renews, now under the new root.
    renewed = x509.load_pem_x509_certificates((await serving.issue()).chain_pem)
    renewed[-1].verify_directly_issued_by(new_root)  # its intermediate

    # No restart: the port's client roots followed the bundle to the new root...
    async with _audit_channel(server, client=auditor) as channel:
        listed = await _list(channel)
    assert AUDITOR in {e.record.spiffe_id for e in listed.entries}
    # ...and it serves the renewed certificate: an auditor trusting only the new root gets in.
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{server.worker.audit_port}",
        grpc.ssl_channel_credentials(new_root.public_bytes(serialization.Encoding.PEM), *auditor),
        options=[("grpc.ssl_target_name_override", "localhost")],
    ) as channel:
        assert (await _list(channel)).entries

    # The auditor's own SPIFFE ID under an unrelated CA is refused at the handshake
    # (UNAVAILABLE), before the audit API could judge the caller.
    async with _audit_channel(server, client=_foreign_auditor()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_inclusion_proof_of_an_issued_certificate(server: RunningServer) -> None:
    _, chain = await _issue(server, "shop", "cart")
    serial = f"{x509.load_pem_x509_certificates(chain)[0].serial_number:x}"
    metadata = [("authorization", f"Bearer {TOKEN}")]
    async with _audit_channel(server) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        response = await stub.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(serial=serial), metadata=metadata, timeout=10
        )
        refusals = await stub.ListRefusals(
            audit_pb2.ListRecordsRequest(), metadata=metadata, timeout=10
        )
    entry = entry_from_proto(response.entry)
    head = head_from_proto(response.head)
    assert entry.record.serial == serial
    assert verify_tree_head(load_log_key(server.settings.data_dir).public_key(), head)
    assert verify_inclusion(
        leaf_hash(entry_leaf_data(entry)),
        entry.leaf_index,
        head.head.size,
        [bytes(p) for p in response.path],
        head.head.root_hash,
    )
    assert all(e.record.outcome == audit_pb2.OUTCOME_REFUSED for e in refusals.entries)


def _run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(list(args))
    return code, out.getvalue(), err.getvalue()


async def _cli(*args: str) -> tuple[int, str, str]:
    # In a thread: the server under test runs on this event loop.
    return await asyncio.to_thread(_run_cli, *args)


async def test_cli_queries_and_verifies_locally_and_over_the_api(
    server: RunningServer, tmp_path: Path
) -> None:
    serials = []
    for sa in ("cart", "web", "db"):
        _, chain = await _issue(server, "shop", sa)
        serials.append(f"{x509.load_pem_x509_certificates(chain)[0].serial_number:x}")
    data_dir = str(server.settings.data_dir)
    (tmp_path / "bundle.pem").write_bytes(server.roots_pem)
    (tmp_path / "token").write_text(TOKEN)
    remote = [
        "--server",
        server.target,
        "--token-file",
        str(tmp_path / "token"),
        "--ca-file",
        str(tmp_path / "bundle.pem"),
    ]
    local = ["--data-dir", data_dir]

    for source in (local, remote):
        code, out, err = await _cli(
            "audit", "query", *source, "--namespace", "shop", "--format", "csv", "--limit", "0"
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("leaf_index,time,outcome")
        assert {s for s in serials if any(s in line for line in lines)} == set(serials)
        code, out, err = await _cli("audit", "show", *source, serials[1], "--format", "json")
        assert code == 0, err
        assert json.loads(out)["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web"
        code, out, err = await _cli("audit", "verify", *source, "--serial", serials[0])
        assert code == 0, out + err
        assert "is in the tree head" in out
        code, out, err = await _cli("audit", "verify", *source)
        assert code == 0, out + err

    # Keep two heads; the second must extend the first.
    head1, head2 = str(tmp_path / "h1.json"), str(tmp_path / "h2.json")
    assert (await _cli("audit", "head", *remote, "--fresh", "--out", head1))[0] == 0
    await _issue(server, "ops", "x")
    assert (await _cli("audit", "head", *local, "--fresh", "--out", head2))[0] == 0
    code, out, err = await _cli(
        "audit", "verify", *remote, "--consistency", "--head", head1, "--head", head2
    )
    assert code == 0, out + err

    # Someone edits the record behind meshca's back: verify names the row.
    db = sqlite3.connect(server.settings.data_dir / "meshca.db")
    with db:
        db.execute(
            "UPDATE issuance_record SET spiffe_id = 'spiffe://example.org/ns/x/sa/y' "
            "WHERE serial = ?",
            (serials[1],),
        )
        (index,) = db.execute(
            "SELECT leaf_index FROM issuance_record WHERE serial = ?", (serials[1],)
        ).fetchone()
    db.close()
    code, out, _ = await _cli("audit", "verify", *local)
    assert code == 1
    assert f"FAIL  leaf {index} (serial {serials[1]}" in out
    code, out, _ = await _cli("audit", "verify", *remote, "--head", head2)
    assert code == 1
    assert "do not hash to the root" in out
