"""Linkerd's identity names and the checks its ``Certify`` door adds to issuance.

A Linkerd proxy is named ``<sa>.<ns>.serviceaccount.identity.<domain>``, where
``<domain>`` is ``<linkerd-ns>.<trust-domain>`` (``linkerd.cluster.local`` by default).
A namespace is one DNS label and the marker ``serviceaccount.identity`` is fixed, so with
the domain known a name splits in exactly one way, even when the service account has
dots in it.

``parse_linkerd_name`` either returns a ``LinkerdName`` or raises
``InvalidLinkerdIdentity``; ``check_linkerd_csr`` raises ``InvalidRequest`` for a CSR
that is not what a Linkerd proxy sends and ``NotAuthorized`` for one naming someone else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshca.core.csr import CsrRequest
from meshca.core.errors import InvalidRequest, MalformedCsr, NotAuthorized
from meshca.core.identity import KubernetesIdentity, is_namespace, is_service_account

__all__ = [
    "MARKER",
    "MAX_NAME_BYTES",
    "InvalidLinkerdIdentity",
    "LinkerdName",
    "check_linkerd_csr",
    "check_linkerd_domain",
    "linkerd_name_for",
    "parse_linkerd_name",
    "require_der_csr",
]

MARKER = "serviceaccount.identity"
#: A service account (253) and namespace (63) under a long domain: room for any real name,
#: and a bound on what a caller can make us read.
MAX_NAME_BYTES = 1024

# Lowercase DNS labels separated by dots: what Linkerd's trust domains and namespaces are.
_DOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*"
)


class InvalidLinkerdIdentity(InvalidRequest):
    reason = "linkerd-identity-malformed"


@dataclass(frozen=True, slots=True)
class LinkerdName:
    """A Linkerd proxy identity; ``str()`` is the DNS-like name and round-trips ``parse``."""

    service_account: str
    namespace: str
    domain: str

    def __str__(self) -> str:
        return f"{self.service_account}.{self.namespace}.{MARKER}.{self.domain}"


def check_linkerd_domain(domain: str) -> str:
    """``domain`` if it is lowercase dot-separated DNS labels; ``ValueError`` otherwise."""
    if not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(
            f"{domain[:80]!r} is not a lowercase DNS name (example: linkerd.cluster.local)"
        )
    return domain


def linkerd_name_for(identity: KubernetesIdentity, domain: str) -> LinkerdName:
    """The name Linkerd gives the service account ``identity`` proves (names already valid)."""
    return LinkerdName(identity.service_account, identity.namespace, domain)


def parse_linkerd_name(text: str, domain: str) -> LinkerdName:
    """Split ``<sa>.<ns>.serviceaccount.identity.<domain>``; raise if it is not one."""
    shown = repr(text[:200])
    if not text:
        raise InvalidLinkerdIdentity("no identity: CertifyRequest.identity is empty")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidLinkerdIdentity(
            f"identity is {len(text)} characters; the limit is {MAX_NAME_BYTES}"
        )
    suffix = f".{MARKER}.{domain}"
    if not text.endswith(suffix):
        raise InvalidLinkerdIdentity(
            f"identity {shown} is not a name under this CA's Linkerd domain; expected "
            f"<service-account>.<namespace>{suffix}"
        )
    service_account, _, namespace = text[: -len(suffix)].rpartition(".")
    if not is_namespace(namespace) or not is_service_account(service_account):
        raise InvalidLinkerdIdentity(
            f"identity {shown} does not name a valid namespace and service account; "
            f"expected <service-account>.<namespace>{suffix}"
        )
    return LinkerdName(service_account, namespace, domain)


def require_der_csr(data: bytes) -> None:
    """Linkerd's CSR is DER; PEM (what every other door takes) is refused here."""
    if data.lstrip().startswith(b"-----BEGIN"):
        raise MalformedCsr(
            "Linkerd's certificate_signing_request is DER; this one is PEM",
            reason="csr-not-der",
        )


def check_linkerd_csr(csr: CsrRequest, name: LinkerdName) -> None:
    """The CSR must name exactly ``name``, as its one DNS SAN, and nothing else.

    A URI, IP, e-mail or second DNS name is a malformed Linkerd request (``InvalidRequest``);
    one DNS name that is not ``name`` asks for another identity (``NotAuthorized``).
    """
    wanted = str(name)
    if csr.uri_sans:
        raise InvalidRequest(
            f"a Linkerd CSR names no URI (the SPIFFE ID is ours to add); this one names "
            f"{csr.uri_sans[0][:200]!r}",
            reason="csr-unexpected-san",
        )
    if csr.other_sans:
        raise InvalidRequest(
            f"a Linkerd CSR names only its DNS identity; this one has {', '.join(csr.other_sans)}"
            " names",
            reason="csr-unexpected-san",
        )
    if len(csr.dns_sans) != 1:
        raise InvalidRequest(
            f"a Linkerd CSR has exactly one DNS name ({wanted}); this one has {len(csr.dns_sans)}",
            reason="csr-dns-names",
        )
    if csr.dns_sans[0] != wanted:
        raise NotAuthorized(
            f"CSR names {csr.dns_sans[0][:200]!r} but the identity asked for is {wanted}",
            reason="linkerd-identity-mismatch",
        )
