"""The CA's own authorities: the journal, the rotation steps, and the issuer they yield.

``AuthorityService`` is blocking (the journal and key managers do I/O); async callers
run it in a thread. One instance per process. Every process follows the journal with
``refresh()``; the one running the rotator also calls ``tick()``, which performs the
steps ``core.rotation`` says are due. Steps run under ``lock`` (an inter-process lock
shared with the ``meshca ca`` commands) and each ends in one journal transaction, with
keys stored before the entry that names them: a process killed at any point leaves
either the old state or the new one, plus at most an unreferenced key, which the next
step deletes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from meshca.core.authority import (
    Authority,
    SignerKey,
    build_intermediate,
    build_root,
    hash_for,
    trust_domain_ids,
)
from meshca.core.errors import AuthorityNotReady, MeshcaError, UnsafeChange
from meshca.core.jwt_svid import JwtKey, build_jwt_key_certificate
from meshca.core.key_orphans import live_key_refs, orphaned_key_refs
from meshca.core.ports import (
    AuthorityJournal,
    Clock,
    KeyImporter,
    KeyInventory,
    KeyListing,
    KeyManager,
    TaintJournal,
    UpstreamAuthority,
)
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
    PlannedStep,
    Rotation,
    RotationPolicy,
    Step,
    Transition,
    entry_id,
)
from meshca.core.spiffe import TrustDomain
from meshca.core.taint import (
    IssuedLeaf,
    PeerPrediction,
    TaintRequest,
    check_taint,
    predict_peer_failures,
    resolve,
    taint_record,
)

__all__ = [
    "UPSTREAM_REF",
    "AuthorityService",
    "AuthorityView",
    "JwtSigner",
    "StepReport",
    "TaintOutcome",
]

#: ``key_ref`` of a root held by the upstream CA: ``upstream:<its name there>``.
UPSTREAM_REF = "upstream:"

log = logging.getLogger(__name__)

#: Upper bound on steps in one tick; a tick normally runs zero, one or two.
_MAX_STEPS_PER_TICK = 16

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class StepReport:
    """A step that ran: what it did, to which entries, and how long it took."""

    step: Step
    entries: tuple[str, ...]
    seconds: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class JwtSigner:
    """The active JWT-SVID key: its ``kid``, signer and end."""

    kid: str
    signer: SignerKey
    not_after: datetime


@dataclass(frozen=True)
class AuthorityView:
    """One process's picture of the journal: the issuer to sign with and the bundle.

    ``jwt_keys`` are the JWT-SVID keys verifiers must know (``AuthoritySet.jwt_bundle``);
    ``jwt_signer`` is the active one, None when JWT keys are off or none is active yet.
    """

    authorities: AuthoritySet
    authority: Authority | None
    bundle: tuple[x509.Certificate, ...]
    problem: str | None = None
    bundle_sequence: int = 1
    jwt_keys: tuple[JwtKey, ...] = ()
    jwt_signer: JwtSigner | None = None
    #: SHA-256 fingerprints of tainted authorities not yet removed (``meshca ca taint``).
    tainted: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaintOutcome:
    """What ``taint`` did: the entry, its log record's leaf index, and the steps run."""

    entry: AuthorityEntry
    leaf_index: int
    reports: tuple[StepReport, ...]
    prediction: PeerPrediction | None = None


#: Reads the ``issued`` records since a time, for the peer-failure prediction.
IssuedSince = Callable[[datetime], Iterable[IssuedLeaf]]


@dataclass
class _Health:
    degraded: str | None = None
    since: datetime | None = None
    history: list[StepReport] = field(default_factory=list)


