"""check_leaf_svid: passes meshca's leaves and refuses hand-built leaves that break a rule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.csr import parse_csr
from meshca.core.errors import InternalError, IssuedCertificateInvalid
from meshca.core.issuance import IssuancePolicy, issue_leaf, issue_leaf_der, leaf_lifetime
from meshca.core.spiffe import SpiffeId
from meshca.core.svid_rules import check_leaf_svid
from tests.core.builders import (
    ACCEPTED_KEY_KINDS,
    NOW,
    WORKLOAD_ID,
    Pki,
    build_pki,
    csr_der,
    custom_leaf,
    key_usage,
    leaf_extensions,
    private_key,
)

OWN = str(WORKLOAD_ID)
ROOT_ID = SpiffeId.parse("spiffe://example.org")
BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return build_pki(now=NOW - timedelta(days=1))


def _replace(
    ext_type: type[x509.ExtensionType], new: x509.ExtensionType | None, critical: bool
) -> list[tuple[x509.ExtensionType, bool]]:
    """The correct leaf extensions with one of them replaced (or dropped if ``new`` is None)."""
    out: list[tuple[x509.ExtensionType, bool]] = []
    for ext, crit in leaf_extensions():
        if isinstance(ext, ext_type):
            if new is not None:
                out.append((new, critical))
        else:
            out.append((ext, crit))
    return out


def _san(*names: x509.GeneralName) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(list(names))


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_issued_leaves_pass(pki: Pki, kind: str) -> None:
    csr = parse_csr(csr_der(private_key(kind)))
    not_before, not_after = leaf_lifetime(NOW, None, IssuancePolicy(), pki.authority)
    leaf = issue_leaf(csr, WORKLOAD_ID, pki.authority, not_before, not_after, 2**70 + 1)
    check_leaf_svid(leaf, WORKLOAD_ID, pki.authority)


GOOD = [
    pytest.param({}, id="ok/hand-built-baseline"),
    pytest.param(
        {
            "subject": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]),
            "extensions": _replace(
                x509.SubjectAlternativeName, _san(x509.UniformResourceIdentifier(OWN)), False
            ),
        },
        id="ok/non-critical-san-with-subject",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName,
                _san(x509.UniformResourceIdentifier(OWN), x509.DNSName("web.example.org")),
                True,
            )
        },
        id="ok/extra-dns-san",
    ),
    pytest.param(
        {"extensions": _replace(x509.KeyUsage, key_usage(key_encipherment=True), True)},
        id="ok/key-encipherment",
    ),
    pytest.param(
        {"extensions": _replace(x509.ExtendedKeyUsage, x509.ExtendedKeyUsage(BOTH), True)},
        id="ok/critical-eku",
    ),
    pytest.param({"serial": 2**63}, id="ok/64-bit-serial"),
]


@pytest.mark.parametrize("options", GOOD)
def test_hand_built_good_leaves_pass(pki: Pki, options: dict[str, Any]) -> None:
    check_leaf_svid(custom_leaf(pki.authority, **options), WORKLOAD_ID, pki.authority)


BAD = [
    pytest.param(
        {"extensions": _replace(x509.BasicConstraints, x509.BasicConstraints(True, None), True)},
        "CA:false",
        id="fail/ca-true",
    ),
    pytest.param(
        {"extensions": _replace(x509.BasicConstraints, x509.BasicConstraints(True, 0), True)},
        "CA:false",
        id="fail/ca-true-pathlen-0",
    ),
    pytest.param(
        {"extensions": _replace(x509.BasicConstraints, None, True)},
        "basicConstraints",
        id="fail/basic-constraints-missing",
    ),
    pytest.param(
        {"extensions": _replace(x509.BasicConstraints, x509.BasicConstraints(False, None), False)},
        "basicConstraints",
        id="fail/basic-constraints-not-critical",
    ),
    pytest.param(
        {"extensions": _replace(x509.KeyUsage, None, True)},
        "keyUsage must be present",
        id="fail/key-usage-missing",
    ),
    pytest.param(
        {"extensions": _replace(x509.KeyUsage, key_usage(), False)},
        "keyUsage must be present and critical",
        id="fail/key-usage-not-critical",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.KeyUsage, key_usage(digital_signature=False, key_encipherment=True), True
            )
        },
        "digitalSignature",
        id="fail/no-digital-signature",
    ),
    pytest.param(
        {"extensions": _replace(x509.KeyUsage, key_usage(key_cert_sign=True), True)},
        "keyCertSign",
        id="fail/key-cert-sign",
    ),
    pytest.param(
        {"extensions": _replace(x509.KeyUsage, key_usage(crl_sign=True), True)},
        "cRLSign",
        id="fail/crl-sign",
    ),
    pytest.param(
        {"extensions": _replace(x509.ExtendedKeyUsage, None, False)},
        "extendedKeyUsage",
        id="fail/no-eku",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.ExtendedKeyUsage,
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                False,
            )
        },
        "clientAuth",
        id="fail/eku-without-client-auth",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.ExtendedKeyUsage,
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                False,
            )
        },
        "serverAuth",
        id="fail/eku-without-server-auth",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName,
                _san(
                    x509.UniformResourceIdentifier(OWN),
                    x509.UniformResourceIdentifier("spiffe://example.org/ns/default/sa/admin"),
                ),
                True,
            )
        },
        "exactly one URI SAN",
        id="fail/two-uri-sans",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName,
                _san(x509.UniformResourceIdentifier(OWN), x509.UniformResourceIdentifier(OWN)),
                True,
            )
        },
        "exactly one URI SAN",
        id="fail/same-uri-twice",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName,
                _san(x509.UniformResourceIdentifier("spiffe://example.org/ns/default/sa/admin")),
                True,
            )
        },
        "exactly one URI SAN",
        id="fail/other-spiffe-id",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName, _san(x509.DNSName("web.example.org")), True
            )
        },
        "exactly one URI SAN",
        id="fail/dns-san-only",
    ),
    pytest.param(
        {"extensions": _replace(x509.SubjectAlternativeName, None, True)},
        "exactly one URI SAN",
        id="fail/no-san",
    ),
    pytest.param(
        {
            "extensions": _replace(
                x509.SubjectAlternativeName, _san(x509.UniformResourceIdentifier(OWN)), False
            )
        },
        "SAN extension must be critical",
        id="fail/non-critical-san-with-empty-subject",
    ),
    pytest.param({"serial": 1}, "serial", id="fail/serial-1"),
    pytest.param({"serial": 2**40}, "serial", id="fail/serial-41-bits"),
    pytest.param({"serial": 2**55 - 1}, "serial", id="fail/serial-55-bits"),
    pytest.param(
        {"not_after": NOW + timedelta(days=400)}, "outlives its issuer", id="fail/outlives-issuer"
    ),
    pytest.param(
        {"issuer_name": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])},
        "issuer name",
        id="fail/wrong-issuer-name",
    ),
]


@pytest.mark.parametrize(("options", "problem"), BAD)
def test_bad_leaves_are_refused(pki: Pki, options: dict[str, Any], problem: str) -> None:
    leaf = custom_leaf(pki.authority, **options)
    with pytest.raises(IssuedCertificateInvalid, match=problem) as caught:
        check_leaf_svid(leaf, WORKLOAD_ID, pki.authority)
    assert isinstance(caught.value, InternalError)
    assert caught.value.reason == "issued-certificate-invalid"


def test_root_path_spiffe_id_is_refused(pki: Pki) -> None:
    """X509-SVID §3.1: a leaf's SPIFFE ID has a path, even when the SAN matches exactly."""
    leaf = custom_leaf(
        pki.authority,
        extensions=_replace(
            x509.SubjectAlternativeName,
            _san(x509.UniformResourceIdentifier(str(ROOT_ID))),
            True,
        ),
    )
    with pytest.raises(IssuedCertificateInvalid, match="non-root path"):
        check_leaf_svid(leaf, ROOT_ID, pki.authority)


