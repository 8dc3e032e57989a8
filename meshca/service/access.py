"""Caller checks for the policy APIs, from the table in ``meshca.core.callers``.

``CallerGuard.admit(method, caller)`` looks up the method's row and runs its check:
ext_authz callers must present a verified client SVID matching ``--policy-caller``;
PolicyService callers need a ``--policy-admin`` SVID or the ``--policy-token-file``
token (compared in constant time). A refusal raises ``AuthenticationFailed`` (no or a
bad credential) or ``NotAuthorized`` (a verified SVID that is not allowed), after it is
recorded like a refused signing request: an ``AuditRecord`` in the issuance record
(outcome ``refused``, the method's API, a reason) and the outcome observers (the log
line, metrics). Refusal messages name what is missing, never the policy set.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.callers import Access, SpiffePatterns, row_for
from meshca.core.denylist import DenyList
from meshca.core.errors import (
    AuthenticationFailed,
    InternalError,
    MeshcaError,
    NotAuthorized,
)
from meshca.core.ports import AuditLog, Clock, OutcomeObserver
from meshca.service.outcomes import observe, record_refusal

__all__ = ["Caller", "CallerGuard", "PolicyAccess", "refuse_revoked_svid"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """What a call proved about its sender.

    ``spiffe_id``: the verified client SVID's ID (mTLS), if any; ``token``: a bearer
    token, if any; ``problem``: why the authorization header could not be read (a
    malformed header is refused, never ignored); ``peer``: the address, for the record.
    """

    spiffe_id: str | None = None
    token: str | None = None
    problem: AuthenticationFailed | None = None
    peer: str | None = None
    #: The client SVID's serial and key hash, for the deny-list (mTLS callers only).
    serial: str | None = None
    key_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyAccess:
    """Who may use the policy APIs.

    ``callers``: SPIFFE ID patterns for ext_authz, None to let anyone call it (the main
    port with ``--policy-insecure-main-port``); ``admins``: SPIFFE IDs for
    PolicyService; ``token``: the PolicyService bearer token, if configured.
    """

    callers: SpiffePatterns | None
    admins: frozenset[str] = frozenset()
    token: str | None = None

    def check(self, access: Access, caller: Caller) -> None:
        """Return if ``caller`` may call a method of ``access``; raise otherwise."""
        match access:
            case Access.PUBLIC:
                return
            case Access.POLICY_CALLER:
                self._check_policy_caller(caller)
            case Access.POLICY_ADMIN:
                self._check_admin(caller)
            case _:
                # Other rows are checked by their own services (attestation, AuditAccess).
                raise InternalError(f"the policy guard does not decide {access.value} calls")

    def _check_policy_caller(self, caller: Caller) -> None:
        if self.callers is None:
            return
        if caller.spiffe_id is None:
            raise AuthenticationFailed(
                "ext_authz needs a client SVID (mTLS) on the policy port",
                reason="policy-caller-credentials-missing",
            )
        if not self.callers.test(caller.spiffe_id):
            raise NotAuthorized(
                f"{caller.spiffe_id[:200]} may not ask for authorization decisions",
                reason="not-a-policy-caller",
            )

    def _check_admin(self, caller: Caller) -> None:
        if caller.problem is not None:
            raise AuthenticationFailed(caller.problem.message, reason=caller.problem.reason)
        if caller.token is not None:
            if self.token is not None and hmac.compare_digest(
                caller.token.encode("utf-8", "surrogatepass"), self.token.encode()
            ):
                return
            raise AuthenticationFailed(
                "the policy token is not valid", reason="policy-token-invalid"
            )
        if caller.spiffe_id is not None:
            if caller.spiffe_id in self.admins:
                return
            raise NotAuthorized(
                f"{caller.spiffe_id[:200]} is not a policy admin", reason="not-a-policy-admin"
            )
        raise AuthenticationFailed(
            "the policy API needs a policy admin's client SVID (mTLS) or the policy bearer token",
            reason="policy-credentials-missing",
        )


def refuse_revoked_svid(
    deny_list: DenyList,
    spiffe_id: str | None,
    key_sha256: str | None,
    serial: str | None,
    now: datetime,
) -> None:
    """Raise ``Revoked`` when a client SVID's ID, key or serial is on the deny-list.

    The handshake checked the chain; this is the revocation check mTLS cannot make, so
    a revoked SVID stops opening doors within one deny-list poll, not at its expiry.
    """
    deny_list.refuse(
        spiffe_id, key_sha256, serial, now, what="client certificate", reason="revoked-svid"
    )


class CallerGuard:
    """Checks each call against its row of the table; records and raises refusals."""

    def __init__(
        self,
        access: PolicyAccess,
        *,
        audit_log: AuditLog,
        clock: Clock,
        on_outcome: OutcomeObserver | None = None,
        deny_list: Callable[[], DenyList] | None = None,
    ) -> None:
        self.access = access
        self._deny_list = deny_list
        self._audit = audit_log
        self._clock = clock
        self._on_outcome = on_outcome

    async def admit(self, method: str, caller: Caller) -> None:
        """Return if ``caller`` may call ``method``; else record the refusal and raise."""
        row = row_for(method)
        try:
            if caller.spiffe_id is not None and self._deny_list is not None:
                refuse_revoked_svid(
                    self._deny_list(),
                    caller.spiffe_id,
                    caller.key_sha256,
                    caller.serial,
                    self._clock.now(),
                )
            self.access.check(row.access, caller)
        except MeshcaError as error:
            await self._record(method, caller, error)
            raise

    async def _record(self, method: str, caller: Caller, error: MeshcaError) -> None:
        now: datetime = self._clock.now()
        record = AuditRecord(
            time=now,
            outcome=Outcome.REFUSED,
            api=method,
            reason=error.reason,
            detail=error.message[:1000],
            spiffe_id=caller.spiffe_id[:2048] if caller.spiffe_id else None,
            peer=caller.peer,
        )
        await record_refusal(self._audit, record)
        observe(self._on_outcome, record, self._clock.now() - now)
