"""The audit use cases: who may read the record, what they can ask, and log upkeep.

Every call first checks the caller (``AuditAccess``): a bearer token must equal the
configured audit token, and otherwise the caller's verified client SVID must name one of
the configured auditors. The record is read-only here; the only writes are the signed
tree heads and retention, both driven by ``LogMaintenance``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from meshca.core.audit import AuditPage, AuditQuery, LogEntry, Outcome
from meshca.core.denylist import DenyList
from meshca.core.errors import AuthenticationFailed, InvalidRequest, NotAuthorized
from meshca.core.log import ConsistencyProof, InclusionProof, LogState, SignedTreeHead
from meshca.core.ports import AuditReader, Clock, IssuanceLog
from meshca.service.access import refuse_revoked_svid

__all__ = ["AuditAccess", "AuditCaller", "AuditService", "LogMaintenance"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


async def _to_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


@dataclass(frozen=True, slots=True)
class AuditCaller:
    """What a request proved about its sender: a verified client SPIFFE ID, a token."""

    spiffe_id: str | None = None
    token: str | None = None
    #: The client SVID's serial and key hash, for the deny-list (mTLS callers only).
    serial: str | None = None
    key_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class AuditAccess:
    """Who may use the audit API: these SPIFFE IDs (mTLS) and holders of this token."""

    auditors: frozenset[str] = frozenset()
    token: str | None = None

    def check(self, caller: AuditCaller) -> None:
        """Return if ``caller`` may read the record; raise otherwise.

        ``AuthenticationFailed`` when no credential or a wrong token was presented,
        ``NotAuthorized`` when a verified SVID is not on the auditors list.
        """
        if caller.token is not None:
            if self.token is not None and hmac.compare_digest(
                caller.token.encode(), self.token.encode()
            ):
                return
            raise AuthenticationFailed("the audit token is not valid", reason="audit-token-invalid")
        if caller.spiffe_id is not None:
            if caller.spiffe_id in self.auditors:
                return
            raise NotAuthorized(
                f"{caller.spiffe_id[:200]} is not an auditor", reason="not-an-auditor"
            )
        raise AuthenticationFailed(
            "the audit API needs an auditor's client SVID (mTLS) or the audit bearer token",
            reason="audit-credentials-missing",
        )


class AuditService:
    """Read-only queries over the record, and the verifiable log's heads and proofs."""

    def __init__(
        self,
        *,
        access: AuditAccess,
        reader: AuditReader,
        log: IssuanceLog,
        clock: Clock,
        offload: Offload = _to_thread,
        deny_list: Callable[[], DenyList] | None = None,
    ) -> None:
        self._access = access
        self._deny_list = deny_list
        self._reader = reader
        self._log = log
        self._clock = clock
        self._offload = offload

    def _admit(self, caller: AuditCaller) -> None:
        """Return if ``caller`` may read the record: an auditor, and not revoked."""
        if caller.spiffe_id is not None and self._deny_list is not None:
            refuse_revoked_svid(
                self._deny_list(),
                caller.spiffe_id,
                caller.key_sha256,
                caller.serial,
                self._clock.now(),
            )
        self._access.check(caller)

    async def query(self, caller: AuditCaller, query: AuditQuery) -> AuditPage:
        self._admit(caller)
        page: AuditPage = await self._offload(lambda: self._reader.query(query))
        return page

    async def refusals(self, caller: AuditCaller, query: AuditQuery) -> AuditPage:
        """``query`` limited to refused requests."""
        if query.outcome not in (None, Outcome.REFUSED):
            raise InvalidRequest(f"refusals cannot be filtered by outcome {query.outcome!r}")
        return await self.query(caller, replace(query, outcome=Outcome.REFUSED))

    async def get(
        self, caller: AuditCaller, *, serial: str | None = None, leaf_index: int | None = None
    ) -> LogEntry:
        """The entry for a serial or leaf index; ``InvalidRequest`` if there is none."""
        self._admit(caller)
        if (serial is None) == (leaf_index is None):
            raise InvalidRequest("give a serial or a leaf index")
        entry: LogEntry | None = await self._offload(
            lambda: self._reader.get(serial=serial, leaf_index=leaf_index)
        )
        if entry is None:
            what = f"serial {serial[:100]!r}" if serial is not None else f"leaf {leaf_index}"
            raise InvalidRequest(f"no record for {what}", reason="record-not-found")
        return entry

    async def export(self, caller: AuditCaller, query: AuditQuery) -> AsyncIterator[LogEntry]:
        """Every matching entry, newest first, a page at a time."""
        self._admit(caller)
        cursor = query.cursor
        while True:
            page: AuditPage = await self._offload(
                lambda c=cursor: self._reader.query(replace(query, cursor=c))  # type: ignore[misc]
            )
            for entry in page.entries:
                yield entry
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def leaves(
        self, caller: AuditCaller, start: int, *, batch: int = 1000
    ) -> AsyncIterator[LogEntry]:
        """Every stored entry from leaf ``start`` on, in leaf order (for recomputation)."""
        self._admit(caller)
        position = start
        while True:
            entries: list[LogEntry] = await self._offload(
                lambda p=position: list(self._reader.leaves(p, batch))  # type: ignore[misc]
            )
            for entry in entries:
                yield entry
            if len(entries) < batch:
                return
            position = entries[-1].leaf_index + 1

    async def state(self, caller: AuditCaller) -> LogState:
        self._admit(caller)
        state: LogState = await self._offload(self._log.state)
        return state

    async def signed_tree_head(self, caller: AuditCaller, *, fresh: bool = False) -> SignedTreeHead:
        """The latest signed head; with ``fresh``, a head signed now over every leaf."""
        self._admit(caller)
        if not fresh:
            latest: SignedTreeHead | None = await self._offload(self._log.latest_head)
            if latest is not None:
                return latest
        now = self._clock.now()
        signed: SignedTreeHead = await self._offload(lambda: self._log.sign_head(now))
        return signed

    async def inclusion_proof(
        self,
        caller: AuditCaller,
        *,
        serial: str | None = None,
        leaf_index: int | None = None,
        tree_size: int = 0,
    ) -> tuple[LogEntry, InclusionProof, SignedTreeHead | None]:
        """The entry, its proof in the tree of ``tree_size`` leaves (0: the latest signed
        head, returned too; a fresh one if none was signed yet)."""
        entry = await self.get(caller, serial=serial, leaf_index=leaf_index)
        head = None
        if tree_size == 0:
            head = await self.signed_tree_head(caller)
            if head.head.size <= entry.leaf_index:
                head = await self.signed_tree_head(caller, fresh=True)
            tree_size = head.head.size
        proof: InclusionProof = await self._offload(
            lambda: self._log.inclusion_proof(entry.leaf_index, tree_size)
        )
        return entry, proof, head

    async def consistency_proof(
        self, caller: AuditCaller, old_size: int, new_size: int
    ) -> ConsistencyProof:
        self._admit(caller)
        proof: ConsistencyProof = await self._offload(
            lambda: self._log.consistency_proof(old_size, new_size)
        )
        return proof