def test_leaf_checked_against_another_id_is_refused(pki: Pki) -> None:
    leaf = custom_leaf(pki.authority)
    other = SpiffeId.parse("spiffe://example.org/ns/default/sa/admin")
    with pytest.raises(IssuedCertificateInvalid, match="exactly one URI SAN"):
        check_leaf_svid(leaf, other, pki.authority)


def test_every_problem_is_reported(pki: Pki) -> None:
    """One refusal lists all broken rules, so a broken issuer is diagnosed in one go."""
    leaf = custom_leaf(
        pki.authority,
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
        serial=5,
    )
    with pytest.raises(IssuedCertificateInvalid) as caught:
        check_leaf_svid(leaf, WORKLOAD_ID, pki.authority)
    for problem in ("CA:false", "keyUsage", "extendedKeyUsage", "URI SAN", "serial"):
        assert problem in caught.value.message


@given(index=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
@settings(max_examples=300, deadline=None)
def test_corrupted_der_is_refused_or_still_valid(pki: Pki, index: int, mask: int) -> None:
    """Any byte of an issued leaf flipped: the check passes it or refuses it, nothing else."""
    leaf = bytearray(custom_leaf(pki.authority).public_bytes(Encoding.DER))
    leaf[index % len(leaf)] ^= mask
    try:
        check_leaf_svid(bytes(leaf), WORKLOAD_ID, pki.authority)
    except IssuedCertificateInvalid:
        pass


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="fail/empty"),
        pytest.param(b"\x30\x00", id="fail/empty-sequence"),
        pytest.param(b"\x30\x03\x02\x01\x01", id="fail/no-tbs"),
    ],
)
def test_non_certificates_are_refused(pki: Pki, data: bytes) -> None:
    with pytest.raises(IssuedCertificateInvalid, match="not a DER certificate"):
        check_leaf_svid(data, WORKLOAD_ID, pki.authority)


def test_truncated_leaf_is_refused(pki: Pki) -> None:
    leaf = custom_leaf(pki.authority).public_bytes(Encoding.DER)
    with pytest.raises(IssuedCertificateInvalid, match="not a DER certificate"):
        check_leaf_svid(leaf[:-1], WORKLOAD_ID, pki.authority)


def test_dns_names_must_be_exactly_the_ones_meant() -> None:
    pki = build_pki()
    csr = parse_csr(csr_der())
    name = "web.default.serviceaccount.identity.linkerd.cluster.local"
    leaf = issue_leaf_der(
        csr, WORKLOAD_ID, pki.authority, NOW, NOW + timedelta(hours=1), 2**70, (name,)
    )
    check_leaf_svid(leaf, WORKLOAD_ID, pki.authority, (name,))
    check_leaf_svid(leaf, WORKLOAD_ID, pki.authority)  # no expectation: not looked at
    for wrong in ((), ("other.example.com",), (name, name)):
        with pytest.raises(IssuedCertificateInvalid, match="DNS SANs must be exactly"):
            check_leaf_svid(leaf, WORKLOAD_ID, pki.authority, wrong)
