"""The JWT-SVID use case: attest -> check the request -> sign -> record -> release.

Every request, issued or refused, leaves one ``AuditRecord`` in the same log as the
certificates. A JWT-SVID is returned only after its record is committed. The record
never holds the token: ``serial`` is its ``jti``, ``fingerprint_sha256`` the SHA-256 of
the compact token (so a token found later can be matched to its record), ``not_before``
and ``not_after`` its ``iat`` and ``exp``, and ``detail`` its audiences as
``aud=<JSON list>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import jwt

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.denylist import DenyList
from meshca.core.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidSpiffeId,
    MeshcaError,
    NotAuthorized,
)
from meshca.core.identity import KubernetesIdentity, spiffe_id_for
from meshca.core.jwt_svid import algorithm_for, check_audiences, jwt_lifetime, jwt_svid_claims
from meshca.core.ports import Attestor, AuditLog, Clock, OutcomeObserver
from meshca.core.spiffe import SpiffeId, TrustDomain
from meshca.service.authority import JwtSigner
from meshca.service.ca import attest_bearer, identity_fields
from meshca.service.outcomes import observe, record_refusal

__all__ = ["JwtSvidRequest", "JwtSvidService", "SignedJwtSvid", "audiences_detail"]

log = logging.getLogger(__name__)

#: Longest ``spiffe_id`` a request may name (the SPIFFE limit).
_MAX_SPIFFE_ID = 2048


@dataclass(frozen=True, slots=True)
class JwtSvidRequest:
    """One JWT-SVID request, whichever door it came through.

    ``spiffe_id``, when given, must be the caller's own (the one its token attests).
    """

    token: str | None
    audiences: tuple[str, ...]
    spiffe_id: str | None
    requested_ttl: timedelta | None
    api: str
    peer: str | None = None
    token_problem: AuthenticationFailed | None = None


@dataclass(frozen=True, slots=True)
class SignedJwtSvid:
    """A signed JWT-SVID (compact JWS) and what it says."""

    token: str
    spiffe_id: SpiffeId
    audiences: tuple[str, ...]
    jti: str
    kid: str
    issued_at: datetime
    expires_at: datetime


def audiences_detail(audiences: tuple[str, ...]) -> str:
    """How an issued JWT-SVID's audiences appear in its record's ``detail``."""
    return "aud=" + json.dumps(list(audiences), ensure_ascii=False)


class JwtSvidService:
    """Signs JWT-SVIDs for callers that prove a Kubernetes service account identity."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        attestor: Attestor,
        audit_log: AuditLog,
        signer: Callable[[], JwtSigner],
        clock: Clock,
        max_ttl: timedelta,
        new_jti: Callable[[], str],
        issuer: str | None = None,
        offload: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        on_outcome: OutcomeObserver | None = None,
        deny_list: Callable[[], DenyList] | None = None,
    ) -> None:
        """``deny_list``: the entries that refuse certificates refuse JWT-SVIDs too."""
        self._trust_domain = trust_domain
        self._attestor = attestor
        self._audit = audit_log
        self._signer = signer
        self._clock = clock
        self._max_ttl = max_ttl
        self._new_jti = new_jti
        self._issuer = issuer
        # Where signing runs when it may block (a Vault Transit key); None signs inline.
        self._offload = offload
        self._on_outcome = on_outcome
        self._deny_list = deny_list

    async def record_refusal(self, api: str, peer: str | None, error: MeshcaError) -> None:
        """Record a refusal decided before the request reached this service (a per-API
        cap at the door): no identity is known, and the caller gets ``error``."""
        request = JwtSvidRequest(
            token=None, audiences=(), spiffe_id=None, requested_ttl=None, api=api, peer=peer
        )
        await self._record_refusal(request, self._clock.now(), None, None, error)

    async def sign(self, request: JwtSvidRequest) -> SignedJwtSvid:
        now = self._clock.now()
        identity: KubernetesIdentity | None = None
        spiffe_id: SpiffeId | None = None
        audiences: tuple[str, ...] = ()
        try:
            identity = await attest_bearer(self._attestor, request.token, request.token_problem)
            spiffe_id = spiffe_id_for(identity, self._trust_domain)
            _check_asked_id(request.spiffe_id, spiffe_id)
            self._refuse_if_denied(spiffe_id, now)
            audiences = check_audiences(request.audiences)
            signer = self._signer()
            issued_at, expires = jwt_lifetime(
                now, request.requested_ttl, self._max_ttl, signer.not_after
            )
            claims = jwt_svid_claims(
                spiffe_id=str(spiffe_id),
                audiences=audiences,
                issued_at=issued_at,
                expires=expires,
                jti=self._new_jti(),
                issuer=self._issuer,
            )
            if self._offload is None:
                token = _encode(claims, signer)
            else:
                token = await self._offload(lambda: _encode(claims, signer))
        except MeshcaError as error:
            await self._record_refusal(request, now, identity, spiffe_id, error)
            raise
        except Exception as error:
            log.exception("unexpected failure while signing a JWT-SVID for %s", spiffe_id)
            internal = InternalError("internal error while signing the JWT-SVID")
            await self._record_refusal(request, now, identity, spiffe_id, internal)
            raise internal from error

        record = AuditRecord(
            time=now,
            outcome=Outcome.ISSUED,
            api=request.api,
            reason="ok",
            detail=audiences_detail(audiences),
            spiffe_id=str(spiffe_id),
            serial=claims["jti"],
            fingerprint_sha256=hashlib.sha256(token.encode()).hexdigest(),
            not_before=issued_at,
            not_after=expires,
            peer=request.peer,
            **identity_fields(identity),
        )
        try:
            await self._audit.append(record)
        except MeshcaError as error:
            log.error("JWT-SVID record not committed; withholding token %s", record.serial)
            self._observe(
                replace(
                    record,
                    outcome=Outcome.REFUSED,
                    reason=error.reason,
                    detail=error.message[:1000],
                    serial=None,
                    fingerprint_sha256=None,
                    not_before=None,
                    not_after=None,
                ),
                now,
            )
            raise
        self._observe(record, now)
        return SignedJwtSvid(
            token=token,
            spiffe_id=spiffe_id,
            audiences=audiences,
            jti=claims["jti"],
            kid=signer.kid,
            issued_at=issued_at,
            expires_at=expires,
        )

    def _refuse_if_denied(self, spiffe_id: SpiffeId, now: datetime) -> None:
        """Raise ``Revoked`` when a deny-list entry names the identity (by ID or prefix)."""
        denied = None if self._deny_list is None else self._deny_list()
        if denied is None or denied.empty:
            return
        denied.refuse(spiffe_id, None, None, now, what="issuance")

    async def _record_refusal(
        self,
        request: JwtSvidRequest,
        now: datetime,
        identity: KubernetesIdentity | None,
        spiffe_id: SpiffeId | None,
        error: MeshcaError,
    ) -> None:
        record = AuditRecord(
            time=now,
            outcome=Outcome.REFUSED,
            api=request.api,
            reason=error.reason,
            detail=error.message[:1000],
            spiffe_id=str(spiffe_id) if spiffe_id else None,
            peer=request.peer,
            **identity_fields(identity),
        )
        await record_refusal(self._audit, record)
        self._observe(record, now)

    def _observe(self, record: AuditRecord, started: datetime) -> None:
        observe(self._on_outcome, record, self._clock.now() - started)


def _check_asked_id(asked: str | None, attested: SpiffeId) -> None:
    """A caller may name its own SPIFFE ID, never another one."""
    if not asked:
        return
    if len(asked) > _MAX_SPIFFE_ID:
        raise InvalidSpiffeId(f"the SPIFFE ID asked for is {len(asked)} bytes; the limit is 2048")
    parsed = SpiffeId.parse(asked)
    if parsed != attested:
        raise NotAuthorized(
            f"the token proves {attested}, not {asked[:256]}", reason="jwt-spiffe-id-mismatch"
        )


def _encode(claims: dict[str, Any], signer: JwtSigner) -> str:
    return jwt.encode(
        claims,
        signer.signer,
        algorithm=algorithm_for(signer.signer),
        headers={"kid": signer.kid, "typ": "JWT"},
    )
