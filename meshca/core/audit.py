"""The issuance record: one row per certificate issued and per request refused."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

__all__ = ["AuditRecord", "Outcome"]


class Outcome(enum.StrEnum):
    ISSUED = "issued"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened to one signing request. Never holds a token or key material.

    ``reason`` is a short machine-readable code (``ok`` for issued certificates, the
    error's reason otherwise); ``detail`` is the human-readable message the caller saw.
    """

    time: datetime
    outcome: Outcome
    api: str
    reason: str
    detail: str = ""
    spiffe_id: str | None = None
    serial: str | None = None
    fingerprint_sha256: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    namespace: str | None = None
    service_account: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    peer: str | None = None
    csr_sha256: str | None = None
