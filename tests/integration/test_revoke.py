"""``meshca revoke`` against real ``meshca serve`` processes: the deny-list end to end.

A revoke made with the CLI refuses that identity's (or key's) next request on every
worker and every replica within one ``--journal-poll``; other identities are served; the
revoke, the refusal and the lift are records of the verifiable log, which verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from tests.integration.log_checks import audit_verify
from tests.integration.replicas import AUDIT_TOKEN, Replica, start_replica, write_kek
from tests.integration.serve_process import REPO, ServeProcess, launch
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter, serve_command

pytestmark = pytest.mark.integration

POLL = 0.25
#: One poll, plus what a loaded two-core test machine adds to it.
WITHIN_ONE_POLL = POLL + 1.0
WEB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"


def _meshca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshca", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def _sign(target: str, token: str, key: ec.EllipticCurvePrivateKey | None = None) -> str | None:
    """Sign on a fresh connection (so workers take turns); None when issued, else the
    status code and detail."""
    with grpc.insecure_channel(target) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        try:
            stub.Sign(
                ca_pb2.SignRequest(csr=_csr(key or ec.generate_private_key(ec.SECP256R1()))),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return None


def _until(predicate: object, limit: float) -> float:
    """Seconds until ``predicate()`` holds; fails after ``limit``."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit}s")
        time.sleep(0.02)
    return time.monotonic() - started


def _entry_id(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    found = re.match(r"deny-list entry (\d+): ", result.stdout)
    assert found, result.stdout
    return int(found.group(1))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServeProcess, TokenMinter]]:
    minter, jwks = TokenMinter.create(tmp_path)
    data_dir = tmp_path / "data"
    extra = ["--plaintext", "--journal-poll", f"{POLL}s", "--tree-head-interval", "1s"]
    command = serve_command(data_dir, jwks, workers=2, extra=extra)
    process = launch("one", data_dir, command, workers=2)
    try:
        yield process, minter
    finally:
        assert process.stop() == 0, process.log()


def test_revoke_refuses_within_one_poll_is_recorded_verifies_and_lifts(
    server: tuple[ServeProcess, TokenMinter],
) -> None:
    process, minter = server
    target, data = process.target, str(process.data_dir)
    web, api = minter.mint("shop", "web"), minter.mint("shop", "api")
    assert _sign(target, web) is None and _sign(target, api) is None

    revoked = _meshca(
        "revoke", "--data-dir", data, "--trust-domain", TRUST_DOMAIN,
        "--spiffe-id", WEB, "--reason", "token copied to a laptop", "--by", "secteam",
    )  # fmt: skip
    entry = _entry_id(revoked)
    refused = f"PERMISSION_DENIED: issuance refused by deny-list entry {entry}"
    # Within one poll every worker refuses: fresh connections are spread over both.
    _until(lambda: all(_sign(target, web) == refused for _ in range(6)), WITHIN_ONE_POLL)
    assert {_sign(target, web) for _ in range(6)} == {refused}
    assert _sign(target, api) is None

    # A leaked key: refused whoever presents it.
    leaked = ec.generate_private_key(ec.SECP256R1())
    spki = leaked.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    key_entry = _entry_id(
        _meshca(
            "revoke",
            "--data-dir",
            data,
            "--trust-domain",
            TRUST_DOMAIN,
            "--key-sha256",
            hashlib.sha256(spki).hexdigest(),
            "--reason",
            "key in a core dump",
        )
    )
    key_refused = f"PERMISSION_DENIED: issuance refused by deny-list entry {key_entry}"
    _until(
        lambda: all(_sign(target, api, leaked) == key_refused for _ in range(6)), WITHIN_ONE_POLL
    )
    assert {_sign(target, t, leaked) for t in (web, api)} == {refused, key_refused}
    assert _sign(target, api) is None

    listed = _meshca("revoke", "list", "--data-dir", data, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    standing = json.loads(listed.stdout)
    assert [(e["id"], e["kind"], e["state"]) for e in standing] == [
        (entry, "spiffe-id", "active"),
        (key_entry, "key-sha256", "active"),
    ]
    assert standing[0]["by"] == "secteam" and standing[0]["reason"] == "token copied to a laptop"

    lifted = _meshca("revoke", "lift", str(entry), "--data-dir", data, "--reason", "rotated")
    assert lifted.returncode == 0, lifted.stderr
    _until(lambda: all(_sign(target, web) is None for _ in range(6)), WITHIN_ONE_POLL)
    again = _meshca("revoke", "lift", str(entry), "--data-dir", data)
    assert again.returncode == 2 and "already lifted" in again.stderr

    records = json.loads(
        _meshca("audit", "list", "--data-dir", data, "--format", "json", "--limit", "500").stdout
    )
    revokes = [r for r in records if r["outcome"] == "revoked"]
    assert {r["reason"] for r in revokes} == {"spiffe-id", "key-sha256"}
    assert any(f"deny-list entry {entry}: spiffe-id {WEB}" in r["detail"] for r in revokes)
    assert [r["spiffe_id"] for r in records if r["outcome"] == "lifted"] == [WEB]
    denied = [r for r in records if r["outcome"] == "refused" and r["reason"] == "revoked"]
    assert {r["spiffe_id"] for r in denied} >= {WEB, f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/api"}
    assert all(r["detail"].startswith("issuance refused by deny-list entry") for r in denied)
    # The records are in the log the signed heads cover.
    time.sleep(1.5)
    code, output = audit_verify("--data-dir", data)
    assert code == 0, output


# -- replicas ----------------------------------------------------------------------------------


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    with contextlib.ExitStack() as stack:
        for replica in started:
            stack.callback(replica.kill)


def test_two_replicas_on_one_postgres_both_refuse_within_one_poll(
    tmp_path: Path, postgres_database_url: str, replicas: list[Replica]
) -> None:
    minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    slow_ca = ["--root-rotation", "1h", "--root-ttl", "4h", "--intermediate-ttl", "1h"]
    for name in ("a", "b"):
        replicas.append(
            start_replica(name, tmp_path, jwks, postgres_database_url, kek, extra=slow_ca)
        )
    web, api = minter.mint("shop", "web"), minter.mint("shop", "api")
    assert all(_sign(r.target, web) is None for r in replicas)

    entry = _entry_id(
        _meshca(
            "revoke",
            "--database-url",
            postgres_database_url,
            "--trust-domain",
            TRUST_DOMAIN,
            "--spiffe-id-prefix",
            f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web",
            "--reason",
            "leak",
        )
    )
    waits = [
        _until(lambda r=r: _sign(r.target, web) is not None, WITHIN_ONE_POLL) for r in replicas
    ]
    assert max(waits) < WITHIN_ONE_POLL
    for replica in replicas:
        assert _sign(replica.target, web) == (
            f"PERMISSION_DENIED: issuance refused by deny-list entry {entry}"
        )
        assert _sign(replica.target, api) is None

    lifted = _meshca("revoke", "lift", str(entry), "--database-url", postgres_database_url)
    assert lifted.returncode == 0, lifted.stderr
    for replica in replicas:
        _until(lambda r=replica: _sign(r.target, web) is None, WITHIN_ONE_POLL)

    token = tmp_path / "audit-token"
    assert token.read_text().strip() == AUDIT_TOKEN
    time.sleep(1.5)  # a tree head over the revoke, the refusals and the lift
    code, output = audit_verify(
        "--server", replicas[1].target, "--plaintext", "--token-file", str(token)
    )
    assert code == 0, output