class AuthorityService:
    """Current and next CA slots over the journal; gives CertificateService its issuer."""

    def __init__(
        self,
        *,
        journal: AuthorityJournal,
        keys: KeyManager,
        clock: Clock,
        policy: RotationPolicy,
        trust_domain: TrustDomain,
        new_serial: Callable[[], int],
        lock: Callable[[], AbstractContextManager[object]] = nullcontext,
        checkpoint: Callable[[str], None] = lambda _name: None,
        upstream: UpstreamAuthority | None = None,
    ) -> None:
        self._journal = journal
        self._keys = keys
        self._clock = clock
        self.policy = policy
        self._trust_domain = trust_domain
        self._new_serial = new_serial
        self._lock = lock
        # Tests stop the process at these points to prove every step resumes.
        self._checkpoint = checkpoint
        self._upstream = upstream
        self._signers: dict[str, SignerKey] = {}
        self._jwt_signers: dict[str, SignerKey] = {}
        self._view = AuthorityView(AuthoritySet(), None, (), "not loaded yet")
        self._signature: tuple[tuple[str, str], ...] | None = None
        self._refresh_lock = threading.Lock()
        self.health = _Health()
        self._collected = False

    # -- following the journal -----------------------------------------------------------

    @property
    def keys(self) -> KeyManager:
        """Where this CA's private keys are kept."""
        return self._keys

    @property
    def view(self) -> AuthorityView:
        return self._view

    def current(self) -> Authority:
        """The issuer to sign leaves with; raises ``AuthorityNotReady`` when there is none."""
        authority = self._view.authority
        if authority is None:
            raise AuthorityNotReady(self._view.problem or "no active intermediate CA")
        return authority

    def refresh(self) -> AuthorityView:
        """Re-read the journal; rebuild the issuer only when an entry changed state."""
        with self._refresh_lock:
            authorities = self._journal.load()
            signature = authorities.signature()
            if signature != self._signature:
                self._view = self._build_view(authorities)
                self._signature = signature
            return self._view

    def jwt_signer(self) -> JwtSigner:
        """The key to sign JWT-SVIDs with; raises ``AuthorityNotReady`` when there is none."""
        signer = self._view.jwt_signer
        if signer is None:
            raise AuthorityNotReady("no active JWT-SVID key yet", reason="jwt-key-not-ready")
        return signer

    def _jwt_view(self, authorities: AuthoritySet) -> tuple[tuple[JwtKey, ...], JwtSigner | None]:
        keys = tuple(JwtKey.from_certificate(e.id, e.certificate) for e in authorities.jwt_bundle())
        active = authorities.active_jwt_key
        if active is None or active.key_ref is None:
            return keys, None
        signer = self._jwt_signers.get(active.key_ref)
        if signer is None:
            signer = self._keys.load(active.key_ref)
            self._jwt_signers = {active.key_ref: signer}
        return keys, JwtSigner(active.id, signer, active.not_after)

    def _build_view(self, authorities: AuthoritySet) -> AuthorityView:
        bundle = authorities.bundle()
        sequence = authorities.bundle_sequence()
        jwt_keys, jwt_signer = self._jwt_view(authorities)
        tainted = tuple(e.fingerprint for e in authorities.tainted())
        intermediate = authorities.active_intermediate
        if intermediate is None or intermediate.key_ref is None:
            return AuthorityView(
                authorities,
                None,
                bundle,
                "no active intermediate CA",
                bundle_sequence=sequence,
                jwt_keys=jwt_keys,
                jwt_signer=jwt_signer,
                tainted=tainted,
            )
        signer = self._signers.get(intermediate.key_ref)
        if signer is None:
            signer = self._keys.load(intermediate.key_ref)
            # Only the current key is kept: old signers are never used again.
            self._signers = {intermediate.key_ref: signer}
        authority = Authority(
            certificate=intermediate.certificate,
            signer=signer,
            chain=intermediate.chain,
            roots=bundle,
        )
        return AuthorityView(
            authorities,
            authority,
            bundle,
            bundle_sequence=sequence,
            jwt_keys=jwt_keys,
            jwt_signer=jwt_signer,
            tainted=tainted,
        )

    # -- the rotator ---------------------------------------------------------------------

    def rotation(self, authorities: AuthoritySet | None = None) -> Rotation:
        return Rotation(authorities or self._view.authorities, self.policy)

    def tick(self) -> list[StepReport]:
        """Run every step that is due now, under the lock; then follow the journal."""
        reports: list[StepReport] = []
        upstream_problem: MeshcaError | None = None
        with self._lock():
            if self._upstream is not None:
                try:
                    reports.extend(self._sync_upstream(self._upstream))
                except MeshcaError as error:
                    # Steps that need no upstream (removals) still run; the caller
                    # hears about the upstream afterwards and reports itself degraded.
                    upstream_problem = error
            for _ in range(_MAX_STEPS_PER_TICK):
                now = self._clock.now()
                authorities = self._journal.load()
                due = Rotation(authorities, self.policy).due(now)
                if upstream_problem is not None:
                    due = [s for s in due if s.step == Step.REMOVE]
                if not due:
                    break
                reports.append(self._run(due[0], authorities, now))
            # After a step, and once after start: a crash may have left a key behind.
            if reports or not self._collected:
                self._collect_garbage(self._journal.load())
                self._collected = True
        self.refresh()
        self.health.history.extend(reports)
        del self.health.history[:-50]
        if upstream_problem is not None:
            raise upstream_problem
        return reports

    def _sync_upstream(self, upstream: UpstreamAuthority) -> list[StepReport]:
        """Publish roots new at the upstream CA (prepared: they wait out the delay).

        One new root at a time, the upstream's default first: a second one waits until
        the first is active.
        """
        started = time.perf_counter()
        now = self._clock.now()
        authorities = self._journal.load()
        if authorities.prepared_root is not None:
            return []
        known = {e.id for e in authorities.entries}
        fresh = [r for r in upstream.roots() if entry_id(r.certificate) not in known]
        fresh = [r for r in fresh if now < r.certificate.not_valid_after_utc]
        if not fresh:
            return []
        fresh.sort(key=lambda r: (not r.default, r.certificate.not_valid_before_utc))
        root = fresh[0]
        entry = AuthorityEntry(
            id=entry_id(root.certificate),
            kind=AuthorityKind.ROOT,
            state=AuthorityState.PREPARED,
            source=AuthoritySource.UPSTREAM,
            certificate=root.certificate,
            parent_id=None,
            key_ref=UPSTREAM_REF + root.ref,
            prepared_at=now,
        )
        self._journal.record([entry], [], now)
        log.info("published upstream root %s (issuer %s)", entry.id, root.ref)
        return [
            StepReport(
                Step.PREPARE_ROOT, (entry.id,), time.perf_counter() - started, "new upstream root"
            )
        ]

    def _run(self, planned: PlannedStep, authorities: AuthoritySet, now: datetime) -> StepReport:
        started = time.perf_counter()
        match planned.step:
            case Step.PREPARE_ROOT:
                ids: tuple[str, ...] = (self._prepare_root(now).id,)
            case Step.ACTIVATE_ROOT:
                ids = self._activate_root(authorities, now)
            case Step.PREPARE_INTERMEDIATE:
                root = authorities.active_root
                assert root is not None
                ids = (self._prepare_intermediate(root, now).id,)
            case Step.ACTIVATE_INTERMEDIATE:
                ids = self._activate_intermediate(authorities, now)
            case Step.PREPARE_JWT_KEY:
                ids = (self._prepare_jwt_key(now).id,)
            case Step.ACTIVATE_JWT_KEY:
                ids = self._activate_jwt_key(authorities, now)
            case Step.REMOVE:
                assert planned.target is not None
                ids = (self._remove(authorities, planned.target, now),)
        report = StepReport(planned.step, ids, time.perf_counter() - started, planned.reason)
        log.info(
            "CA %s %s (%s) in %.1f ms",
            report.step,
            ",".join(ids),
            planned.reason,
            report.seconds * 1000,
        )
        return report

    def _prepare_root(self, now: datetime) -> AuthorityEntry:
        self._checkpoint("prepare-root:start")
        key_ref, key = self._keys.create("root")
        self._checkpoint("prepare-root:key-stored")
        certificate = build_root(
            key, self._trust_domain, now, self.policy.root_ttl, self._new_serial()
        )
        entry = AuthorityEntry(
            id=entry_id(certificate),
            kind=AuthorityKind.ROOT,
            state=AuthorityState.PREPARED,
            source=AuthoritySource.SELF,
            certificate=certificate,
            parent_id=None,
            key_ref=key_ref,
            prepared_at=now,
        )
        self._journal.record([entry], [], now)
        self._checkpoint("prepare-root:recorded")
        return entry

    def _prepare_intermediate(self, root: AuthorityEntry, now: datetime) -> AuthorityEntry:
        if root.key_ref is not None and root.key_ref.startswith(UPSTREAM_REF):
            return self._prepare_upstream_intermediate(root, now)
        if root.key_ref is None:
            raise AuthorityNotReady(
                f"meshca does not hold the key of root {root.id}: import an intermediate "
                "under it with 'meshca ca import'"
            )
        self._checkpoint("prepare-intermediate:start")
        key_ref, key = self._keys.create("intermediate")
        self._checkpoint("prepare-intermediate:key-stored")
        certificate = build_intermediate(
            _public(key),
            root.certificate,
            self._keys.load(root.key_ref),
            self._trust_domain,
            now,
            self.policy.intermediate_ttl,
            self._new_serial(),
        )
        entry = AuthorityEntry(
            id=entry_id(certificate),
            kind=AuthorityKind.INTERMEDIATE,
            state=AuthorityState.PREPARED,
            source=AuthoritySource.SELF,
            certificate=certificate,
            parent_id=root.id,
            key_ref=key_ref,
            prepared_at=now,
        )
        self._journal.record([entry], [], now)
        self._checkpoint("prepare-intermediate:recorded")
        return entry

    def _prepare_upstream_intermediate(self, root: AuthorityEntry, now: datetime) -> AuthorityEntry:
        assert root.key_ref is not None
        if self._upstream is None:
            raise AuthorityNotReady(f"root {root.id} is upstream, and no upstream is set up")
        self._checkpoint("prepare-intermediate:start")
        key_ref, key = self._keys.create("intermediate")
        self._checkpoint("prepare-intermediate:key-stored")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshca intermediate")])
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(self._trust_domain.id)]
                ),
                False,
            )
            .sign(key, hash_for(key))
        )
        # Vault refuses a lifetime past its root's; never ask for one.
        ttl = min(self.policy.intermediate_ttl, root.not_after - now)
        signed = self._upstream.sign_intermediate(root.key_ref[len(UPSTREAM_REF) :], csr, ttl)
        top = signed.chain[-1] if signed.chain else signed.certificate
        if not _issued_by(top, root.certificate):
            raise AuthorityNotReady(
                f"the upstream signed the intermediate under another root than {root.id}"
            )
        entry = AuthorityEntry(
            id=entry_id(signed.certificate),
            kind=AuthorityKind.INTERMEDIATE,
            state=AuthorityState.PREPARED,
            source=AuthoritySource.UPSTREAM,
            certificate=signed.certificate,
            parent_id=root.id,
            key_ref=key_ref,
            prepared_at=now,
            chain=signed.chain,
        )
        self._journal.record([entry], [], now)
        self._checkpoint("prepare-intermediate:recorded")
        return entry

    def _activate_root(self, authorities: AuthoritySet, now: datetime) -> tuple[str, ...]:
        root = authorities.prepared_root
        assert root is not None
        waiting = authorities.prepared_intermediate(root.id)
        if waiting is None or now >= waiting.half_life:
            # The first certificate under the new root: only now, after its propagation.
            waiting = self._prepare_intermediate(root, now)
        moves = [
            Transition(root.id, AuthorityState.PREPARED, AuthorityState.ACTIVE),
            Transition(waiting.id, AuthorityState.PREPARED, AuthorityState.ACTIVE),
        ]
        for old in (authorities.active_root, authorities.active_intermediate):
            if old is not None:
                moves.append(Transition(old.id, AuthorityState.ACTIVE, AuthorityState.RETIRED))
        self._checkpoint("activate-root:before-record")
        self._journal.record([], moves, now)
        self._checkpoint("activate-root:recorded")
        return tuple(m.id for m in moves)

    def _activate_intermediate(self, authorities: AuthoritySet, now: datetime) -> tuple[str, ...]:
        root = authorities.active_root
        assert root is not None
        waiting = authorities.prepared_intermediate(root.id)
        assert waiting is not None
        moves = [Transition(waiting.id, AuthorityState.PREPARED, AuthorityState.ACTIVE)]
        old = authorities.active_intermediate
        if old is not None:
            moves.append(Transition(old.id, AuthorityState.ACTIVE, AuthorityState.RETIRED))
        self._checkpoint("activate-intermediate:before-record")
        self._journal.record([], moves, now)
        self._checkpoint("activate-intermediate:recorded")
        return tuple(m.id for m in moves)

    def _prepare_jwt_key(self, now: datetime) -> AuthorityEntry:
        self._checkpoint("prepare-jwt-key:start")
        key_ref, key = self._keys.create("jwt")
        self._checkpoint("prepare-jwt-key:key-stored")
        certificate = build_jwt_key_certificate(
            key, self._trust_domain, now, self.policy.jwt_key_ttl, self._new_serial()
        )
        entry = AuthorityEntry(
            id=entry_id(certificate),
            kind=AuthorityKind.JWT_KEY,
            state=AuthorityState.PREPARED,
            source=AuthoritySource.SELF,
            certificate=certificate,
            parent_id=None,
            key_ref=key_ref,
            prepared_at=now,
        )
        self._journal.record([entry], [], now)
        self._checkpoint("prepare-jwt-key:recorded")
        return entry

    def _activate_jwt_key(self, authorities: AuthoritySet, now: datetime) -> tuple[str, ...]:
        waiting = authorities.prepared_jwt_key
        assert waiting is not None
        moves = [Transition(waiting.id, AuthorityState.PREPARED, AuthorityState.ACTIVE)]
        old = authorities.active_jwt_key
        if old is not None:
            moves.append(Transition(old.id, AuthorityState.ACTIVE, AuthorityState.RETIRED))
        self._journal.record([], moves, now)
        self._checkpoint("activate-jwt-key:recorded")
        return tuple(m.id for m in moves)

    def _remove(self, authorities: AuthoritySet, target: str, now: datetime) -> str:
        entry = authorities.get(target)
        assert entry is not None
        self._journal.record([], [Transition(entry.id, entry.state, AuthorityState.REMOVED)], now)
        self._checkpoint("remove:recorded")
        if _held(entry.key_ref):
            assert entry.key_ref is not None
            self._keys.delete(entry.key_ref)
        return entry.id

    def _collect_garbage(self, authorities: AuthoritySet) -> None:
        """Delete keys no live entry names: left by a crash, or by a removal cut short."""
        live = {
            e.key_ref
            for e in authorities.entries
            if e.key_ref is not None and e.state != AuthorityState.REMOVED
        }
        if isinstance(self._keys, KeyInventory):
            for key_ref in self._keys.key_refs():
                if key_ref not in live:
                    log.info("deleting CA key %s: no journal entry uses it", key_ref)
                    self._keys.delete(key_ref)
        for entry in authorities.entries:
            if entry.state == AuthorityState.REMOVED and entry.key_ref not in live:
                if _held(entry.key_ref):
                    assert entry.key_ref is not None
                    self._keys.delete(entry.key_ref)

    # -- first start ---------------------------------------------------------------------

    def bootstrap(self, adopt: Callable[[], Sequence[AuthorityEntry]] | None = None) -> None:
        """Make sure the journal has an issuing CA, adopting an older data dir's files.

        ``adopt`` returns entries for CA files made before the journal existed (active,
        source ``adopted``); it is called only while the journal is empty.
        """
        with self._lock():
            authorities = self._journal.load()
            if not authorities.entries and adopt is not None:
                entries = list(adopt())
                if entries:
                    self._journal.record(entries, [], self._clock.now())
                    log.info("adopted the existing CA files into the journal")
            self._collect_garbage(self._journal.load())
        self.tick()

    # -- operators' commands ---------------------------------------------------------------

    def rotate_intermediate(self) -> list[StepReport]:
        """Make and activate a new intermediate under the active root now (always safe)."""
        with self._lock():
            now = self._clock.now()
            authorities = self._journal.load()
            root = authorities.active_root
            if root is None:
                raise UnsafeChange("there is no active root to sign an intermediate")
            started = time.perf_counter()
            if authorities.prepared_intermediate(root.id) is None:
                self._prepare_intermediate(root, now)
            ids = self._activate_intermediate(self._journal.load(), now)
            report = StepReport(
                Step.ACTIVATE_INTERMEDIATE, ids, time.perf_counter() - started, "on demand"
            )
        self.refresh()
        return [report]

    def rotate_root(self, *, now: bool = False) -> list[StepReport]:
        """Prepare a successor root now; with ``now``, activate a prepared one if it is safe.

        Raises ``UnsafeChange`` (and changes nothing) when the move would let a proxy
        meet a certificate under a root it may not have fetched yet.
        """
        if not self.policy.self_managed_roots:
            raise UnsafeChange(
                "roots come from the upstream CA: rotate the root there and meshca follows"
            )
        reports: list[StepReport] = []
        with self._lock():
            at = self._clock.now()
            authorities = self._journal.load()
            rotation = Rotation(authorities, self.policy)
            prepared = authorities.prepared_root
            delay = self.policy.propagation_delay
            if prepared is None:
                if now and authorities.active_root is not None:
                    raise UnsafeChange(
                        "--now would sign under a root that no proxy has yet: a new root must "
                        f"be in the trust bundle for the propagation delay ({_seconds(delay)}) "
                        "first. "
                        "Run 'meshca ca rotate --root' now and it takes over at "
                        f"{at + delay:%Y-%m-%d %H:%M:%SZ}"
                    )
                started = time.perf_counter()
                entry = self._prepare_root(at)
                reports.append(
                    StepReport(Step.PREPARE_ROOT, (entry.id,), time.perf_counter() - started)
                )
                authorities = self._journal.load()
                rotation = Rotation(authorities, self.policy)
            elif not now:
                activate_at = rotation.root_activate_at(at)
                raise UnsafeChange(
                    f"a root rotation is already under way: root {prepared.id} takes over at "
                    f"{activate_at:%Y-%m-%d %H:%M:%SZ}"
                )
            if rotation.should_activate_root(at):
                started = time.perf_counter()
                ids = self._activate_root(authorities, at)
                reports.append(StepReport(Step.ACTIVATE_ROOT, ids, time.perf_counter() - started))
            elif now:
                assert prepared is not None
                activate_at = rotation.root_activate_at(at)
                assert activate_at is not None
                raise UnsafeChange(
                    f"root {prepared.id} has been in the trust bundle for "
                    f"{_seconds(at - prepared.prepared_at)} of the {_seconds(delay)} propagation "
                    "delay: activating "
                    "it now would hand proxies certificates their peers may not trust yet. "
                    f"It takes over at {activate_at:%Y-%m-%d %H:%M:%SZ}"
                )
        self.refresh()
        return reports

    def orphaned_keys(self) -> tuple[str, ...]:
        """Stored keys with this deployment's prefix that no live entry names (none when
        the key manager cannot list its keys)."""
        if not isinstance(self._keys, KeyListing):
            return ()
        return orphaned_key_refs(
            self._keys.listed(), self._journal.load(), prefix=self._keys.prefix
        )

    def prune_keys(self, *, dry_run: bool = False) -> tuple[str, ...]:
        """Delete the orphaned keys, under the step lock; returns those (to be) deleted.

        Under the lock, no step is between making a key and recording its entry, so a
        key about to be named is never taken for an orphan.
        """
        with self._lock():
            if not live_key_refs(self._journal.load()):
                # A journal naming no key at all is the wrong database, or a CA not yet
                # started: every key in the mount would look orphaned.
                raise UnsafeChange(
                    "the journal names no CA key: is this the database of the deployment "
                    "that owns these keys? Nothing was deleted"
                )
            orphans = self.orphaned_keys()
            if not dry_run:
                for key_ref in orphans:
                    self._keys.delete(key_ref)
                    log.warning("deleted orphaned CA key %s (meshca ca prune-keys)", key_ref)
        return orphans

    def predict_taint(
        self, fingerprint: str, issued_since: IssuedSince
    ) -> tuple[AuthorityEntry, PeerPrediction | None]:
        """The authority ``fingerprint`` names and, for an active root, who may fail if it
        were switched away from now without propagation (see ``core.taint``)."""
        authorities = self._journal.load()
        entry = resolve(authorities, fingerprint)
        return entry, self._prediction(authorities, entry, issued_since)

    def _prediction(
        self, authorities: AuthoritySet, entry: AuthorityEntry, issued_since: IssuedSince
    ) -> PeerPrediction | None:
        if entry.kind != AuthorityKind.ROOT or entry.activated_at is None:
            return None
        now = self._clock.now()
        # No leaf outlives --max-svid-ttl: older records cannot name a valid certificate.
        since = max(entry.activated_at, now - self.policy.max_svid_ttl)
        return predict_peer_failures(authorities, entry, issued_since(since), now)

    def taint(
        self,
        fingerprint: str,
        *,
        reason: str,
        requested_by: str,
        emergency: bool = False,
        peers_may_fail: bool = False,
        issued_since: IssuedSince | None = None,
    ) -> TaintOutcome:
        """Mark an authority compromised, record it in the issuance log, and move off it.

        Intermediate: a successor under the active root is prepared (or a waiting one
        taken) and activated now. Root: a successor root is prepared; with ``emergency``
        (and ``peers_may_fail``) it is activated now, else after the propagation delay.
        A tainted authority that is only prepared is removed at once. Raises
        ``InvalidRequest`` / ``UnsafeChange`` (and changes nothing) when refused.
        """
        if not isinstance(self._journal, TaintJournal):
            raise UnsafeChange("this journal cannot record taints")
        with self._lock():
            now = self._clock.now()
            authorities = self._journal.load()
            entry = resolve(authorities, fingerprint)
            request = check_taint(
                authorities,
                entry,
                reason=reason,
                requested_by=requested_by,
                emergency=emergency,
                peers_may_fail=peers_may_fail,
                self_managed_roots=self.policy.self_managed_roots,
            )
            if entry.kind == AuthorityKind.ROOT and entry.state == AuthorityState.ACTIVE:
                self._check_root_successor(authorities, request)
            prediction = None
            if request.emergency and issued_since is not None:
                prediction = self._prediction(authorities, entry, issued_since)
            record = taint_record(request, now, prediction=prediction)
            leaf = self._journal.taint(entry.id, now, record)
            log.warning(
                "CA %s %s tainted by %s (log leaf %d): %s",
                entry.kind,
                entry.id,
                request.requested_by,
                leaf,
                request.reason,
            )
            reports = self._move_off(request, now)
        self.refresh()
        self.health.history.extend(reports)
        return TaintOutcome(self._journal.load().get(entry.id) or entry, leaf, reports, prediction)

    def _check_root_successor(self, authorities: AuthoritySet, request: TaintRequest) -> None:
        if not self.policy.self_managed_roots:
            return
        prepared = authorities.prepared_root
        if prepared is not None and prepared.key_ref is None:
            raise UnsafeChange(
                f"root {prepared.id} is waiting to take over but meshca does not hold its "
                "key: import an intermediate under it first, or taint it too"
            )

    def _move_off(self, request: TaintRequest, now: datetime) -> tuple[StepReport, ...]:
        """The steps after the taint mark; the rotation rules redo them after a crash."""
        entry = request.entry
        reports: list[StepReport] = []
        started = time.perf_counter()
        authorities = self._journal.load()
        if entry.state == AuthorityState.PREPARED:
            self._remove(authorities, entry.id, now)
            reports.append(
                StepReport(Step.REMOVE, (entry.id,), time.perf_counter() - started, "tainted")
            )
            return tuple(reports)
        if entry.state != AuthorityState.ACTIVE:
            return ()  # retired: it signs nothing; removal follows the rules
        if entry.kind == AuthorityKind.INTERMEDIATE:
            root = authorities.active_root
            if root is None:
                raise AuthorityNotReady("there is no active root to sign a successor under")
            if authorities.prepared_intermediate(root.id) is None:
                self._prepare_intermediate(root, now)
            ids = self._activate_intermediate(self._journal.load(), now)
            reports.append(
                StepReport(
                    Step.ACTIVATE_INTERMEDIATE, ids, time.perf_counter() - started, "tainted"
                )
            )
            return tuple(reports)
        if authorities.prepared_root is None:
            prepared = self._prepare_root(now)
            reports.append(
                StepReport(Step.PREPARE_ROOT, (prepared.id,), time.perf_counter() - started)
            )
        if request.emergency:
            started = time.perf_counter()
            ids = self._activate_root(self._journal.load(), now)
            reports.append(
                StepReport(
                    Step.ACTIVATE_ROOT, ids, time.perf_counter() - started, "tainted: emergency"
                )
            )
        return tuple(reports)

    def import_authority(
        self, certificates: Sequence[x509.Certificate], key: SignerKey, importer: KeyImporter
    ) -> list[AuthorityEntry]:
        """Take an organisation's root, or intermediate with its chain, into the journal.

        ``certificates`` is the CA certificate whose key is ``key``, then its issuers up
        to the root. A new root enters as prepared and waits out the propagation delay
        like any other; an intermediate under the active root takes over at the next tick.
        """
        if not certificates:
            raise UnsafeChange("no certificate given")
        at = self._clock.now()
        leaf = certificates[0]
        _check_importable(leaf, key, at, self.policy, self._trust_domain)
        is_root = leaf.subject == leaf.issuer and _self_signed(leaf)
        upstream = not self.policy.self_managed_roots
        if upstream and is_root:
            raise UnsafeChange(
                "roots come from the upstream CA: import the root there (Vault: its PKI "
                "mount's issuers/import/bundle, then make it the default issuer); meshca "
                "publishes it and signs under it after the propagation delay"
            )
        chain = tuple(certificates[1:])
        root_cert = leaf if is_root else (chain[-1] if chain else None)
        with self._lock():
            authorities = self._journal.load()
            known_root = None
            if not is_root:
                known_root = next(
                    (
                        e
                        for e in authorities.select(AuthorityKind.ROOT)
                        if e.state != AuthorityState.REMOVED
                        and (root_cert is None or e.certificate == root_cert)
                        and leaf.issuer == e.certificate.subject
                        and _issued_by(chain[-2] if len(chain) > 1 else leaf, e.certificate)
                    ),
                    None,
                )
                if upstream and (
                    known_root is None or known_root.source != AuthoritySource.UPSTREAM
                ):
                    raise UnsafeChange(
                        "the intermediate does not chain to a root of the upstream CA that "
                        "meshca publishes: import its root into the upstream CA first, or let "
                        "the upstream sign meshca's intermediates (it does by itself)"
                    )
                if known_root is None and (root_cert is None or not _self_signed(root_cert)):
                    raise UnsafeChange(
                        "the intermediate's chain must end in its root: give the root "
                        "certificate after the intermediate in --cert"
                    )
                _check_chain(leaf, chain)
            if authorities.prepared_root is not None and (is_root or known_root is None):
                raise UnsafeChange(
                    f"root {authorities.prepared_root.id} is already waiting to take over; "
                    "import again once it is active"
                )
            if authorities.get(entry_id(leaf)) is not None:
                raise UnsafeChange(f"authority {entry_id(leaf)} is already in the journal")
            inserts: list[AuthorityEntry] = []
            if known_root is not None:
                # Refused before the key is stored: a refusal leaves no key behind.
                if known_root.state == AuthorityState.RETIRED:
                    raise UnsafeChange(f"root {known_root.id} is retired; it signs nothing new")
                stale = authorities.prepared_intermediate(known_root.id)
                if stale is not None:
                    raise UnsafeChange(
                        f"intermediate {stale.id} is already waiting under root {known_root.id}"
                    )
            key_ref = importer.store("imported-root" if is_root else "imported-intermediate", key)
            self._checkpoint("import:key-stored")
            if is_root:
                inserts.append(_imported(leaf, AuthorityKind.ROOT, None, key_ref, at))
            else:
                if known_root is None:
                    assert root_cert is not None
                    known_root = _imported(root_cert, AuthorityKind.ROOT, None, None, at)
                    inserts.append(known_root)
                inserts.append(
                    AuthorityEntry(
                        id=entry_id(leaf),
                        kind=AuthorityKind.INTERMEDIATE,
                        state=AuthorityState.PREPARED,
                        source=AuthoritySource.IMPORTED,
                        certificate=leaf,
                        parent_id=known_root.id,
                        key_ref=key_ref,
                        prepared_at=at,
                        chain=chain[:-1],
                    )
                )
            self._journal.record(inserts, [], at)
        self.refresh()
        return inserts


