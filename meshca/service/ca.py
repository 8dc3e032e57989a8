"""The signing use case: attest -> authorize -> issue -> validate -> record -> release.

Every request, issued or refused, leaves one ``AuditRecord``. A certificate is returned
only after its record is durably committed; if the record cannot be written, the caller
gets ``BackendUnavailable`` and no certificate.

Leaves are made as DER from the issuer's template and checked by ``svid_rules`` on those
very bytes; nothing on this path builds an ``x509.Certificate`` object.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.authority import Authority
from meshca.core.csr import CsrRequest, parse_csr
from meshca.core.errors import (
    AuthenticationFailed,
    InternalError,
    MeshcaError,
    RequestTooLarge,
)
from meshca.core.identity import KubernetesIdentity, spiffe_id_for
from meshca.core.issuance import IssuancePolicy, authorize_csr, issue_leaf_der, leaf_lifetime
from meshca.core.leaf_der import certificate_pem
from meshca.core.ports import Attestor, AuditLog, Clock, OutcomeObserver
from meshca.core.spiffe import SpiffeId, TrustDomain
from meshca.core.svid_rules import check_leaf_svid

__all__ = [
    "MAX_TOKEN_BYTES",
    "CertificateService",
    "SignRequest",
    "SignedCertificate",
    "attest_bearer",
    "identity_fields",
]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class SignRequest:
    """One signing request, whichever API it came through."""

    token: str | None
    csr: bytes
    requested_ttl: timedelta | None
    api: str
    peer: str | None = None
    #: Why the credential the caller sent could not be read (a malformed header): the
    #: request is then refused and recorded like any other bad token.
    token_problem: AuthenticationFailed | None = None


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    """A leaf (DER) with the chain to present after it and the roots to verify it against."""

    leaf_der: bytes
    serial: int
    not_before: datetime
    not_after: datetime
    spiffe_id: SpiffeId
    authority: Authority

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.leaf_der)

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        return (self.authority.certificate, *self.authority.chain)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self.authority.roots

    def leaf_pem(self) -> str:
        return certificate_pem(self.leaf_der)


@dataclass(frozen=True, slots=True)
class _Issued:
    csr: CsrRequest
    leaf_der: bytes
    not_before: datetime
    not_after: datetime


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


class CertificateService:
    """Issues X509-SVIDs to callers that prove a Kubernetes service account identity."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        attestor: Attestor,
        audit_log: AuditLog,
        authority: Callable[[], Authority],
        clock: Clock,
        policy: IssuancePolicy,
        new_serial: Callable[[], int],
        offload: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        on_outcome: OutcomeObserver | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        self._attestor = attestor
        self._audit = audit_log
        self._authority = authority
        self._clock = clock
        self._policy = policy
        self._new_serial = new_serial
        # Where signing runs when it may block (a remote key, as Vault's Transit); None
        # signs in the caller, as a local key takes microseconds and a worker owns a core.
        self._offload = offload
        self._on_outcome = on_outcome

    async def sign(self, request: SignRequest) -> SignedCertificate:
        now = self._clock.now()
        context = _RefusalContext()
        try:
            identity = await self._attest(request)
            context.identity = identity
            spiffe_id = spiffe_id_for(identity, self._trust_domain)
            context.spiffe_id = spiffe_id
            authority = self._authority()
            serial = self._new_serial()
            if self._offload is None:
                issued = self._issue(request, spiffe_id, authority, now, serial)
            else:
                issued = await self._offload(
                    lambda: self._issue(request, spiffe_id, authority, now, serial)
                )
        except MeshcaError as error:
            await self._record_refusal(request, now, context, error)
            raise
        except Exception as error:
            log.exception("unexpected failure while issuing for %s", context.spiffe_id)
            internal = InternalError("internal error while issuing the certificate")
            await self._record_refusal(request, now, context, internal)
            raise internal from error

        record = AuditRecord(
            time=now,
            outcome=Outcome.ISSUED,
            api=request.api,
            reason="ok",
            spiffe_id=str(spiffe_id),
            serial=serial_hex(serial),
            fingerprint_sha256=hashlib.sha256(issued.leaf_der).hexdigest(),
            not_before=issued.not_before,
            not_after=issued.not_after,
            peer=request.peer,
            csr_sha256=issued.csr.sha256,
            **identity_fields(identity),
        )
        try:
            await self._audit.append(record)
        except MeshcaError as error:
            # The record is the certificate's licence to leave: without it, nothing leaves.
            log.error("issuance record not committed; withholding certificate %s", record.serial)
            self._observe(_withheld(record, error), now)
            raise
        self._observe(record, now)
        return SignedCertificate(
            leaf_der=issued.leaf_der,
            serial=serial,
            not_before=issued.not_before,
            not_after=issued.not_after,
            spiffe_id=spiffe_id,
            authority=authority,
        )

    async def _attest(self, request: SignRequest) -> KubernetesIdentity:
        return await attest_bearer(self._attestor, request.token, request.token_problem)

    def _issue(
        self,
        request: SignRequest,
        spiffe_id: SpiffeId,
        authority: Authority,
        now: datetime,
        serial: int,
    ) -> _Issued:
        csr = parse_csr(request.csr)
        authorize_csr(csr, spiffe_id)
        not_before, not_after = leaf_lifetime(now, request.requested_ttl, self._policy, authority)
        # The certificate holds whole seconds; the record says what the certificate says.
        not_before, not_after = not_before.replace(microsecond=0), not_after.replace(microsecond=0)
        leaf_der = issue_leaf_der(csr, spiffe_id, authority, not_before, not_after, serial)
        check_leaf_svid(leaf_der, spiffe_id, authority)
        return _Issued(csr, leaf_der, not_before, not_after)

    async def _record_refusal(
        self, request: SignRequest, now: datetime, context: _RefusalContext, error: MeshcaError
    ) -> None:
        record = AuditRecord(
            time=now,
            outcome=Outcome.REFUSED,
            api=request.api,
            reason=error.reason,
            detail=error.message[:1000],
            spiffe_id=str(context.spiffe_id) if context.spiffe_id else None,
            peer=request.peer,
            **identity_fields(context.identity),
        )
        try:
            await self._audit.append(record)
        except MeshcaError:
            # The caller already gets a refusal; losing its record is logged loudly.
            log.error("refusal record not committed: %s %s", record.reason, record.spiffe_id)
        except Exception:
            log.exception("refusal record not committed")
        self._observe(record, now)

    def _observe(self, record: AuditRecord, started: datetime) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(record, self._clock.now() - started)
        except Exception:
            log.exception("an outcome observer failed")


