"""The narrow interfaces the services depend on; adapters implement them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509

from meshca.core.audit import AuditPage, AuditQuery, AuditRecord, LogEntry
from meshca.core.authority import SignerKey
from meshca.core.denylist import DenyList
from meshca.core.identity import KubernetesIdentity
from meshca.core.log import (
    ConsistencyProof,
    InclusionProof,
    LogState,
    SignedTreeHead,
)
from meshca.core.rate_limit import IssuanceRate
from meshca.core.rotation import AuthorityEntry, AuthoritySet, Transition

__all__ = [
    "Attestor",
    "AuditLog",
    "AuditReader",
    "AuthorityJournal",
    "Clock",
    "DenyListSource",
    "IssuanceLimiter",
    "IssuanceLog",
    "KeyImporter",
    "KeyInventory",
    "KeyListing",
    "KeyManager",
    "OutcomeObserver",
    "RecordWriterStatus",
    "SignedIntermediate",
    "TaintJournal",
    "UpstreamAuthority",
    "UpstreamRoot",
]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class OutcomeObserver(Protocol):
    """Hears how each signing request ended, for metrics and logs; must not raise.

    Called once per request with its record (an issued record only once committed; a
    refusal whether or not its record could be committed) and the time it took.
    """

    def __call__(self, record: AuditRecord, duration: timedelta) -> None: ...


class Attestor(Protocol):
    """Proves who presented a token."""

    async def attest(self, token: str) -> KubernetesIdentity:
        """Return the identity the token proves.

        Raises ``AuthenticationFailed`` for any problem with the token itself and
        ``BackendUnavailable`` when the party that must vouch for it cannot be reached.
        """
        ...


class IssuanceLimiter(Protocol):
    """Counts issuances per caller key (``--issuance-rate``); see ``core.rate_limit``."""

    @property
    def rate(self) -> IssuanceRate: ...

    def admit(self, key: str, now: datetime) -> timedelta | None:
        """Take one for ``key``: None if admitted, else how long until one is free.

        A refusal must leave ``key``'s count as it was. Must not block for long: it
        runs on the event loop, once per attested request.
        """
        ...


class AuditLog(Protocol):
    """The issuance record, as the signing service writes it (reading is the auditors')."""

    async def append(self, record: AuditRecord) -> None:
        """Return only once ``record`` is durably committed.

        Raises ``BackendUnavailable`` if it cannot be; the caller then must not release
        the certificate the record describes.
        """
        ...


class RecordWriterStatus(Protocol):
    """What an ``AuditLog`` knows of its own writing, for the readiness probe.

    Both are read-only and cheap, safe to read from the event loop.
    """

    @property
    def write_failures(self) -> int:
        """How many records were not committed (their appends raised) since it was made."""
        ...

    @property
    def writer_problem(self) -> str | None:
        """Why no record can be written at all now (writer gone or closed); else None."""
        ...


class AuthorityJournal(Protocol):
    """The CA's journal of its roots and intermediates and their lifecycle states.

    Blocking: callers run it off the event loop.
    """

    def load(self) -> AuthoritySet:
        """Every entry, in any state. Raises ``BackendUnavailable`` if storage is down."""
        ...

    def record(
        self, inserts: Sequence[AuthorityEntry], moves: Sequence[Transition], at: datetime
    ) -> None:
        """Insert ``inserts`` and apply ``moves`` (stamped ``at``) in one transaction.

        All or nothing: raises ``JournalConflict`` if an entry is not in the move's
        ``from_state`` or an inserted id exists, ``BackendUnavailable`` if storage is down.
        """
        ...


class KeyManager(Protocol):
    """Private keys of meshca's own authorities. Keys never leave it: it hands out signers."""

    def create(self, label: str) -> tuple[str, SignerKey]:
        """A new key, durably stored before this returns: its reference and a signer."""
        ...

    def load(self, key_ref: str) -> SignerKey:
        """The signer for ``key_ref``; raises ``BackendUnavailable`` if it cannot be had."""
        ...

    def delete(self, key_ref: str) -> None:
        """Destroy the key; a key that is already gone is not an error."""
        ...


@runtime_checkable
class KeyInventory(Protocol):
    """Optional: lists stored keys, so keys no journal entry names can be cleaned up."""

    def key_refs(self) -> Sequence[str]: ...


@runtime_checkable
class KeyListing(Protocol):
    """Optional: lists the stored keys with this deployment's name prefix (Vault Transit).

    Unlike a ``KeyInventory``, nothing deletes what it lists by itself: the mount may be
    shared, so orphans are removed only on an operator's ``meshca ca prune-keys``.
    """

    @property
    def prefix(self) -> str:
        """Key references from this store start with this (after the backend's scheme)."""
        ...

    def listed(self) -> Sequence[str]:
        """Every stored key reference with the prefix."""
        ...


@runtime_checkable
class TaintJournal(Protocol):
    """Optional: marks an authority tainted, with its issuance-log record, atomically."""

    def taint(self, entry_id: str, at: datetime, record: AuditRecord) -> int:
        """Set ``tainted_at`` and append ``record`` in one transaction; its leaf index.

        ``JournalConflict`` if the entry is unknown, removed or already tainted.
        """
        ...


class KeyImporter(Protocol):
    """Optional: takes custody of an existing key (``meshca ca import``)."""

    def store(self, label: str, key: SignerKey) -> str:
        """Store ``key`` durably and return its reference."""
        ...


class AuditReader(Protocol):
    """Reads the issuance record. Blocking: callers run it off the event loop."""

    def query(self, query: AuditQuery) -> AuditPage:
        """One page of matching entries, newest first. ``InvalidRequest`` for a bad cursor."""
        ...

    def get(self, *, serial: str | None = None, leaf_index: int | None = None) -> LogEntry | None:
        """The entry with this serial or leaf index, or None."""
        ...

    def export(self, query: AuditQuery) -> Iterator[LogEntry]:
        """Every matching entry, newest first, read page by page."""
        ...

    def leaves(self, start: int, limit: int) -> Sequence[LogEntry]:
        """Up to ``limit`` stored entries from leaf ``start`` on, in leaf order."""
        ...


class IssuanceLog(Protocol):
    """The verifiable log over the record: signed heads and proofs. Blocking.

    Proofs raise ``InvalidRequest`` for sizes or indexes outside the log, or when they
    would need leaves removed by retention.
    """

    def state(self) -> LogState: ...

    def latest_head(self) -> SignedTreeHead | None: ...

    def sign_head(self, now: datetime) -> SignedTreeHead:
        """Sign and store a head covering every committed leaf."""
        ...

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof: ...

    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof: ...

    def prune(self, before: datetime) -> int:
        """Remove records older than ``before`` from the start of the log; the new mark."""
        ...


@dataclass(frozen=True)
class UpstreamRoot:
    """A root of the upstream CA; ``ref`` names it there (a Vault PKI issuer id)."""

    ref: str
    certificate: x509.Certificate
    default: bool = False


@dataclass(frozen=True)
class SignedIntermediate:
    """An intermediate the upstream CA signed: the certificate and its chain up to,
    excluding, the root, issuer first."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]


class UpstreamAuthority(Protocol):
    """An upstream CA (Vault's PKI) that owns the roots and signs meshca's intermediates.

    Blocking; raises ``BackendUnavailable`` when the upstream cannot be reached.
    """

    def roots(self) -> Sequence[UpstreamRoot]:
        """The upstream's current roots."""
        ...

    def sign_intermediate(
        self, root_ref: str, csr: x509.CertificateSigningRequest, ttl: timedelta
    ) -> SignedIntermediate:
        """Have root ``root_ref`` sign ``csr`` as a CA that may sign only leaves."""
        ...


class DenyListSource(Protocol):
    """Where servers read the deny-list from. Blocking: callers run it off the event loop.

    Both methods raise ``BackendUnavailable`` if storage is down.
    """

    def revision(self) -> int:
        """A number that changes with every add or lift (-1 for a list never written)."""
        ...

    def load(self) -> DenyList:
        """Every entry not lifted, with the revision it was read at."""
        ...
