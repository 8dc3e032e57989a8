"""CRLs signed with a Vault Transit key (a real OpenBao): the intermediate's key never
leaves Vault, the CRL verifies under it and OpenSSL refuses the revoked leaf."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import ssl
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.vault.transit_key import TransitSigningKey
from meshca.cli import main as meshca_main
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.server_harness import running_server
from tests.integration.test_crl import _openssl_verify
from tests.integration.test_vault import _issue

pytestmark = pytest.mark.integration

SETTINGS: dict[str, Any] = {
    "journal_poll": timedelta(seconds=0.1),
    "max_svid_ttl": timedelta(seconds=60),
    "svid_ttl": timedelta(seconds=60),
    "propagation_delay": timedelta(seconds=60),
    "bundle_endpoint": "127.0.0.1:0",
}


def _get_tls(port: int, path: str, roots_pem: bytes) -> tuple[int, bytes]:
    """GET over HTTPS: the bundle endpoint speaks TLS with meshca's own SVID."""
    context = ssl.create_default_context(cadata=roots_pem.decode())
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


async def test_transit_signed_crl_lists_the_revoked_serial(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    async for server in running_server(tmp_path, **SETTINGS, **overrides):
        assert isinstance(server.worker.authorities.current().signer, TransitSigningKey)
        revoked, kept = await _issue(server), await _issue(server)
        issuer = revoked[1]
        fingerprint = hashlib.sha256(issuer.public_bytes(Encoding.DER)).hexdigest()
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = await asyncio.to_thread(
                meshca_main,
                [
                    "revoke", "--data-dir", str(server.settings.data_dir),
                    "--trust-domain", server.settings.trust_domain,
                    "--serial", f"{revoked[0].serial_number:x}", "--reason", "leak",
                ],
            )  # fmt: skip
        assert code == 0, err.getvalue()
        port = server.worker.bundle_port
        assert port is not None
        crl = None
        for _ in range(100):
            status, body = await asyncio.to_thread(
                _get_tls, port, f"/crl/{fingerprint}.der", server.roots_pem
            )
            assert status == 200
            crl = x509.load_der_x509_crl(body)
            if len(crl) == 1:
                break
            await asyncio.sleep(0.1)
        assert crl is not None and [r.serial_number for r in crl] == [revoked[0].serial_number]
        assert crl.is_signature_valid(issuer.public_key())

        def pem(certs: list[x509.Certificate]) -> list[str]:
            return [c.public_bytes(Encoding.PEM).decode() for c in certs]

        root = pem(revoked[-1:])[0]
        crl_der = crl.public_bytes(Encoding.DER)
        refused = await asyncio.to_thread(
            _openssl_verify, tmp_path, pem(revoked[:1])[0], pem(revoked[1:-1]), root, crl_der
        )
        assert "certificate revoked" in refused, refused
        accepted = await asyncio.to_thread(
            _openssl_verify, tmp_path, pem(kept[:1])[0], pem(kept[1:-1]), root, crl_der
        )
        assert accepted.startswith("0 "), accepted