class LogMaintenance:
    """Signs a tree head whenever the log grew, every ``interval``; prunes by ``retention``.

    Runs only while ``is_leader()`` (``meshca serve``: the process that holds the leader
    lock, one per database); were there ever two leaders, that would be harmless: a few
    more heads, signed with the same shared key.
    """

    def __init__(
        self,
        *,
        log: IssuanceLog,
        clock: Clock,
        interval: timedelta,
        retention: timedelta | None,
        is_leader: Callable[[], bool] = lambda: True,
        offload: Offload = _to_thread,
    ) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._retention = retention
        self._is_leader = is_leader
        self._offload = offload

    async def tick(self) -> SignedTreeHead | None:
        """Prune if due, then sign a head if the log grew since the last one."""
        if self._retention is not None:
            cutoff = self._clock.now() - self._retention
            await self._offload(lambda: self._log.prune(cutoff))
        latest: SignedTreeHead | None = await self._offload(self._log.latest_head)
        state: LogState = await self._offload(self._log.state)
        if latest is not None and latest.head.size == state.tree_size:
            return None
        now = self._clock.now()
        signed: SignedTreeHead = await self._offload(lambda: self._log.sign_head(now))
        return signed

    async def run(self, stopping: asyncio.Event) -> None:
        """``tick`` every interval until ``stopping`` is set; failures are logged."""
        while not stopping.is_set():
            if await self._offload(self._is_leader):
                try:
                    signed = await self.tick()
                    if signed is not None:
                        log.info("signed tree head: size %d", signed.head.size)
                except Exception:
                    log.exception("log maintenance failed; retrying in %s", self._interval)
            try:
                await asyncio.wait_for(stopping.wait(), self._interval.total_seconds())
            except TimeoutError:
                pass
