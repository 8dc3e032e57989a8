"""Certificate signing requests: parse, verify, and extract what the caller asks for.

``parse_csr`` accepts PEM or DER and either returns a ``CsrRequest`` or raises one of
``MalformedCsr``, ``WeakKey``, ``RequestTooLarge`` or, for a well-formed CSR that asks for
CA powers, ``InvalidRequest`` (reason ``csr-requests-ca``): random bytes can raise nothing
else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from meshca.core.errors import InvalidRequest, MalformedCsr, RequestTooLarge, WeakKey

__all__ = ["MAX_CSR_BYTES", "CsrRequest", "LeafPublicKey", "parse_csr"]

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class CsrRequest:
    """A verified CSR reduced to the parts meshca looks at.

    ``uri_sans`` are what the caller asked to be named; everything else it asked for
    (subject, DNS names, extensions) is ignored when the leaf is built. ``dns_sans`` and
    ``other_sans`` (the kinds of any other names: ``ip``, ``email``, ``other``) are kept
    for the doors that name workloads by DNS (Linkerd), which refuse anything else.
    """

    public_key: LeafPublicKey
    uri_sans: tuple[str, ...]
    sha256: str
    dns_sans: tuple[str, ...] = ()
    other_sans: tuple[str, ...] = ()

    @property
    def key_description(self) -> str:
        return describe_key(self.public_key)


def describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def parse_csr(data: bytes) -> CsrRequest:
    """Parse a PEM or DER CSR, verify its self-signature and check its key."""
    if len(data) > MAX_CSR_BYTES:
        raise RequestTooLarge(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
    stripped = data.strip()
    if not stripped:
        raise MalformedCsr("CSR is empty")
    try:
        if stripped.startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(stripped)
        else:
            csr = x509.load_der_x509_csr(data)
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise MalformedCsr(f"CSR could not be parsed: {_first_line(exc)}") from None
    try:
        public_key = csr.public_key()
        signature_ok = _signature_verifies(csr, public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # Unsupported or corrupt key and signature algorithms surface here.
        raise MalformedCsr(f"CSR could not be verified: {_first_line(exc)}") from None
    if not signature_ok:
        raise MalformedCsr("CSR signature does not verify", reason="csr-bad-signature")
    leaf_key = _check_key(public_key)
    extensions = _extensions(csr)
    _refuse_ca_request(extensions)
    uris, dns_names, others = _sans(extensions)
    return CsrRequest(
        public_key=leaf_key,
        uri_sans=uris,
        sha256=hashlib.sha256(csr.public_bytes(Encoding.DER)).hexdigest(),
        dns_sans=dns_names,
        other_sans=others,
    )


def _signature_verifies(csr: x509.CertificateSigningRequest, key: object) -> bool:
    """The CSR's self-signature checked with the key already parsed (``is_signature_valid``
    parses it again); keys meshca never accepts still go through ``is_signature_valid``."""
    params = csr.signature_algorithm_parameters
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, params)
        elif isinstance(key, rsa.RSAPublicKey):
            digest = csr.signature_hash_algorithm
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or digest is None:
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, params, digest)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if csr.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes)
        else:
            return csr.is_signature_valid
    except InvalidSignature:
        return False
    return True


def _check_key(key: object) -> LeafPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise WeakKey(f"CSR key uses curve {key.curve.name}; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise WeakKey(f"CSR key is RSA {key.key_size}; at least {MIN_RSA_BITS} bits needed")
        if key.key_size > MAX_RSA_BITS:
            raise WeakKey(f"CSR key is RSA {key.key_size}; at most {MAX_RSA_BITS} bits allowed")
        exponent = key.public_numbers().e
        if exponent < 65537 or exponent % 2 == 0:
            raise WeakKey(f"CSR key has a weak RSA public exponent {exponent}")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise WeakKey(
        f"CSR key type {describe_key(key)} is not accepted; "
        "use ECDSA P-256/P-384, Ed25519 or RSA >= 2048"
    )


def _extensions(csr: x509.CertificateSigningRequest) -> x509.Extensions:
    try:
        return csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedCsr(f"CSR extensions could not be parsed: {_first_line(exc)}") from None


def _refuse_ca_request(extensions: x509.Extensions) -> None:
    """A workload asking for signing powers is hostile or broken; either way, refuse."""
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise InvalidRequest(
                "CSR asks for a CA certificate (CA:true)", reason="csr-requests-ca"
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise InvalidRequest(
                "CSR asks for certificate or CRL signing key usage", reason="csr-requests-ca"
            )


def _sans(
    extensions: x509.Extensions,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The URI and DNS names asked for, and the kinds of any other names."""
    try:
        san = extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return (), (), ()
    assert isinstance(san, x509.SubjectAlternativeName)
    uris: list[str] = []
    dns_names: list[str] = []
    others: list[str] = []
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        elif isinstance(name, x509.DNSName):
            dns_names.append(name.value)
        else:
            others.append(_SAN_KINDS.get(type(name), "other"))
    return tuple(uris), tuple(dns_names), tuple(others)


_SAN_KINDS: dict[type[x509.GeneralName], str] = {
    x509.IPAddress: "ip",
    x509.RFC822Name: "email",
    x509.DirectoryName: "directory-name",
    x509.RegisteredID: "registered-id",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