def _seconds(delta: timedelta) -> str:
    return f"{int(delta.total_seconds())}s"


def _held(key_ref: str | None) -> bool:
    """True if the key manager holds this key (not None, not the upstream's)."""
    return key_ref is not None and not key_ref.startswith(UPSTREAM_REF)


def _public(key: SignerKey) -> PublicKey:
    public = key.public_key()
    assert isinstance(public, PublicKey)
    return public


def _self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_chain(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> None:
    for child, parent in zip((leaf, *chain), chain, strict=False):
        if not _issued_by(child, parent):
            raise UnsafeChange(
                f"{child.subject.rfc4514_string()} is not signed by the next certificate "
                f"given ({parent.subject.rfc4514_string()})"
            )


def _imported(
    cert: x509.Certificate,
    kind: AuthorityKind,
    parent_id: str | None,
    key_ref: str | None,
    at: datetime,
) -> AuthorityEntry:
    return AuthorityEntry(
        id=entry_id(cert),
        kind=kind,
        state=AuthorityState.PREPARED,
        source=AuthoritySource.IMPORTED,
        certificate=cert,
        parent_id=parent_id,
        key_ref=key_ref,
        prepared_at=at,
    )


def _check_importable(
    cert: x509.Certificate,
    key: SignerKey,
    now: datetime,
    policy: RotationPolicy,
    trust_domain: TrustDomain,
) -> None:
    """Refuse a certificate meshca could not safely sign with."""
    if cert.public_key() != key.public_key():
        raise UnsafeChange("the key does not belong to the certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise UnsafeChange("the certificate is not a CA (basicConstraints CA:true is missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise UnsafeChange("the certificate may not sign certificates (keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    if now < cert.not_valid_before_utc:
        raise UnsafeChange(f"the certificate is not valid before {cert.not_valid_before_utc}")
    if cert.not_valid_after_utc - now < 2 * policy.max_svid_ttl:
        raise UnsafeChange(
            f"the certificate ends at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}, too soon "
            f"to issue certificates of up to {policy.max_svid_ttl} for long"
        )
    others = [u for u in trust_domain_ids(cert) if u != trust_domain.id]
    if others:
        raise UnsafeChange(f"the certificate belongs to another trust domain ({others[0]})")
