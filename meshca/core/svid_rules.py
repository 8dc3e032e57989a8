"""X509-SVID rules checked on every certificate meshca issues, after signing.

A failure here is our bug, never the caller's: it raises ``IssuedCertificateInvalid`` and
the certificate is not returned. The check reads the certificate's own DER bytes (the
ones that will leave), independently of how they were made, so it guards the DER leaf
template as well as ``CertificateBuilder``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.core import der
from meshca.core.authority import Authority
from meshca.core.errors import IssuedCertificateInvalid
from meshca.core.spiffe import SpiffeId

__all__ = ["check_leaf_svid"]

MIN_SERIAL_BITS = 64

# Extension and key-purpose OIDs, as DER content bytes.
_BASIC_CONSTRAINTS = b"\x55\x1d\x13"
_KEY_USAGE = b"\x55\x1d\x0f"
_EXTENDED_KEY_USAGE = b"\x55\x1d\x25"
_SUBJECT_ALT_NAME = b"\x55\x1d\x11"
_SERVER_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x01"
_CLIENT_AUTH = b"\x2b\x06\x01\x05\x05\x07\x03\x02"
_URI_NAME = 0x86  # GeneralName uniformResourceIdentifier: [6] IA5String, implicit
_DNS_NAME = 0x82  # GeneralName dNSName: [2] IA5String, implicit
# keyUsage bits (RFC 5280 4.2.1.3) as masks of the BIT STRING's first byte: bit 0 is
# the most significant.
_DIGITAL_SIGNATURE = 0x80
_KEY_CERT_SIGN = 0x04
_CRL_SIGN = 0x02


def check_leaf_svid(
    cert: x509.Certificate | bytes,
    spiffe_id: SpiffeId,
    issuer: Authority,
    dns_names: Sequence[str] | None = None,
) -> None:
    """Raise ``IssuedCertificateInvalid`` unless ``cert`` is a valid leaf SVID for the ID.

    ``cert`` is the certificate or its DER. With ``dns_names``, the SAN's DNS names must
    be exactly those, in order (a leaf for a DNS-named door such as Linkerd's). Every
    broken rule is named in the message.
    """
    data = cert if isinstance(cert, bytes) else cert.public_bytes(Encoding.DER)
    try:
        problems = list(_leaf_problems(data, spiffe_id, issuer, dns_names))
    except der.DerError as error:
        problems = [f"not a DER certificate: {error}"]
    if problems:
        raise IssuedCertificateInvalid(
            "issued certificate breaks X509-SVID rules: " + "; ".join(problems)
        )


class _Extension:
    __slots__ = ("critical", "end", "start")

    def __init__(self, critical: bool, start: int, end: int) -> None:
        self.critical = critical
        self.start = start
        self.end = end


def _leaf_problems(
    data: bytes, spiffe_id: SpiffeId, issuer: Authority, dns_names: Sequence[str] | None
) -> Iterator[str]:
    tag, start, end = der.read(data)
    if tag != der.SEQUENCE or end != len(data):
        raise der.DerError("not one SEQUENCE")
    tag, start, end = der.read(data, start, end)  # tbsCertificate
    if tag != der.SEQUENCE:
        raise der.DerError("no tbsCertificate")
    fields = list(der.children(data, start, end))
    if fields and fields[0][0] == der.CONTEXT_0:
        fields = fields[1:]  # version; v1 has none and no extensions either
    if len(fields) < 6:
        raise der.DerError("tbsCertificate is missing fields")
    serial_field, _signature, issuer_field, validity, subject, _key = fields[:6]
    extensions = _extensions(data, fields[6:])

    bc = extensions.get(_BASIC_CONSTRAINTS)
    if bc is None or not bc.critical or _is_ca(data, bc):
        yield "basicConstraints must be present, critical and CA:false"
    ku = extensions.get(_KEY_USAGE)
    if ku is None or not ku.critical:
        yield "keyUsage must be present and critical"
    else:
        bits = _first_usage_byte(data, ku)
        if not bits & _DIGITAL_SIGNATURE or bits & (_KEY_CERT_SIGN | _CRL_SIGN):
            yield "keyUsage must have digitalSignature and neither keyCertSign nor cRLSign"
    eku = extensions.get(_EXTENDED_KEY_USAGE)
    if eku is None or not {_SERVER_AUTH, _CLIENT_AUTH} <= _purposes(data, eku):
        yield "extendedKeyUsage must have serverAuth and clientAuth"
    san = extensions.get(_SUBJECT_ALT_NAME)
    uris = _uris(data, san) if san is not None else []
    if uris != [str(spiffe_id)] or not spiffe_id.is_workload:
        yield f"exactly one URI SAN equal to {spiffe_id} (with a non-root path) is required"
    elif subject[1] == subject[2] and not (san and san.critical):
        yield "with an empty subject the SAN extension must be critical"
    if dns_names is not None:
        found = _names(data, san, _DNS_NAME) if san is not None else []
        if found != list(dns_names):
            yield f"DNS SANs must be exactly {list(dns_names)}"
    if serial_field[0] != der.INTEGER:
        raise der.DerError("serial is not an INTEGER")
    serial = der.read_integer(data, serial_field[1], serial_field[2])
    if serial <= 0 or serial.bit_length() < MIN_SERIAL_BITS - 8:
        yield "serial must be a positive number of at least 64 random bits"
    if _not_after(data, validity) > issuer.not_after:
        yield "certificate outlives its issuer"
    if der.tlv(issuer_field[0], data[issuer_field[1] : issuer_field[2]]) != issuer.subject_der:
        yield "issuer name does not match the issuing CA"


def _extensions(data: bytes, rest: list[tuple[int, int, int]]) -> dict[bytes, _Extension]:
    found: dict[bytes, _Extension] = {}
    read = der.read
    for tag, start, end in rest:
        if tag != der.CONTEXT_3:
            continue  # issuer/subject unique IDs
        seq_tag, offset, seq_end = read(data, start, end)
        if seq_tag != der.SEQUENCE or seq_end != end:
            raise der.DerError("extensions are not one SEQUENCE")
        while offset < seq_end:
            ext_tag, ext_start, ext_end = read(data, offset, seq_end)
            oid_tag, oid_start, next_start = read(data, ext_start, ext_end)
            if ext_tag != der.SEQUENCE or oid_tag != der.OID:
                raise der.DerError("malformed extension")
            value_tag, value_start, value_end = read(data, next_start, ext_end)
            critical = False
            if value_tag == der.BOOLEAN:
                if data[value_start:value_end] != b"\xff":
                    raise der.DerError("extension critical flag is not DER TRUE")
                critical = True
                value_tag, value_start, value_end = read(data, value_end, ext_end)
            if value_tag != der.OCTET_STRING or value_end != ext_end:
                raise der.DerError("extension value is not one OCTET STRING")
            oid = data[oid_start:next_start]
            if oid in found:
                raise der.DerError(f"extension {oid.hex()} appears twice")
            found[oid] = _Extension(critical, value_start, value_end)
            offset = ext_end
    return found


def _is_ca(data: bytes, ext: _Extension) -> bool:
    tag, start, end = der.read(data, ext.start, ext.end)
    if tag != der.SEQUENCE or end != ext.end:
        raise der.DerError("basicConstraints is not a SEQUENCE")
    for inner_tag, inner_start, inner_end in der.children(data, start, end):
        if inner_tag == der.BOOLEAN:
            return data[inner_start:inner_end] != b"\x00"
    return False


def _first_usage_byte(data: bytes, ext: _Extension) -> int:
    """The keyUsage bits 0-7 (every rule concerns one of them); 0 when none is set."""
    tag, start, end = der.read(data, ext.start, ext.end)
    if tag != der.BIT_STRING or end != ext.end or end == start:
        raise der.DerError("keyUsage is not a BIT STRING")
    return data[start + 1] if end - start > 1 else 0


def _purposes(data: bytes, ext: _Extension) -> set[bytes]:
    tag, start, end = der.read(data, ext.start, ext.end)
    if tag != der.SEQUENCE or end != ext.end:
        raise der.DerError("extendedKeyUsage is not a SEQUENCE")
    return {data[s:e] for t, s, e in der.children(data, start, end) if t == der.OID}


def _uris(data: bytes, ext: _Extension) -> list[str]:
    return _names(data, ext, _URI_NAME)


def _names(data: bytes, ext: _Extension, kind: int) -> list[str]:
    """The SAN's names of one IA5String kind (URI, DNS), in order."""
    tag, start, end = der.read(data, ext.start, ext.end)
    if tag != der.SEQUENCE or end != ext.end:
        raise der.DerError("subjectAltName is not a SEQUENCE")
    names = []
    for name_tag, name_start, name_end in der.children(data, start, end):
        if name_tag == kind:
            try:
                names.append(data[name_start:name_end].decode("ascii"))
            except UnicodeDecodeError:
                raise der.DerError("SAN name is not IA5") from None
    return names


def _not_after(data: bytes, validity: tuple[int, int, int]) -> datetime:
    times = list(der.children(data, validity[1], validity[2]))
    if validity[0] != der.SEQUENCE or len(times) != 2:
        raise der.DerError("validity is not two times")
    tag, start, end = times[1]
    return der.read_time(tag, data[start:end])
