"""Rotation through the real server: watchers, the Istio path, the SPIFFE bundle endpoint,
and the ``meshca ca`` commands, with lifetimes of seconds."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import urllib.request
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store

from meshca import app
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.keys.file_store import FileCaStore
from meshca.cli import main as meshca_main
from meshca.cli.ca_cmd import load_bundle
from meshca.core.authority import build_intermediate, build_root
from meshca.core.spiffe import TrustDomain
from tests.core.builders import csr_pem, signer_key
from tests.integration.server_harness import (
    TRUST_DOMAIN,
    RunningServer,
    TokenMinter,
    running_server,
    server_settings,
)

pytestmark = pytest.mark.integration

FAST = {
    "journal_poll": timedelta(seconds=0.1),
    "max_svid_ttl": timedelta(seconds=4),
    "svid_ttl": timedelta(seconds=4),
    "propagation_delay": timedelta(seconds=2),
    "bundle_endpoint": "127.0.0.1:0",
}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, **FAST):
        yield running


def _ca(server: RunningServer, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    settings = server.settings
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(
            [
                "ca",
                *args,
                "--data-dir",
                str(settings.data_dir),
                "--trust-domain",
                settings.trust_domain,
                "--max-svid-ttl",
                "4s",
                "--propagation-delay",
                "2s",
            ]
        )
    return code, out.getvalue(), err.getvalue()


async def _issue(server: RunningServer) -> list[x509.Certificate]:
    async with server.channel() as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()),
            metadata=[("authorization", f"Bearer {server.minter.mint()}")],
        )
    return [x509.load_pem_x509_certificate(p.encode()) for p in response.cert_chain]


def _fetch_spiffe_bundle(port: int, roots: tuple[x509.Certificate, ...]) -> dict[str, object]:
    context = ssl.create_default_context(
        cadata="".join(r.public_bytes(Encoding.PEM).decode() for r in roots)
    )
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(f"https://127.0.0.1:{port}/", timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
        document: dict[str, object] = json.loads(response.read())
    return document


async def test_root_rotation_reaches_watchers_istio_and_the_bundle_endpoint(
    server: RunningServer,
) -> None:
    first_roots = load_bundle(server.settings.data_dir)
    assert len(first_roots) == 1
    chain = await _issue(server)
    assert chain[-1] == first_roots[0]
    assert server.worker.bundle_port is not None
    document = await asyncio.to_thread(_fetch_spiffe_bundle, server.worker.bundle_port, first_roots)
    # Version 1 held the first root; version 2 added the first JWT-SVID key.
    assert document["spiffe_sequence"] == 2
    jwk, jwt_key = document["keys"]  # type: ignore[misc]
    assert jwk["use"] == "x509-svid" and jwk["kty"] == "EC" and len(jwk["x5c"]) == 1
    assert jwt_key["use"] == "jwt-svid" and jwt_key["kid"] and "x5c" not in jwt_key

    async with server.channel() as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        stream = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        first = await stream.read()
        assert first.sequence == 2 and len(first.roots) == 1

        code, out, err = await asyncio.to_thread(_ca, server, "rotate", "--root")
        assert code == 0, err
        assert "prepare-root" in out and "takes over at" in out
        update = await asyncio.wait_for(stream.read(), 5)
        assert len(update.roots) == 2, "the new root is published before use"
        assert update.roots[0] == first.roots[0], "the active root stays first until the switch"

        # Too early to switch: refused, with the reason and the time it will happen.
        code, _out, err = await asyncio.to_thread(_ca, server, "rotate", "--root", "--now")
        assert code == 1 and "propagation delay" in err and "takes over at" in err
        # Until the switch, everything is still signed under the first root.
        assert (await _issue(server))[-1] == first_roots[0]

        switched = await asyncio.wait_for(stream.read(), 5)
        assert switched.roots[1] == first.roots[0], "the old root stays, now second"
        new_root = x509.load_pem_x509_certificate(switched.roots[0].encode())
        stream.cancel()

    chain = await _issue(server)
    assert chain[-1] == new_root
    roots = load_bundle(server.settings.data_dir)
    assert set(roots) == {new_root, first_roots[0]}
    verifier = PolicyBuilder().store(Store(list(roots))).build_client_verifier()
    verifier.verify(chain[0], chain[1:-1])

    document = await asyncio.to_thread(_fetch_spiffe_bundle, server.worker.bundle_port, roots)
    uses = [k["use"] for k in document["keys"]]  # type: ignore[attr-defined]
    assert uses == ["x509-svid", "x509-svid", "jwt-svid"]
    assert int(document["spiffe_sequence"]) >= 4  # type: ignore[call-overload]

    code, out, _err = await asyncio.to_thread(_ca, server, "status")
    assert code == 0
    assert "root" in out and "active" in out and "retired" in out
    assert "next:" in out and "remove" in out

    code, out, _err = await asyncio.to_thread(_ca, server, "rotate", "--intermediate")
    assert code == 0 and "activate-intermediate" in out


async def test_spiffe_format_of_ca_bundle(server: RunningServer) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        code = meshca_main(
            ["ca", "bundle", "--data-dir", str(server.settings.data_dir), "--format", "spiffe"]
        )
    assert code == 0
    document = json.loads(out.getvalue())
    assert document["spiffe_refresh_hint"] == 300 and document["spiffe_sequence"] == 1
    assert [k["use"] for k in document["keys"]] == ["x509-svid", "jwt-svid"]
    assert document["keys"][1]["kid"] == server.worker.authorities.jwt_signer().kid


def _org_root(n: int, ttl: timedelta = timedelta(days=3650)) -> tuple[x509.Certificate, object]:
    key = signer_key("ec-p384", 40 + n)
    from datetime import UTC, datetime

    cert = build_root(key, TrustDomain(TRUST_DOMAIN), datetime.now(UTC), ttl, (1 << 90) + n)
    return cert, key


def _write(path: Path, *items: object) -> Path:
    chunks = []
    for item in items:
        if isinstance(item, x509.Certificate):
            chunks.append(item.public_bytes(Encoding.PEM))
        else:
            chunks.append(
                item.private_bytes(  # type: ignore[attr-defined]
                    Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    path.write_bytes(b"".join(chunks))
    return path


async def test_import_an_organisation_intermediate_and_refuse_unsafe_imports(
    server: RunningServer, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    org_root, org_key = _org_root(1)
    inter_key = signer_key("ec-p256", 51)
    inter = build_intermediate(
        inter_key.public_key(),
        org_root,
        org_key,  # type: ignore[arg-type]
        TrustDomain(TRUST_DOMAIN),
        datetime.now(UTC),
        timedelta(days=30),
        (1 << 91) + 1,
    )
    cert_file = _write(tmp_path / "chain.pem", inter, org_root)
    key_file = _write(tmp_path / "inter.key", inter_key)
    wrong_key = _write(tmp_path / "wrong.key", signer_key("ec-p256", 52))
    code, _out, err = await asyncio.to_thread(
        _ca, server, "import", "--cert", str(cert_file), "--key", str(wrong_key)
    )
    assert code == 1 and "does not belong" in err
    alone = _write(tmp_path / "alone.pem", inter)
    code, _out, err = await asyncio.to_thread(
        _ca, server, "import", "--cert", str(alone), "--key", str(key_file)
    )
    assert code == 1 and "must end in its root" in err

    code, out, err = await asyncio.to_thread(
        _ca, server, "import", "--cert", str(cert_file), "--key", str(key_file)
    )
    assert code == 0, err
    assert "imported root" in out and "imported intermediate" in out
    assert "activate-root" in out
    # The organisation's root is in the bundle at once; it signs nothing before its delay.
    roots = load_bundle(server.settings.data_dir)
    assert org_root in roots
    code, _out, err = await asyncio.to_thread(
        _ca, server, "import", "--cert", str(cert_file), "--key", str(key_file)
    )
    assert code == 1 and "already" in err
    for _ in range(100):
        chain = await _issue(server)
        if chain[-1] == org_root:
            break
        await asyncio.sleep(0.1)
    assert chain[1] == inter and chain[-1] == org_root
    code, out, _err = await asyncio.to_thread(_ca, server, "status")
    assert "imported" in out
    # meshca cannot renew under a root whose key it does not have, and says so.
    assert "import a successor before" in out


async def test_a_pre_journal_data_dir_is_adopted(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    minter, jwks = TokenMinter.create(tmp_path)
    settings = server_settings(tmp_path / "data", jwks, **FAST)
    legacy = FileCaStore(settings.data_dir).load_or_create(
        TrustDomain(TRUST_DOMAIN), datetime.now(UTC), timedelta(days=365), timedelta(days=30)
    )
    app.prepare(settings)
    assert load_bundle(settings.data_dir) == legacy.roots
    worker = await app.start_worker(settings)
    try:
        running = RunningServer(settings, worker, minter)
        chain = await _issue(running)
        assert chain[1] == legacy.certificate and chain[-1] == legacy.roots[0]
        code, out, _err = await asyncio.to_thread(_ca, running, "status")
        assert code == 0 and out.count("adopted") == 2
    finally:
        await worker.stop(grace=1)


def test_every_worker_process_follows_a_rotation(tmp_path: Path) -> None:
    """Two `meshca serve` workers: a rotation made by the CLI reaches watchers on both."""
    import os
    import signal
    import subprocess
    import time

    from meshca.adapters.grpc.client import channel_to
    from tests.integration.server_harness import serve_command

    _minter, jwks = TokenMinter.create(tmp_path)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    process = subprocess.Popen(
        serve_command(
            data_dir,
            jwks,
            workers=2,
            extra=[
                "--journal-poll",
                "0.1s",
                "--max-svid-ttl",
                "4s",
                "--propagation-delay",
                "2s",
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        port, serving, deadline = None, 0, time.monotonic() + 30
        while serving < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if "started 2 workers on" in line:
                port = line.rsplit(":", 1)[-1].strip()
            serving += "serving on" in line
        assert port and serving == 2
        roots_pem = b"".join(r.public_bytes(Encoding.PEM) for r in load_bundle(data_dir))
        streams = []
        channels = [channel_to(f"127.0.0.1:{port}", roots_pem) for _ in range(8)]
        for channel in channels:
            stream = ca_pb2_grpc.CertificateServiceStub(channel).WatchTrustBundle(
                ca_pb2.WatchTrustBundleRequest(), timeout=20
            )
            assert len(next(stream).roots) == 1
            streams.append(stream)
        code = meshca_main(
            [
                "ca",
                "rotate",
                "--root",
                "--data-dir",
                str(data_dir),
                "--trust-domain",
                TRUST_DOMAIN,
                "--max-svid-ttl",
                "4s",
                "--propagation-delay",
                "2s",
            ]
        )
        assert code == 0
        for stream in streams:
            assert len(next(stream).roots) == 2
            stream.cancel()
        for channel in channels:
            channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
            if process.stdout:
                process.stdout.close()
