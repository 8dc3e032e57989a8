"""Leaf certificates from a DER template: what every leaf shares is encoded once.

All leaves of one issuer share their version, signature algorithm, issuer name, empty
subject, basicConstraints, keyUsage, extendedKeyUsage and authorityKeyIdentifier. Per
leaf only the serial, validity, public key, subjectKeyIdentifier and SPIFFE ID are
encoded, then the issuer signs. The bytes are those ``issuance.issue_leaf`` gets from
``CertificateBuilder`` for the same inputs (a property test compares them byte for byte),
at a fraction of the cost; ``svid_rules`` still checks every result.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from meshca.core import der

__all__ = ["LeafTemplate", "certificate_pem", "subject_key_identifier"]

# AlgorithmIdentifier elements, as CertificateBuilder writes them (RSA with NULL params).
_ECDSA = {
    "sha256": bytes.fromhex("300a06082a8648ce3d040302"),
    "sha384": bytes.fromhex("300a06082a8648ce3d040303"),
    "sha512": bytes.fromhex("300a06082a8648ce3d040304"),
}
_RSA_PKCS1 = {
    "sha256": bytes.fromhex("300d06092a864886f70d01010b0500"),
    "sha384": bytes.fromhex("300d06092a864886f70d01010c0500"),
    "sha512": bytes.fromhex("300d06092a864886f70d01010d0500"),
}
_ED25519 = bytes.fromhex("300506032b6570")

_VERSION_3 = der.tlv(der.CONTEXT_0, der.encode_integer(2))
_EMPTY_SUBJECT = der.tlv(der.SEQUENCE, b"")


def _extension(oid: str, critical: bool, value: bytes) -> bytes:
    flag = der.tlv(der.BOOLEAN, b"\xff") if critical else b""
    return der.tlv(
        der.SEQUENCE, der.tlv(der.OID, bytes.fromhex(oid)) + flag + der.tlv(der.OCTET_STRING, value)
    )


# basicConstraints (critical) CA:false; keyUsage (critical) digitalSignature, plus
# keyEncipherment for RSA keys; extendedKeyUsage serverAuth, clientAuth.
_BASIC_CONSTRAINTS = _extension("551d13", True, der.tlv(der.SEQUENCE, b""))
_KEY_USAGE = _extension("551d0f", True, der.tlv(der.BIT_STRING, b"\x07\x80"))
_RSA_KEY_USAGE = _extension("551d0f", True, der.tlv(der.BIT_STRING, b"\x05\xa0"))
_EXTENDED_KEY_USAGE = _extension(
    "551d25",
    False,
    der.tlv(
        der.SEQUENCE,
        der.tlv(der.OID, bytes.fromhex("2b06010505070301"))
        + der.tlv(der.OID, bytes.fromhex("2b06010505070302")),
    ),
)
# subjectKeyIdentifier: SEQUENCE, its OID, and the OCTET STRINGs around a 20-byte SHA-1.
_SUBJECT_KEY_ID_HEAD = bytes.fromhex("301d0603551d0e04160414")
_AUTHORITY_KEY_ID_OID = "551d23"
_SUBJECT_ALT_NAME_OID = "551d11"
_URI_NAME = 0x86  # GeneralName [6] IA5String
_DNS_NAME = 0x82  # GeneralName [2] IA5String


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """RFC 5280 method 1: SHA-1 of the subjectPublicKey bits of a SubjectPublicKeyInfo."""
    tag, start, end = der.read(public_key_der)
    if tag != der.SEQUENCE:
        raise der.DerError("not a SubjectPublicKeyInfo")
    _alg_tag, _alg_start, alg_end = der.read(public_key_der, start, end)
    bits_tag, bits_start, bits_end = der.read(public_key_der, alg_end, end)
    if bits_tag != der.BIT_STRING or bits_start == bits_end:
        raise der.DerError("SubjectPublicKeyInfo has no key bits")
    # The first content byte counts unused bits; the key is what follows.
    return hashlib.sha1(public_key_der[bits_start + 1 : bits_end], usedforsecurity=False).digest()


@dataclass(frozen=True, slots=True)
class LeafTemplate:
    """An issuer's fixed leaf parts and its signing function."""

    signature_algorithm: bytes
    issuer_name: bytes
    authority_key_id: bytes
    sign_bytes: Callable[[bytes], bytes]

    @classmethod
    def for_issuer(
        cls,
        signer: object,
        digest: hashes.HashAlgorithm | None,
        issuer_name_der: bytes,
        authority_key_id_der: bytes,
    ) -> LeafTemplate | None:
        """The template for an issuer, or None for a key or digest it does not cover.

        ``authority_key_id_der`` is the DER of the AuthorityKeyIdentifier value.
        """
        sign: Callable[[bytes], bytes]
        if isinstance(signer, ec.EllipticCurvePrivateKey) and digest is not None:
            algorithm = _ECDSA.get(digest.name)
            ecdsa = ec.ECDSA(digest)
            sign = lambda data: signer.sign(data, ecdsa)  # noqa: E731
        elif isinstance(signer, rsa.RSAPrivateKey) and digest is not None:
            algorithm = _RSA_PKCS1.get(digest.name)
            pkcs1 = padding.PKCS1v15()
            sign = lambda data: signer.sign(data, pkcs1, digest)  # noqa: E731
        elif isinstance(signer, ed25519.Ed25519PrivateKey) and digest is None:
            algorithm = _ED25519
            sign = signer.sign
        else:
            return None
        if algorithm is None:
            return None
        return cls(
            signature_algorithm=algorithm,
            issuer_name=issuer_name_der,
            authority_key_id=_extension(_AUTHORITY_KEY_ID_OID, False, authority_key_id_der),
            sign_bytes=sign,
        )

    def tbs(
        self,
        public_key_der: bytes,
        spiffe_id: str,
        not_before: datetime,
        not_after: datetime,
        serial: int,
        *,
        key_encipherment: bool,
        dns_names: Sequence[str] = (),
    ) -> bytes:
        """The TBSCertificate of a leaf for ``spiffe_id`` (an ASCII URI) and this key.

        ``dns_names`` (ASCII) follow the URI in the SAN, in order.
        """
        names = der.tlv(_URI_NAME, spiffe_id.encode("ascii"))
        for name in dns_names:
            names += der.tlv(_DNS_NAME, name.encode("ascii"))
        san = der.tlv(der.SEQUENCE, names)
        extensions = b"".join(
            (
                _BASIC_CONSTRAINTS,
                _RSA_KEY_USAGE if key_encipherment else _KEY_USAGE,
                _EXTENDED_KEY_USAGE,
                _SUBJECT_KEY_ID_HEAD + subject_key_identifier(public_key_der),
                self.authority_key_id,
                _extension(_SUBJECT_ALT_NAME_OID, True, san),
            )
        )
        return der.tlv(
            der.SEQUENCE,
            b"".join(
                (
                    _VERSION_3,
                    der.encode_integer(serial),
                    self.signature_algorithm,
                    self.issuer_name,
                    der.tlv(der.SEQUENCE, der.encode_time(not_before) + der.encode_time(not_after)),
                    _EMPTY_SUBJECT,
                    public_key_der,
                    der.tlv(der.CONTEXT_3, der.tlv(der.SEQUENCE, extensions)),
                )
            ),
        )

    def certificate(self, tbs: bytes) -> bytes:
        """Sign ``tbs``: the whole certificate, DER."""
        signature = der.tlv(der.BIT_STRING, b"\x00" + self.sign_bytes(tbs))
        return der.tlv(der.SEQUENCE, tbs + self.signature_algorithm + signature)


def certificate_pem(certificate_der: bytes) -> str:
    """The PEM text of a DER certificate, as ``Certificate.public_bytes(PEM)`` writes it."""
    text = base64.b64encode(certificate_der).decode("ascii")
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"
