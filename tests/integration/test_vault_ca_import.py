"""``meshca ca import`` and ``meshca ca prune-keys`` with Vault (a real OpenBao): a CA key
imported into Transit, an intermediate under Vault's PKI root, orphaned Transit keys."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from base64 import b64encode
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshca import app
from meshca.adapters.clock import SystemClock
from meshca.adapters.grpc.client import channel_to, create_certificate
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.vault.client import VaultAuth, VaultClient
from meshca.adapters.vault.transit_key import TransitKeyManager, TransitSigningKey
from meshca.cli import main as meshca_main
from meshca.cli.ca_cmd import load_bundle
from meshca.core.authority import build_intermediate, build_root
from meshca.core.spiffe import TrustDomain
from tests.core.builders import csr_pem, signer_key
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.serve_process import launch
from tests.integration.server_harness import (
    TRUST_DOMAIN,
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)
from tests.integration.test_vault import FAST, _issue, _private_keys_on_disk, _verify

pytestmark = pytest.mark.integration

#: Transit key names are made of [a-z0-9-]: example.org becomes example-org.
PREFIX = f"meshca-{TRUST_DOMAIN.replace('.', '-')}-"


def _ca(
    server: RunningServer | Path, overrides: dict[str, Any], *args: str
) -> tuple[int, str, str]:
    """``meshca ca ...`` against a server's journal (or a data dir's) and its Vault mounts."""
    data_dir = server.settings.data_dir if isinstance(server, RunningServer) else server
    vault = [
        "--vault-addr",
        overrides["vault_addr"],
        "--vault-pki-mount",
        overrides["vault_pki_mount"],
        "--vault-transit-mount",
        overrides["vault_transit_mount"],
        "--vault-token-file",
        str(overrides["vault_token_file"]),
    ]
    if overrides["vault_transit"]:
        vault.append("--vault-transit")
    if overrides["vault_upstream"]:
        vault.append("--vault-upstream")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(
            [
                "ca",
                *args,
                "--data-dir",
                str(data_dir),
                "--trust-domain",
                TRUST_DOMAIN,
                "--max-svid-ttl",
                "4s",
                "--propagation-delay",
                "2s",
                *vault,
            ]
        )
    return code, out.getvalue(), err.getvalue()


def _transit_keys(server: OpenBao, mount: str) -> list[str]:
    try:
        listed = server.call("LIST", f"{mount}/keys")
    except RuntimeError as error:
        assert "404" in str(error)
        return []
    # OpenBao also lists "import/" once a key was imported: not a key.
    return sorted(n for n in listed["data"]["keys"] if not n.endswith("/"))


def _pem(path: Path, *items: object, password: bytes | None = None) -> Path:
    chunks = []
    for item in items:
        if isinstance(item, x509.Certificate):
            chunks.append(item.public_bytes(Encoding.PEM))
        else:
            encryption: serialization.KeySerializationEncryption = (
                serialization.BestAvailableEncryption(password)
                if password
                else serialization.NoEncryption()
            )
            chunks.append(
                item.private_bytes(  # type: ignore[attr-defined]
                    Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
                )
            )
    path.write_bytes(b"".join(chunks))
    return path


def _holds_secret(directory: Path, key: ec.EllipticCurvePrivateKey) -> list[Path]:
    """Files under ``directory`` with ``key``'s private scalar, its DER, or its PEM's second line
    (the first is the same for every key of the curve)."""
    scalar = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    der = key.private_bytes(
        Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if scalar in data or der in data or b64encode(der)[64:128] in data:
                found.append(path)
    return found


def _org_ca(key_kind: str = "ec-p256") -> tuple[x509.Certificate, x509.Certificate, Any]:
    """An organisation's root and an intermediate under it, with the intermediate's key."""
    now = datetime.now(UTC)
    root_key = signer_key("ec-p384", 71)
    root = build_root(root_key, TrustDomain(TRUST_DOMAIN), now, timedelta(days=3650), 1 << 95)
    inter_key = signer_key(key_kind, 72)
    inter = build_intermediate(
        inter_key.public_key(),  # type: ignore[arg-type]
        root,
        root_key,
        TrustDomain(TRUST_DOMAIN),
        now,
        timedelta(days=30),
        (1 << 95) + 1,
    )
    return root, inter, inter_key


def _journal_ids(server: RunningServer, overrides: dict[str, Any]) -> list[str]:
    code, out, err = _ca(server, overrides, "status", "--format", "json", "--all")
    assert code == 0, err
    return sorted(a["id"] for a in json.loads(out)["authorities"])


async def test_import_into_transit_then_issue_under_it(openbao: OpenBao, tmp_path: Path) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False  # meshca's own roots, keys in Transit
    mount = overrides["vault_transit_mount"]
    org_root, inter, inter_key = _org_ca()
    cert_file = _pem(tmp_path / "chain.pem", inter, org_root)
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(b"correct horse\n")
    key_file = _pem(tmp_path / "inter.key", inter_key, password=b"correct horse")
    async for server in running_server(tmp_path, **FAST, **overrides):
        before = _transit_keys(openbao, mount)
        code, out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(cert_file),
            "--key",
            str(key_file),
            "--key-passphrase-file",
            str(passphrase),
        )
        assert code == 0, err
        assert "imported intermediate" in out and "key transit:" + PREFIX in out
        new = sorted(set(_transit_keys(openbao, mount)) - set(before))
        assert len(new) == 1, (before, new)
        [added] = new
        assert added.startswith(PREFIX + "imported-intermediate-")
        # Transit holds it non-exportable: it cannot be read back out of Vault.
        config = openbao.call("GET", f"{mount}/keys/{added}")["data"]
        assert config["exportable"] is False and config["imported_key"] is True
        # The org root waits out the propagation delay, then the imported key signs leaves.
        for _ in range(100):
            chain = await _issue(server)
            if chain[-1] == org_root:
                break
            await asyncio.sleep(0.1)
        assert chain[1] == inter and chain[-1] == org_root
        _verify(chain, (org_root,))
        signer = server.worker.authorities.current().signer
        assert isinstance(signer, TransitSigningKey) and signer.name == added
        code, out, err = await asyncio.to_thread(_ca, server, overrides, "status")
        assert code == 0, err
        assert "orphaned keys" not in out  # the imported key is named by a live entry
    # meshca wrote no CA key anywhere: not in the CA directory, not in the database,
    # and the imported key's secret appears in no file meshca keeps.
    assert _private_keys_on_disk(tmp_path / "data" / "ca") == []
    assert b"PRIVATE KEY" not in (tmp_path / "data" / "meshca.db").read_bytes()
    assert not _holds_secret(tmp_path / "data", inter_key)


async def test_refused_imports_leave_no_key_in_transit_and_nothing_in_the_journal(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    mount = overrides["vault_transit_mount"]
    org_root, inter, inter_key = _org_ca()
    chain_file = _pem(tmp_path / "chain.pem", inter, org_root)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    binary = tmp_path / "binary.key"
    binary.write_bytes(bytes(range(256)) * 4)
    encrypted = _pem(tmp_path / "encrypted.key", inter_key, password=b"sesame")
    wrong_pass = tmp_path / "wrong-pass"
    wrong_pass.write_text("not sesame")
    # A leaf (cA=false) with the key that matches it.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")]))
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(leaf_key, hashes.SHA256())
    )
    rsa_root, rsa_inter, rsa_key = _org_ca("rsa-2048")
    cases: list[tuple[list[str], int, str]] = [
        (
            [
                "--cert",
                str(chain_file),
                "--key",
                str(_pem(tmp_path / "w.key", signer_key("ec-p256", 99))),
            ],
            1,
            "does not belong",
        ),
        (["--cert", str(chain_file), "--key", str(garbage)], 2, "cannot read the key"),
        (["--cert", str(chain_file), "--key", str(binary)], 2, "cannot read the key"),
        (["--cert", str(chain_file), "--key", str(encrypted)], 2, "is encrypted"),
        (
            [
                "--cert",
                str(chain_file),
                "--key",
                str(encrypted),
                "--key-passphrase-file",
                str(wrong_pass),
            ],
            2,
            "wrong passphrase",
        ),
        (
            [
                "--cert",
                str(_pem(tmp_path / "leaf.pem", leaf)),
                "--key",
                str(_pem(tmp_path / "leaf.key", leaf_key)),
            ],
            1,
            "not a CA",
        ),
        (["--cert", str(garbage), "--key", str(encrypted)], 2, "cannot read the certificate"),
        (["--cert", str(tmp_path / "missing.pem"), "--key", str(encrypted)], 2, "cannot read"),
        (
            [
                "--cert",
                str(_pem(tmp_path / "rsa.pem", rsa_inter, rsa_root)),
                "--key",
                str(_pem(tmp_path / "rsa.key", rsa_key)),
            ],
            1,
            "--key-encryption-key-file",
        ),
    ]
    async for server in running_server(tmp_path, **FAST, **overrides):
        keys_before = _transit_keys(openbao, mount)
        journal_before = await asyncio.to_thread(_journal_ids, server, overrides)
        for argv, want_code, want_message in cases:
            code, out, err = await asyncio.to_thread(_ca, server, overrides, "import", *argv)
            assert (code, want_message in err) == (want_code, True), (argv, code, out, err)
            assert "Traceback" not in err and "PRIVATE KEY" not in err
            assert _transit_keys(openbao, mount) == keys_before, argv
            assert await asyncio.to_thread(_journal_ids, server, overrides) == journal_before
        code, _out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(chain_file),
            "--key",
            str(encrypted),
            "--key-passphrase-file",
            str(tmp_path / "no-such-file"),
        )
        assert code == 2 and "cannot read" in err
        plain = _pem(tmp_path / "plain.key", inter_key)
        code, _out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(chain_file),
            "--key",
            str(plain),
            "--key-passphrase-file",
            str(wrong_pass),
        )
        assert code == 2 and "is not encrypted" in err
        assert _transit_keys(openbao, mount) == keys_before


async def test_orphaned_transit_keys_are_listed_and_pruned_but_live_and_foreign_keys_stay(
    openbao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    mount = overrides["vault_transit_mount"]
    async for server in running_server(tmp_path, **FAST, **overrides):
        live = _transit_keys(openbao, mount)
        assert live and all(n.startswith(PREFIX) for n in live)
        code, out, err = await asyncio.to_thread(_ca, server, overrides, "status")
        assert code == 0 and "orphaned keys" not in out, err
        # A crash between making a key and recording its entry leaves one the journal
        # does not name; another team's key in the same mount is not meshca's.
        client = VaultClient(openbao.addr, VaultAuth(token_file=overrides["vault_token_file"]))
        orphan_ref, _key = TransitKeyManager(client, mount, f"meshca-{TRUST_DOMAIN}").create(
            "intermediate"
        )
        orphan = orphan_ref.removeprefix("transit:")
        openbao.call("POST", f"{mount}/keys/payments-signing", {"type": "ecdsa-p256"})
        openbao.call("POST", f"{mount}/keys/meshca-other-example-root-1", {"type": "ecdsa-p256"})
        # Trust domain example.org.staging's keys start with example.org's prefix.
        staging = PREFIX + "staging-root-0123456789ab"
        openbao.call("POST", f"{mount}/keys/{staging}", {"type": "ecdsa-p256"})

        code, out, err = await asyncio.to_thread(_ca, server, overrides, "status")
        assert code == 0, err
        assert "orphaned keys: 1" in out and orphan_ref in out
        assert "payments-signing" not in out and "other-example" not in out
        assert "staging" not in out
        code, out, err = await asyncio.to_thread(
            _ca, server, overrides, "status", "--format", "json"
        )
        assert code == 0, err
        document = json.loads(out)
        assert document["orphaned_keys"] == [orphan_ref] and document["orphaned_keys_error"] is None

        # Without --yes nothing goes; --dry-run says what would.
        code, out, err = await asyncio.to_thread(_ca, server, overrides, "prune-keys")
        assert code == 1 and f"would delete {orphan_ref}" in out and "--yes" in err
        code, out, _err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--dry-run")
        assert code == 0 and f"would delete {orphan_ref}" in out
        assert orphan in _transit_keys(openbao, mount)

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meshca"):
            code, out, err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--yes")
        assert code == 0, err
        assert f"deleted {orphan_ref}" in out and "pruned 1" in out
        [event] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshca.events"]
        assert event == {"event": "ca-keys-pruned", "mount": mount, "keys": [orphan_ref]}
        remaining = _transit_keys(openbao, mount)
        assert orphan not in remaining
        assert set(live) <= set(remaining)
        assert {"payments-signing", "meshca-other-example-root-1", staging} <= set(remaining)
        # The CA still signs with its live keys.
        chain = await _issue(server)
        assert chain[1] == server.worker.authorities.current().certificate
        code, out, _err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--yes")
        assert code == 0 and "no orphaned keys" in out
        # Pointed at another data directory (no CA there, or an empty journal), every key
        # would look orphaned: refused, and nothing is deleted.
        code, _out, err = await asyncio.to_thread(
            _ca, tmp_path / "elsewhere", overrides, "prune-keys", "--yes"
        )
        assert code == 1 and "no CA in" in err
        empty = tmp_path / "empty"
        empty.mkdir()
        engine = make_engine(f"sqlite:///{empty / 'meshca.db'}")
        try:
            app.prepare_database(server.settings, engine)
        finally:
            engine.dispose()
        code, _out, err = await asyncio.to_thread(_ca, empty, overrides, "prune-keys", "--yes")
        assert code == 1 and "names no CA key" in err and "Nothing was deleted" in err
        assert set(live) <= set(_transit_keys(openbao, mount))

        # A removed authority's key that its removal did not get to delete is an orphan too;
        # an intermediate rotation leaves the old one retired (live) until it expires.
        code, _out, err = await asyncio.to_thread(
            _ca, server, overrides, "rotate", "--intermediate"
        )
        assert code == 0, err
        code, out, _err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--dry-run")
        assert code == 0 and "no orphaned keys" in out


async def test_prune_keys_outside_transit_mode_says_what_it_is_for(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=False)
    async for server in running_server(tmp_path, **FAST, **overrides):
        code, _out, err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--yes")
        assert code == 2 and "--vault-transit" in err


def _upstream_signed_intermediate(
    openbao: OpenBao, mount: str, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "org intermediate")]))
        .sign(key, hashes.SHA256())
    )
    answer = openbao.call(
        "POST",
        f"{mount}/root/sign-intermediate",
        {
            "csr": csr.public_bytes(Encoding.PEM).decode(),
            "common_name": "org intermediate",
            "uri_sans": f"spiffe://{TRUST_DOMAIN}",
            "ttl": "720h",
            "max_path_length": 0,
            "format": "pem",
        },
    )
    return x509.load_pem_x509_certificate(answer["data"]["certificate"].encode())


async def test_upstream_mode_imports_an_intermediate_under_vaults_root_and_refuses_roots(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    pki, transit = overrides["vault_pki_mount"], overrides["vault_transit_mount"]
    vault_root = x509.load_pem_x509_certificate(
        openbao.call("GET", f"{pki}/cert/ca")["data"]["certificate"].encode()
    )
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _upstream_signed_intermediate(openbao, pki, inter_key)
    key_file = _pem(tmp_path / "inter.key", inter_key)
    org_root, org_inter, org_key = _org_ca()
    async for server in running_server(tmp_path, **FAST, **overrides):
        keys_before = _transit_keys(openbao, transit)
        # A root: Vault's PKI mount is where roots come from; the message says how.
        code, _out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(_pem(tmp_path / "r.pem", org_root)),
            "--key",
            str(_pem(tmp_path / "r.key", signer_key("ec-p384", 71))),
        )
        assert code == 1 and f"{pki}/issuers/import/bundle" in err, err
        # An intermediate under a root Vault does not serve.
        code, _out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(_pem(tmp_path / "o.pem", org_inter, org_root)),
            "--key",
            str(_pem(tmp_path / "o.key", org_key)),
        )
        assert code == 1 and "does not chain to a root of the upstream" in err, err
        assert _transit_keys(openbao, transit) == keys_before

        # An intermediate Vault's root signed: imported into Transit, takes over.
        code, out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(_pem(tmp_path / "i.pem", inter, vault_root)),
            "--key",
            str(key_file),
        )
        assert code == 0, err
        assert "imported intermediate" in out and "imported root" not in out
        for _ in range(100):
            chain = await _issue(server)
            if chain[1] == inter:
                break
            await asyncio.sleep(0.1)
        assert chain[1] == inter and chain[-1] == vault_root
        _verify(chain, (vault_root,))
        signer = server.worker.authorities.current().signer
        assert isinstance(signer, TransitSigningKey)
        assert signer.name.startswith(PREFIX + "imported-intermediate-")
    assert _private_keys_on_disk(tmp_path / "data" / "ca") == []
    assert not _holds_secret(tmp_path / "data", inter_key)


def test_import_into_transit_then_a_serve_process_issues_under_it(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """An existing deployment, stopped; the org's CA imported; ``meshca serve`` started."""
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    data_dir = tmp_path / "data"

    async def first_start() -> None:
        async for _server in running_server(tmp_path, **FAST, **overrides):
            pass

    asyncio.run(first_start())
    org_root, inter, inter_key = _org_ca()
    code, out, err = _ca(
        data_dir,
        overrides,
        "import",
        "--cert",
        str(_pem(tmp_path / "chain.pem", inter, org_root)),
        "--key",
        str(_pem(tmp_path / "inter.key", inter_key)),
    )
    assert code == 0 and "imported intermediate" in out, err
    (tmp_path / "serve").mkdir()
    minter, jwks = TokenMinter.create(tmp_path / "serve")
    flags = [
        "--journal-poll", "0.1s", "--max-svid-ttl", "4s", "--svid-ttl", "4s",
        "--propagation-delay", "2s", "--vault-addr", overrides["vault_addr"], "--vault-transit",
        "--vault-transit-mount", overrides["vault_transit_mount"],
        "--vault-token-file", str(overrides["vault_token_file"]),
    ]  # fmt: skip
    served = launch("vaultca", data_dir, serve_command(data_dir, jwks, workers=1, extra=flags))
    try:
        roots_pem = b"".join(r.public_bytes(Encoding.PEM) for r in load_bundle(data_dir))
        assert org_root.public_bytes(Encoding.PEM) in roots_pem
        channel = channel_to(served.target, roots_pem)
        for _ in range(100):
            pems = create_certificate(channel, minter.mint(), csr_pem().decode())
            chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
            if chain[-1] == org_root:
                break
            time.sleep(0.1)
        channel.close()
        assert chain[1] == inter and chain[-1] == org_root, served.log()
        _verify(chain, (org_root,))
    finally:
        assert served.stop() == 0, served.log()
    assert _private_keys_on_disk(data_dir / "ca") == []
    assert not _holds_secret(data_dir, inter_key)


