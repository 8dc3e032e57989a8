"""The narrow interfaces the services depend on; adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from meshca.core.audit import AuditRecord
from meshca.core.identity import KubernetesIdentity

__all__ = ["Attestor", "AuditLog", "Clock"]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class Attestor(Protocol):
    """Proves who presented a token."""

    async def attest(self, token: str) -> KubernetesIdentity:
        """Return the identity the token proves.

        Raises ``AuthenticationFailed`` for any problem with the token itself and
        ``BackendUnavailable`` when the party that must vouch for it cannot be reached.
        """
        ...


class AuditLog(Protocol):
    """The issuance record."""

    async def append(self, record: AuditRecord) -> None:
        """Return only once ``record`` is durably committed.

        Raises ``BackendUnavailable`` if it cannot be; the caller then must not release
        the certificate the record describes.
        """
        ...

    async def list(
        self,
        *,
        limit: int = 50,
        spiffe_id: str | None = None,
        serial: str | None = None,
    ) -> Sequence[AuditRecord]:
        """The newest records first, filtered by exact SPIFFE ID and serial."""
        ...
