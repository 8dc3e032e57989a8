"""CRLs end to end: ``meshca revoke --serial`` on two replicas, OpenSSL's ``-crl_check``.

Two ``meshca serve`` replicas share one PostgreSQL. A serial revoked with the CLI
appears, within one poll, in the CRL each replica's bundle endpoint serves at
``/crl/<sha256 of the intermediate>.der``; both replicas serve the same CRL number; the
CRL verifies under the intermediate; OpenSSL refuses the revoked leaf and accepts an
unrevoked one. A CRL is re-signed at half its ``--crl-validity``. Hostile paths get 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from tests.integration.replicas import Replica, start_replica, write_kek
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter
from tests.integration.storage_trials import free_port
from tests.integration.test_revoke import WITHIN_ONE_POLL, _meshca, _until

pytestmark = pytest.mark.integration

#: A CRL valid 6 s is re-signed every 3 s.
VALIDITY = 6
SLOW_CA = ["--root-rotation", "1h", "--root-ttl", "4h", "--intermediate-ttl", "1h"]
#: Leaves live long enough to be listed through one re-sign, short enough to see them go.
LEAF_TTL = 15


@pytest.fixture
def replicas() -> Iterator[list[tuple[Replica, int]]]:
    started: list[tuple[Replica, int]] = []
    yield started
    with contextlib.ExitStack() as stack:
        for replica, _ in started:
            stack.callback(replica.kill)


def _issue(target: str, token: str) -> ca_pb2.SignResponse:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    der = csr.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)
    with grpc.insecure_channel(target) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        response: ca_pb2.SignResponse = stub.Sign(
            ca_pb2.SignRequest(csr=der), metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
    return response


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read()
    finally:
        connection.close()


def _crl(port: int, fingerprint: str) -> x509.CertificateRevocationList:
    status, kind, body = _get(port, f"/crl/{fingerprint}.der")
    assert status == 200 and kind == "application/pkix-crl", (status, body[:200])
    return x509.load_der_x509_crl(body)


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _openssl_verify(tmp: Path, leaf_pem: str, chain: list[str], root: str, crl_der: bytes) -> str:
    (tmp / "leaf.pem").write_text(leaf_pem)
    (tmp / "chain.pem").write_text("".join(chain))
    (tmp / "root.pem").write_text(root)
    crl_pem = x509.load_der_x509_crl(crl_der).public_bytes(Encoding.PEM)
    (tmp / "crl.pem").write_bytes(crl_pem)
    result = subprocess.run(
        [
            "openssl", "verify", "-crl_check",
            "-CRLfile", str(tmp / "crl.pem"),
            "-CAfile", str(tmp / "root.pem"),
            "-untrusted", str(tmp / "chain.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return f"{result.returncode} {result.stdout}{result.stderr}"


def test_a_revoked_serial_is_on_every_replicas_crl_and_openssl_refuses_it(
    tmp_path: Path, postgres_database_url: str, replicas: list[tuple[Replica, int]]
) -> None:
    minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    for name in ("a", "b"):
        port = free_port()
        extra = [*SLOW_CA, "--bundle-endpoint", f"127.0.0.1:{port}"]
        extra += ["--crl-validity", f"{VALIDITY}s"]
        extra += ["--svid-ttl", f"{LEAF_TTL}s", "--max-svid-ttl", f"{LEAF_TTL}s"]
        extra += ["--propagation-delay", f"{LEAF_TTL}s"]
        replica = start_replica(name, tmp_path, jwks, postgres_database_url, kek, extra=extra)
        replicas.append((replica, port))
    (a, port_a), (b, port_b) = replicas
    web = minter.mint("shop", "web")
    revoked, kept = _issue(a.target, web), _issue(b.target, web)
    assert revoked.intermediates == kept.intermediates
    issuer = x509.load_pem_x509_certificate(revoked.intermediates[0].encode())
    fingerprint = hashlib.sha256(issuer.public_bytes(Encoding.DER)).hexdigest()

    before = {port: _crl(port, fingerprint) for port in (port_a, port_b)}
    for crl in before.values():
        assert crl.is_signature_valid(issuer.public_key())
        assert len(crl) == 0

    result = _meshca(
        "revoke", "--database-url", postgres_database_url, "--trust-domain", TRUST_DOMAIN,
        "--serial", revoked.serial, "--reason", "key on a lost laptop", "--by", "secteam",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    serial = int(revoked.serial, 16)

    def listed(port: int) -> bool:
        return _crl(port, fingerprint).get_revoked_certificate_by_serial_number(serial) is not None

    # One poll, plus at most one re-sign round.
    for port in (port_a, port_b):
        _until(lambda p=port: listed(p), 2 * WITHIN_ONE_POLL)
    after = {port: _crl(port, fingerprint) for port in (port_a, port_b)}
    for port, crl in after.items():
        assert crl.is_signature_valid(issuer.public_key())
        assert [r.serial_number for r in crl] == [serial]
        assert _number(crl) > _number(before[port])
        assert crl.issuer == issuer.subject
    # The replicas agree on content and number (each signed its own).
    if after[port_a].last_update_utc == after[port_b].last_update_utc:
        assert _number(after[port_a]) == _number(after[port_b])

    root = revoked.bundle[0]
    crl_der = after[port_a].public_bytes(Encoding.DER)
    refused = _openssl_verify(
        tmp_path, revoked.certificate, list(revoked.intermediates), root, crl_der
    )
    assert not refused.startswith("0 ") and "certificate revoked" in refused, refused
    accepted = _openssl_verify(tmp_path, kept.certificate, list(kept.intermediates), root, crl_der)
    assert accepted.startswith("0 ") and ": OK" in accepted, accepted

    # Re-signed at half its validity: a new thisUpdate and a larger number, same entries.
    first = after[port_b]
    _until(lambda: _crl(port_b, fingerprint).last_update_utc > first.last_update_utc, VALIDITY)
    later = _crl(port_b, fingerprint)
    assert later.next_update_utc - later.last_update_utc == timedelta(seconds=VALIDITY)
    assert later.last_update_utc - first.last_update_utc == timedelta(seconds=VALIDITY // 2)
    assert _number(later) > _number(first)
    assert [r.serial_number for r in later] == [serial]

    # Once the leaf has expired, the next CRL no longer lists it.
    expiry = x509.load_pem_x509_certificate(revoked.certificate.encode()).not_valid_after_utc
    _until(lambda: len(_crl(port_b, fingerprint)) == 0, LEAF_TTL + VALIDITY)
    assert _crl(port_b, fingerprint).last_update_utc >= expiry


def test_hostile_crl_paths_and_serials(
    tmp_path: Path, postgres_database_url: str, replicas: list[tuple[Replica, int]]
) -> None:
    minter, jwks = TokenMinter.create(tmp_path)
    port = free_port()
    extra = [*SLOW_CA, "--bundle-endpoint", f"127.0.0.1:{port}"]
    replica = start_replica(
        "a", tmp_path, jwks, postgres_database_url, write_kek(tmp_path / "kek"), extra=extra
    )
    replicas.append((replica, port))
    for path in (
        "/crl/" + "0" * 64 + ".der",  # unknown intermediate
        "/crl/" + "AB" * 32 + ".der",  # not lowercase
        "/crl/" + "zz" * 32 + ".der",  # not hex
        "/crl/../../etc/passwd",
        "/crl/" + "ab" * 32,  # no .der
        "/crl/" + "ab" * 32 + ".der.der",
        "/crl/",
        "/crl/" + "a" * 5000 + ".der",
        "/crl/%00.der",
    ):
        status, kind, body = _get(port, path)
        assert status == 404 and kind == "application/json", (path, status, body[:100])
    # Still serving after all that.
    assert _get(port, "/")[0] == 200
    response = _issue(replica.target, minter.mint("shop", "web"))
    issuer = x509.load_pem_x509_certificate(response.intermediates[0].encode())
    assert _crl(port, hashlib.sha256(issuer.public_bytes(Encoding.DER)).hexdigest()) is not None

    for serial, why in (
        ("xyz", "not hexadecimal"),
        ("0", "not a certificate serial"),
        ("1" * 41, "at most 40"),
        ("", "not hexadecimal"),
    ):
        result = _meshca(
            "revoke", "--database-url", postgres_database_url, "--trust-domain", TRUST_DOMAIN,
            "--serial", serial, "--reason", "test",
        )  # fmt: skip
        assert result.returncode == 2 and why in result.stderr, (serial, result.stderr)
    listed = _meshca("revoke", "list", "--database-url", postgres_database_url)
    assert listed.returncode == 0 and "serial" not in listed.stdout, listed.stdout