async def test_a_crash_after_the_transit_import_leaves_an_orphan_that_prune_removes(
    openbao: OpenBao, tmp_path: Path
) -> None:
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    mount = overrides["vault_transit_mount"]
    org_root, inter, inter_key = _org_ca()

    class Crash(Exception):
        pass

    def crash(name: str) -> None:
        if name == "import:key-stored":
            raise Crash(name)

    async for server in running_server(tmp_path, **FAST, **overrides):
        journal_before = await asyncio.to_thread(_journal_ids, server, overrides)
        keys_before = _transit_keys(openbao, mount)
        engine = make_engine(server.settings.effective_database_url)
        try:
            authorities = app.build_authorities(
                server.settings, engine, SystemClock(), checkpoint=crash
            )
            with pytest.raises(Crash):
                await asyncio.to_thread(
                    authorities.import_authority, [inter, org_root], inter_key, authorities.keys
                )
        finally:
            engine.dispose()
        [left] = sorted(set(_transit_keys(openbao, mount)) - set(keys_before))
        assert await asyncio.to_thread(_journal_ids, server, overrides) == journal_before
        code, out, err = await asyncio.to_thread(_ca, server, overrides, "status")
        assert code == 0 and f"transit:{left}" in out and "orphaned keys: 1" in out, err
        code, out, err = await asyncio.to_thread(_ca, server, overrides, "prune-keys", "--yes")
        assert code == 0 and f"deleted transit:{left}" in out, err
        assert _transit_keys(openbao, mount) == keys_before
        # The import, run again without the crash, goes through.
        code, out, err = await asyncio.to_thread(
            _ca,
            server,
            overrides,
            "import",
            "--cert",
            str(_pem(tmp_path / "chain.pem", inter, org_root)),
            "--key",
            str(_pem(tmp_path / "inter.key", inter_key)),
        )
        assert code == 0 and "imported intermediate" in out, err