async def attest_bearer(
    attestor: Attestor, token: str | None, token_problem: AuthenticationFailed | None
) -> KubernetesIdentity:
    """Who the bearer token proves the caller is; the same checks on every door."""
    if token_problem is not None:
        raise token_problem
    if not token:
        raise AuthenticationFailed(
            "no bearer token: send 'authorization: Bearer <service-account token>'",
            reason="token-missing",
        )
    if len(token) > MAX_TOKEN_BYTES:
        raise RequestTooLarge(
            f"token is {len(token)} bytes; the limit is {MAX_TOKEN_BYTES}",
            reason="token-too-large",
        )
    return await attestor.attest(token)


def _withheld(issued: AuditRecord, error: MeshcaError) -> AuditRecord:
    """The refusal the caller saw when ``issued``'s record could not be committed."""
    return replace(
        issued,
        outcome=Outcome.REFUSED,
        reason=error.reason,
        detail=error.message[:1000],
        serial=None,
        fingerprint_sha256=None,
        not_before=None,
        not_after=None,
    )


class _RefusalContext:
    """What was learned about a caller before its request was refused."""

    __slots__ = ("identity", "spiffe_id")

    def __init__(self) -> None:
        self.identity: KubernetesIdentity | None = None
        self.spiffe_id: SpiffeId | None = None


def identity_fields(identity: KubernetesIdentity | None) -> dict[str, Any]:
    if identity is None:
        return {}
    return {
        "namespace": identity.namespace,
        "service_account": identity.service_account,
        "pod_name": identity.pod_name,
        "pod_uid": identity.pod_uid,
        "node_name": identity.node_name,
    }
