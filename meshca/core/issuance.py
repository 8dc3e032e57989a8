"""Leaf X509-SVID issuance: from an attested identity and a verified CSR to a certificate.

The leaf's lifetime is ``min(requested or default, max, issuer's remaining life)``: meshca
never signs a certificate that outlives its issuer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshca.core.authority import Authority
from meshca.core.csr import CsrRequest
from meshca.core.errors import AuthorityNotReady, NotAuthorized
from meshca.core.spiffe import SpiffeId

__all__ = [
    "CLOCK_SKEW_BACKDATE",
    "IssuancePolicy",
    "authorize_csr",
    "issue_leaf",
    "issue_leaf_der",
    "leaf_lifetime",
]

#: notBefore is backdated this much so peers with slightly slow clocks accept the leaf.
CLOCK_SKEW_BACKDATE = timedelta(seconds=60)
#: An issuer with less life left than this (or than the longest leaf, if shorter) is not
#: used: the leaf would be useless.
MIN_LEAF_LIFETIME = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """Plain TTL settings: what a caller gets by default and at most."""

    default_ttl: timedelta = timedelta(hours=24)
    max_ttl: timedelta = timedelta(hours=24)


def authorize_csr(csr: CsrRequest, spiffe_id: SpiffeId) -> None:
    """A CSR may name no URI at all, or exactly the caller's own SPIFFE ID."""
    wanted = str(spiffe_id)
    if len(csr.uri_sans) > 1:
        raise NotAuthorized(
            f"CSR asks for {len(csr.uri_sans)} URI SANs; an SVID has exactly one ({wanted})",
            reason="csr-identity-mismatch",
        )
    if csr.uri_sans and csr.uri_sans[0] != wanted:
        raise NotAuthorized(
            f"CSR asks for {csr.uri_sans[0][:200]!r} but the token proves {wanted}",
            reason="csr-identity-mismatch",
        )


def leaf_lifetime(
    now: datetime, requested: timedelta | None, policy: IssuancePolicy, issuer: Authority
) -> tuple[datetime, datetime]:
    """``(not_before, not_after)`` for a leaf issued at ``now``."""
    if now < issuer.not_before:
        # A leaf from an issuer that is not valid yet would not verify, and its window
        # [issuer.not_before, now + ttl] could even be empty.
        raise AuthorityNotReady("the issuing CA is not valid yet")
    # The minimum applies to the issuer's remaining life; a short requested TTL is honoured.
    # Where every leaf is shorter than the minimum, one of the longest is usable.
    if issuer.not_after - now < min(MIN_LEAF_LIFETIME, policy.max_ttl):
        raise AuthorityNotReady("the issuing CA expires too soon to sign a usable certificate")
    ttl = requested if requested is not None and requested > timedelta(0) else policy.default_ttl
    ttl = min(ttl, policy.max_ttl)
    not_after = min(now + ttl, issuer.not_after)
    not_before = max(now - CLOCK_SKEW_BACKDATE, issuer.not_before)
    return not_before, not_after


def _leaf_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# Every leaf carries these same values; built once rather than per certificate.
_EMPTY_NAME = x509.Name([])
_LEAF_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_USAGE = _leaf_usage(key_encipherment=False)
_RSA_LEAF_USAGE = _leaf_usage(key_encipherment=True)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def issue_leaf(
    csr: CsrRequest,
    spiffe_id: SpiffeId,
    issuer: Authority,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    extra_names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """Sign an X509-SVID for ``spiffe_id`` with the CSR's key and nothing else it asked for.

    The subject is empty and the URI SAN therefore critical, as RFC 5280 requires.
    ``extra_names`` (DNS names, IP addresses) are for meshca's own serving certificate;
    a caller's CSR never chooses them.
    """
    is_rsa = isinstance(csr.public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_EMPTY_NAME)
        .issuer_name(issuer.certificate.subject)
        .public_key(csr.public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_LEAF_CONSTRAINTS, True)
        .add_extension(_RSA_LEAF_USAGE if is_rsa else _LEAF_USAGE, True)
        .add_extension(_LEAF_EKU, False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key), False)
        .add_extension(issuer.key_identifier, False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(spiffe_id)), *extra_names]
            ),
            True,
        )
    )
    return builder.sign(issuer.signer, issuer.signature_hash)


def issue_leaf_der(
    csr: CsrRequest,
    spiffe_id: SpiffeId,
    issuer: Authority,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    dns_names: Sequence[str] = (),
) -> bytes:
    """``issue_leaf``'s certificate, as DER, made from the issuer's leaf template.

    The bytes are the ones ``issue_leaf`` would sign; issuers the template does not
    cover go through ``CertificateBuilder``. ``dns_names`` follow the SPIFFE ID in the
    SAN, for doors that name a workload by DNS as well (Linkerd): the caller has checked
    them against the attested identity.
    """
    template = issuer.leaf_template
    if template is None:
        names = [x509.DNSName(name) for name in dns_names]
        leaf = issue_leaf(csr, spiffe_id, issuer, not_before, not_after, serial, names)
        return leaf.public_bytes(Encoding.DER)
    tbs = template.tbs(
        csr.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        str(spiffe_id),
        not_before,
        not_after,
        serial,
        key_encipherment=isinstance(csr.public_key, rsa.RSAPublicKey),
        dns_names=dns_names,
    )
    return template.certificate(tbs)
