"""The signing use case: attest -> limit -> authorize -> issue -> validate -> record -> release.

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
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.authority import Authority
from meshca.core.csr import CsrRequest, parse_csr
from meshca.core.denylist import DenyList, key_sha256
from meshca.core.errors import (
    AuthenticationFailed,
    InternalError,
    MeshcaError,
    NotAuthorized,
    RateLimited,
    RequestTooLarge,
)
from meshca.core.identity import KubernetesIdentity, spiffe_id_for
from meshca.core.issuance import IssuancePolicy, authorize_csr, issue_leaf_der, leaf_lifetime
from meshca.core.leaf_der import certificate_pem
from meshca.core.linkerd import (
    LinkerdName,
    check_linkerd_csr,
    linkerd_name_for,
    parse_linkerd_name,
    require_der_csr,
)
from meshca.core.ports import Attestor, AuditLog, Clock, IssuanceLimiter, OutcomeObserver
from meshca.core.spiffe import SpiffeId, TrustDomain
from meshca.core.svid_rules import check_leaf_svid
from meshca.service.outcomes import observe, record_refusal

__all__ = [
    "MAX_TOKEN_BYTES",
    "CertificateService",
    "LinkerdDoor",
    "SignRequest",
    "SignedCertificate",
    "attest_bearer",
    "identity_fields",
    "rate_limit_key",
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
    #: Set by Linkerd's door: the identity name asked for. The token is then attested with
    #: Linkerd's audiences, the CSR must be DER naming exactly this name, and the leaf
    #: carries it as a DNS SAN beside the SPIFFE ID.
    linkerd_identity: str | None = None


@dataclass(frozen=True, slots=True)
class LinkerdDoor:
    """How requests through Linkerd's door are attested and named.

    ``attestor`` accepts Linkerd's token audiences only (not the other doors'), and
    ``domain`` is the suffix after ``<sa>.<ns>.serviceaccount.identity.``.
    """

    attestor: Attestor
    domain: str


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


#: What Linkerd's door asks of the request: nothing when it is another door.
_NO_LINKERD: tuple[LinkerdName | None, LinkerdDoor | None] = (None, None)


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
        linkerd: LinkerdDoor | None = None,
        rate_limiter: IssuanceLimiter | None = None,
        deny_list: Callable[[], DenyList] | None = None,
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
        self._linkerd = linkerd
        # ``--issuance-rate``: None (the default) costs one comparison per request.
        self._limiter = rate_limiter
        self._deny_list = deny_list

    async def sign(self, request: SignRequest) -> SignedCertificate:
        now = self._clock.now()
        context = _RefusalContext()
        try:
            requested, door = self._linkerd_request(request)
            identity = await self._attest(request, door)
            context.identity = identity
            spiffe_id = spiffe_id_for(identity, self._trust_domain)
            context.spiffe_id = spiffe_id
            linkerd_name = None if door is None else self._linkerd_name(requested, identity, door)
            if self._limiter is not None:
                # After attestation, so that the key is one the cluster vouched for.
                self._limit(request, identity, now)
            authority = self._authority()
            serial = self._new_serial()
            if self._offload is None:
                issued = self._issue(request, spiffe_id, authority, now, serial, linkerd_name)
            else:
                issued = await self._offload(
                    lambda: self._issue(request, spiffe_id, authority, now, serial, linkerd_name)
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

    def _linkerd_request(
        self, request: SignRequest
    ) -> tuple[LinkerdName | None, LinkerdDoor | None]:
        """The identity a Linkerd request names (checked before any token is looked at)."""
        if request.linkerd_identity is None:
            return _NO_LINKERD
        door = self._linkerd
        if door is None:
            # The servicer is only registered with a door; reaching here is our bug.
            raise InternalError("Linkerd's identity service is not configured")
        return parse_linkerd_name(request.linkerd_identity, door.domain), door

    @staticmethod
    def _linkerd_name(
        requested: LinkerdName | None, identity: KubernetesIdentity, door: LinkerdDoor
    ) -> LinkerdName:
        proven = linkerd_name_for(identity, door.domain)
        if requested != proven:
            raise NotAuthorized(
                f"identity {str(requested)[:300]!r} was asked for but the token proves {proven}",
                reason="linkerd-identity-mismatch",
            )
        return proven

    async def record_refusal(self, api: str, peer: str | None, error: MeshcaError) -> None:
        """Record a refusal decided before the request reached this service (a per-API
        cap at the door): no identity is known, and the caller gets ``error``."""
        request = SignRequest(token=None, csr=b"", requested_ttl=None, api=api, peer=peer)
        await self._record_refusal(request, self._clock.now(), _RefusalContext(), error)

    async def _attest(
        self, request: SignRequest, door: LinkerdDoor | None = None
    ) -> KubernetesIdentity:
        attestor = self._attestor if door is None else door.attestor
        return await attest_bearer(attestor, request.token, request.token_problem)

    def _limit(self, request: SignRequest, identity: KubernetesIdentity, now: datetime) -> None:
        assert self._limiter is not None
        key = rate_limit_key(identity, request.token or "")
        wait = self._limiter.admit(key, now)
        if wait is None:
            return
        # A pod UID is 36 characters; a token's claim could be longer, and is not echoed.
        pod = identity.pod_uid
        who = f"pod {pod[:80]}" if pod else "this token (bound to no pod)"
        raise RateLimited(
            f"issuance rate limit: {who} may get {self._limiter.rate} certificates; "
            f"retry in {max(wait.total_seconds(), 0.001):.3g}s",
            retry_after=wait,
        )

    def _issue(
        self,
        request: SignRequest,
        spiffe_id: SpiffeId,
        authority: Authority,
        now: datetime,
        serial: int,
        linkerd_name: LinkerdName | None = None,
    ) -> _Issued:
        if linkerd_name is not None:
            require_der_csr(request.csr)
        csr = parse_csr(request.csr)
        dns_names: tuple[str, ...] = ()
        if linkerd_name is not None:
            check_linkerd_csr(csr, linkerd_name)
            dns_names = (str(linkerd_name),)
        authorize_csr(csr, spiffe_id)
        self._refuse_if_denied(spiffe_id, csr, now)
        not_before, not_after = leaf_lifetime(now, request.requested_ttl, self._policy, authority)
        # The certificate holds whole seconds; the record says what the certificate says.
        not_before, not_after = not_before.replace(microsecond=0), not_after.replace(microsecond=0)
        leaf_der = issue_leaf_der(
            csr, spiffe_id, authority, not_before, not_after, serial, dns_names
        )
        check_leaf_svid(leaf_der, spiffe_id, authority, dns_names)
        return _Issued(csr, leaf_der, not_before, not_after)

    def _refuse_if_denied(self, spiffe_id: SpiffeId, csr: CsrRequest, now: datetime) -> None:
        """Raise ``Revoked`` when a deny-list entry names the identity or the CSR's key.

        The caller learns the entry's id and nothing more; the key is hashed only when
        some entry names a key.
        """
        denied = None if self._deny_list is None else self._deny_list()
        if denied is None or denied.empty:
            return
        key = None
        if denied.has_keys:
            spki = csr.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            key = key_sha256(spki)
        denied.refuse(spiffe_id, key, None, now, what="issuance")

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
        await record_refusal(self._audit, record)
        self._observe(record, now)

    def _observe(self, record: AuditRecord, started: datetime) -> None:
        observe(self._on_outcome, record, self._clock.now() - started)


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


def rate_limit_key(identity: KubernetesIdentity, token: str) -> str:
    """Whom ``--issuance-rate`` counts: the pod the token is bound to, else the token.

    Never the SPIFFE ID: a Deployment's pods share one service account and start
    together. A token bound to no pod is counted as itself (by digest; the token is not
    kept), so a leaked one is limited however many connections replay it.
    """
    if identity.pod_uid:
        return "pod:" + identity.pod_uid
    return "token:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


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
