"""SPIFFE trust domains and IDs, parsed strictly by the SPIFFE-ID standard.

``parse`` either returns a valid value or raises ``InvalidSpiffeId``; nothing downstream
checks a SPIFFE ID again. ``str()`` of a parsed value gives back the canonical text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshca.core.errors import InvalidSpiffeId

__all__ = ["MAX_SPIFFE_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "SpiffeId", "TrustDomain"]

SCHEME_PREFIX = "spiffe://"
MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")


def _shown(text: str) -> str:
    """Quote user input in messages without flooding logs."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. ``cluster.local``."""

    name: str

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidSpiffeId("trust domain is empty")
        if len(self.name.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
            raise InvalidSpiffeId(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
        if not _TRUST_DOMAIN_RE.fullmatch(self.name):
            raise InvalidSpiffeId(
                f"trust domain {_shown(self.name)} may contain only lowercase letters, "
                "digits, '.', '-' and '_'"
            )

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or its SPIFFE ID (``spiffe://example.org``)."""
        if text.startswith(SCHEME_PREFIX):
            parsed = SpiffeId.parse(text)
            if parsed.path:
                raise InvalidSpiffeId(f"{_shown(text)} names a workload, not a trust domain")
            return parsed.trust_domain
        return cls(text)

    @property
    def id(self) -> str:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SCHEME_PREFIX + self.name

    def workload_id(self, namespace: str, service_account: str) -> SpiffeId:
        """The Kubernetes workload identity ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        return SpiffeId(self, f"/ns/{namespace}/sa/{service_account}")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path that is empty or starts with ``/``."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if self.path:
            if not self.path.startswith("/"):
                raise InvalidSpiffeId(f"path {_shown(self.path)} must start with '/'")
            for segment in self.path[1:].split("/"):
                _check_segment(segment, self.path)
        if len(str(self).encode()) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]``; raise ``InvalidSpiffeId`` otherwise."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId(f"{_shown(text)} does not start with 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        for bad, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
            if bad in rest:
                raise InvalidSpiffeId(f"{_shown(text)} contains {what}")
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            raise InvalidSpiffeId(f"{_shown(text)} contains userinfo")
        if ":" in authority:
            raise InvalidSpiffeId(f"{_shown(text)} contains a port")
        return cls(TrustDomain(authority), slash + path)

    @property
    def is_workload(self) -> bool:
        """True when the ID has a non-root path, as every leaf SVID must."""
        return bool(self.path)

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path


def _check_segment(segment: str, path: str) -> None:
    if segment == "":
        raise InvalidSpiffeId(f"path {_shown(path)} has an empty segment or a trailing '/'")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"path {_shown(path)} has a '.' or '..' segment")
    if not _SEGMENT_RE.fullmatch(segment):
        raise InvalidSpiffeId(
            f"path segment {_shown(segment)} may contain only letters, digits, '.', '-' and '_'"
        )
