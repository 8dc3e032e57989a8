"""A fleet of 100 proxies through two root rotations and many intermediate renewals.

Time is a fake clock moved in 5-minute steps through 20 simulated hours. Two workers
follow the real SQL journal (one of them, the leader, also runs the rotation steps; the
other refreshes only every other step, so it lags); every proxy renews at half-life from
one of them and takes the bundle from the answer, and half the proxies also watch the
bundle. After every step each proxy verifies every other proxy's chain with its own
bundle at that instant (cryptography's X.509 path validation, fixed validation time).
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshca.adapters.keys.file_store import new_serial
from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.adapters.storage.tables import create_schema
from meshca.core.identity import KubernetesIdentity
from meshca.core.issuance import IssuancePolicy
from meshca.core.rotation import AuthorityState, RotationPolicy, Step
from meshca.service.authority import AuthorityService, StepReport
from meshca.service.ca import CertificateService, SignRequest
from tests.core.builders import NOW, TRUST_DOMAIN
from tests.fakes import FakeAttestor, FakeClock, MemoryAuditLog

PROXIES = 100
STEP = timedelta(minutes=5)
DURATION = timedelta(hours=20)
POLICY = RotationPolicy(
    root_ttl=timedelta(hours=24),
    intermediate_ttl=timedelta(hours=4),
    max_svid_ttl=timedelta(hours=1),
    propagation_delay=timedelta(hours=1),
    root_rotation=timedelta(hours=8),
)


@dataclass
class Proxy:
    name: str
    token: str
    watches_bundle: bool
    joins_at: object
    leaf: x509.Certificate | None = None
    intermediates: tuple[x509.Certificate, ...] = ()
    bundle: tuple[x509.Certificate, ...] = ()

    def renew_due(self, now: object) -> bool:
        if self.leaf is None:
            return bool(now >= self.joins_at)  # type: ignore[operator]
        start, end = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
        return bool(now >= start + (end - start) / 2)  # type: ignore[operator]


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )


async def _inline(fn):  # type: ignore[no-untyped-def]
    return fn()


def _service(tmp_path: Path, clock: FakeClock, policy: RotationPolicy) -> AuthorityService:
    engine = make_engine(f"sqlite:///{tmp_path / 'meshca.db'}")
    create_schema(engine)
    return AuthorityService(
        journal=SqlAuthorityJournal(engine),
        keys=FileKeyManager(tmp_path / "ca"),
        clock=clock,
        policy=policy,
        trust_domain=TRUST_DOMAIN,
        new_serial=new_serial,
    )


async def test_fleet_survives_two_root_rotations_without_a_failed_handshake(
    tmp_path: Path,
) -> None:
    await _run_fleet(tmp_path, POLICY)


async def test_the_fleet_test_catches_a_root_used_before_it_propagated(tmp_path: Path) -> None:
    """With no propagation delay the same fleet fails at the first root switch: the
    simulation does notice broken rotation rules."""
    with pytest.raises(AssertionError, match="cannot verify"):
        await _run_fleet(tmp_path, replace(POLICY, propagation_delay=timedelta(0)))


async def _run_fleet(tmp_path: Path, policy: RotationPolicy) -> None:
    clock = FakeClock(NOW)
    leader = _service(tmp_path, clock, policy)
    follower = _service(tmp_path, clock, policy)
    leader.bootstrap()
    follower.refresh()
    rng = random.Random(7)
    identities = {}
    proxies = []
    for i in range(PROXIES):
        token = f"token-{i}"
        identities[token] = KubernetesIdentity(
            namespace=f"ns{i % 7}", service_account=f"sa{i}", pod_name=f"p{i}", pod_uid=f"u{i}"
        )
        proxies.append(
            Proxy(f"p{i}", token, i % 2 == 0, NOW + timedelta(seconds=rng.randrange(1800)))
        )
    workers = [leader, follower]
    cas = [
        CertificateService(
            trust_domain=TRUST_DOMAIN,
            attestor=FakeAttestor(identities),
            audit_log=MemoryAuditLog(),
            authority=w.current,
            clock=clock,
            policy=IssuancePolicy(default_ttl=POLICY.max_svid_ttl, max_ttl=POLICY.max_svid_ttl),
            new_serial=new_serial,
            offload=_inline,
        )
        for w in workers
    ]

    reports: list[StepReport] = []
    pairs_checked = verifications = failures = renewals = steps = 0
    bundle_sizes: set[int] = set()
    end = NOW + DURATION
    while clock.now() < end:
        clock.advance(STEP)
        steps += 1
        reports.extend(leader.tick())
        if steps % 2 == 0:  # the second worker lags one step behind the journal
            follower.refresh()
        now = clock.now()
        for index, proxy in enumerate(proxies):
            worker = index % 2
            if proxy.watches_bundle:
                proxy.bundle = workers[worker].view.bundle
            if proxy.renew_due(now):
                signed = await cas[worker].sign(
                    SignRequest(token=proxy.token, csr=_csr(), requested_ttl=None, api="fleet")
                )
                proxy.leaf, proxy.intermediates, proxy.bundle = (
                    signed.leaf,
                    signed.intermediates,
                    signed.roots,
                )
                renewals += 1
        live = [p for p in proxies if p.leaf is not None]
        holders: dict[tuple[x509.Certificate, ...], int] = defaultdict(int)
        for proxy in live:
            holders[proxy.bundle] += 1
        for bundle, count in holders.items():
            bundle_sizes.add(len(bundle))
            verifier = PolicyBuilder().store(Store(list(bundle))).time(now).build_client_verifier()
            for peer in live:
                assert peer.leaf is not None
                verifications += 1
                pairs_checked += count
                try:
                    verifier.verify(peer.leaf, list(peer.intermediates))
                except VerificationError as error:
                    failures += count
                    raise AssertionError(
                        f"at {now}: a proxy holding {len(bundle)} roots cannot verify "
                        f"{peer.name}: {error}"
                    ) from None

    by_step: dict[Step, list[float]] = defaultdict(list)
    for report in reports:
        by_step[report.step].append(report.seconds * 1000)
    entries = leader.view.authorities.entries
    roots_activated = sum(1 for e in entries if e.kind == "root" and e.activated_at is not None)
    print(
        f"\nfleet: {PROXIES} proxies, {steps} steps of {STEP}, {renewals} certificates issued, "
        f"{roots_activated - 1} root rotations, "
        f"{len(by_step[Step.ACTIVATE_INTERMEDIATE])} intermediate renewals, "
        f"{len(by_step[Step.REMOVE])} removals; {pairs_checked} proxy-to-proxy checks "
        f"({verifications} distinct path validations), {failures} failures; "
        f"bundle sizes seen {sorted(bundle_sizes)}"
    )
    for step, times in by_step.items():
        print(
            f"  {step}: {len(times)} runs, mean {statistics.mean(times):.1f} ms, "
            f"max {max(times):.1f} ms"
        )
    assert failures == 0
    assert roots_activated - 1 >= 2, "two full root rotations"
    assert len(by_step[Step.ACTIVATE_INTERMEDIATE]) >= 4
    # Both old roots have left the bundle once everything under them expired.
    removed_roots = [e for e in entries if e.kind == "root" and e.state == AuthorityState.REMOVED]
    assert len(removed_roots) >= 2
    assert max(bundle_sizes) == 2 and min(bundle_sizes) == 1
    assert set(FileKeyManager(tmp_path / "ca").key_refs()) == {
        e.key_ref for e in entries if e.key_ref is not None and e.state != AuthorityState.REMOVED
    }
