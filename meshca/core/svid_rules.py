"""X509-SVID rules checked on every certificate meshca issues, after signing.

A failure here is our bug, never the caller's: it raises ``IssuedCertificateInvalid`` and
the certificate is not returned.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from meshca.core.authority import Authority
from meshca.core.errors import IssuedCertificateInvalid
from meshca.core.spiffe import SpiffeId

__all__ = ["check_leaf_svid"]

MIN_SERIAL_BITS = 64


def check_leaf_svid(cert: x509.Certificate, spiffe_id: SpiffeId, issuer: Authority) -> None:
    """Raise ``IssuedCertificateInvalid`` unless ``cert`` is a valid leaf SVID for the ID."""
    problems = list(_leaf_problems(cert, spiffe_id, issuer))
    if problems:
        raise IssuedCertificateInvalid(
            "issued certificate breaks X509-SVID rules: " + "; ".join(problems)
        )


_REQUIRED_EKUS = frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})


def _leaf_problems(  # type: ignore[no-untyped-def]
    cert: x509.Certificate, spiffe_id: SpiffeId, issuer: Authority
):
    # One pass over the extensions: this runs on every certificate we issue.
    found = {ext.oid: ext for ext in cert.extensions}
    bc = found.get(ExtensionOID.BASIC_CONSTRAINTS)
    if (
        bc is None
        or not bc.critical
        or not isinstance(bc.value, x509.BasicConstraints)
        or bc.value.ca
    ):
        yield "basicConstraints must be present, critical and CA:false"
    ku = found.get(ExtensionOID.KEY_USAGE)
    if ku is None or not ku.critical or not isinstance(ku.value, x509.KeyUsage):
        yield "keyUsage must be present and critical"
    elif not ku.value.digital_signature or ku.value.key_cert_sign or ku.value.crl_sign:
        yield "keyUsage must have digitalSignature and neither keyCertSign nor cRLSign"
    eku = found.get(ExtensionOID.EXTENDED_KEY_USAGE)
    if (
        eku is None
        or not isinstance(eku.value, x509.ExtendedKeyUsage)
        or not _REQUIRED_EKUS <= set(eku.value)
    ):
        yield "extendedKeyUsage must have serverAuth and clientAuth"
    san = found.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    uris = (
        san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if san is not None and isinstance(san.value, x509.SubjectAlternativeName)
        else []
    )
    if uris != [str(spiffe_id)] or not spiffe_id.is_workload:
        yield f"exactly one URI SAN equal to {spiffe_id} (with a non-root path) is required"
    elif len(cert.subject) == 0 and (san is None or not san.critical):
        yield "with an empty subject the SAN extension must be critical"
    if cert.serial_number <= 0 or cert.serial_number.bit_length() < MIN_SERIAL_BITS - 8:
        yield "serial must be a positive number of at least 64 random bits"
    if cert.not_valid_after_utc > issuer.not_after:
        yield "certificate outlives its issuer"
    if cert.issuer != issuer.certificate.subject:
        yield "issuer name does not match the issuing CA"
