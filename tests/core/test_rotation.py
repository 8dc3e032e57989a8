"""The rotation rules, table-driven over journals built at fixed times (no clock reads)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from meshca.core.authority import build_intermediate, build_root
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
    Rotation,
    RotationPolicy,
    Step,
    Transition,
    entry_id,
)
from tests.core.builders import NOW, TRUST_DOMAIN, signer_key

H = timedelta(hours=1)
T0 = NOW
POLICY = RotationPolicy(
    root_ttl=24 * H,
    intermediate_ttl=4 * H,
    max_svid_ttl=H,
    propagation_delay=H,
    root_rotation=8 * H,
)
ACTIVE, PREPARED, RETIRED, REMOVED = (
    AuthorityState.ACTIVE,
    AuthorityState.PREPARED,
    AuthorityState.RETIRED,
    AuthorityState.REMOVED,
)
_serials = iter(range(1 << 80, (1 << 80) + 10_000))


def root(
    state: AuthorityState = ACTIVE,
    *,
    at: datetime = T0,
    ttl: timedelta = 24 * H,
    source: AuthoritySource = AuthoritySource.SELF,
    key: bool = True,
    n: int = 1,
) -> AuthorityEntry:
    cert = build_root(signer_key("ec-p256", n), TRUST_DOMAIN, at, ttl, next(_serials))
    return AuthorityEntry(
        id=entry_id(cert),
        kind=AuthorityKind.ROOT,
        state=state,
        source=source,
        certificate=cert,
        parent_id=None,
        key_ref=f"file:keys/root-{n}.key" if key else None,
        prepared_at=at,
        activated_at=at if state in (ACTIVE, RETIRED) else None,
        retired_at=at if state == RETIRED else None,
    )


def intermediate(
    parent: AuthorityEntry,
    state: AuthorityState = ACTIVE,
    *,
    at: datetime = T0,
    ttl: timedelta = 4 * H,
    n: int = 1,
) -> AuthorityEntry:
    key = signer_key("ec-p256", 100 + n)
    root_n = int((parent.key_ref or "root-1").rsplit("-", 1)[-1].split(".")[0])
    cert = build_intermediate(
        key.public_key(),
        parent.certificate,
        signer_key("ec-p256", root_n),
        TRUST_DOMAIN,
        at,
        ttl,
        next(_serials),
    )
    return AuthorityEntry(
        id=entry_id(cert),
        kind=AuthorityKind.INTERMEDIATE,
        state=state,
        source=AuthoritySource.SELF,
        certificate=cert,
        parent_id=parent.id,
        key_ref=f"file:keys/intermediate-{n}.key",
        prepared_at=at,
        activated_at=at if state in (ACTIVE, RETIRED) else None,
        retired_at=at if state == RETIRED else None,
    )


def rules(*entries: AuthorityEntry, policy: RotationPolicy = POLICY) -> Rotation:
    return Rotation(AuthoritySet(entries), policy)


R1 = root()
I1 = intermediate(R1)
STEADY = (R1, I1)
R2_PREPARED = root(PREPARED, at=T0 + 8 * H, n=2)
#: Mid-rotation: the intermediate renewed at 7h is still valid when the new root waits.
ROTATING = (R1, intermediate(R1, at=T0 + 7 * H, n=2), R2_PREPARED)


@pytest.mark.parametrize(
    ("entries", "policy", "now", "expected"),
    [
        pytest.param((), POLICY, T0, True, id="ok/bootstrap-no-root"),
        pytest.param(STEADY, POLICY, T0 + 8 * H - timedelta(seconds=1), False, id="ok/young"),
        pytest.param(STEADY, POLICY, T0 + 8 * H, True, id="ok/rotation-age-reached"),
        pytest.param((*STEADY, R2_PREPARED), POLICY, T0 + 9 * H, False, id="ok/one-at-a-time"),
        pytest.param(
            (root(source=AuthoritySource.IMPORTED), I1),
            POLICY,
            T0 + 20 * H,
            False,
            id="ok/imported-root-is-never-replaced-automatically",
        ),
        pytest.param(
            STEADY,
            replace(POLICY, self_managed_roots=False),
            T0 + 20 * H,
            False,
            id="ok/upstream-roots",
        ),
        pytest.param(
            (root(ttl=10 * H), I1),
            POLICY,
            T0 + 8 * H,
            True,
            id="ok/short-root-prepared-early-enough",
        ),
    ],
)
def test_should_prepare_root(
    entries: tuple[AuthorityEntry, ...], policy: RotationPolicy, now: datetime, expected: bool
) -> None:
    assert rules(*entries, policy=policy).should_prepare_root(now) is expected


def test_short_root_prepares_before_it_is_too_late() -> None:
    short = root(ttl=10 * H)
    # 10h root, 1h propagation: its successor is prepared by 8h at the latest.
    assert rules(short).root_prepare_at() == T0 + 8 * H
    shorter = root(ttl=9 * H)
    assert rules(shorter).root_prepare_at() == T0 + 7 * H


@pytest.mark.parametrize(
    ("entries", "now", "expected"),
    [
        pytest.param(STEADY, T0 + 20 * H, False, id="ok/nothing-prepared"),
        pytest.param(ROTATING, T0 + 9 * H - timedelta(seconds=1), False, id="ok/too-early"),
        pytest.param(ROTATING, T0 + 9 * H, True, id="ok/propagated"),
        pytest.param((R2_PREPARED,), T0 + 8 * H, True, id="ok/bootstrap-nothing-to-protect"),
        pytest.param(
            (root(ttl=8 * H + timedelta(minutes=1)), intermediate(R1), R2_PREPARED),
            T0 + 8 * H + timedelta(minutes=2),
            True,
            id="ok/recovery-active-root-expired",
        ),
        pytest.param(
            (R1, intermediate(R1, ttl=8 * H), R2_PREPARED),
            T0 + 8 * H + timedelta(minutes=2),
            True,
            id="ok/recovery-active-intermediate-expired",
        ),
    ],
)
def test_should_activate_root(
    entries: tuple[AuthorityEntry, ...], now: datetime, expected: bool
) -> None:
    assert rules(*entries).should_activate_root(now) is expected


@pytest.mark.parametrize(
    ("entries", "now", "expected"),
    [
        pytest.param(STEADY, T0 + 2 * H - timedelta(seconds=1), False, id="ok/before-half-life"),
        pytest.param(STEADY, T0 + 2 * H, True, id="ok/half-life"),
        pytest.param((R1,), T0, True, id="ok/no-intermediate"),
        pytest.param(
            (*STEADY, intermediate(R1, PREPARED, at=T0 + 2 * H, n=2)),
            T0 + 3 * H,
            False,
            id="ok/already-prepared",
        ),
        pytest.param(
            (root(source=AuthoritySource.IMPORTED, key=False), I1),
            T0 + 3 * H,
            False,
            id="ok/keyless-root-cannot-sign",
        ),
        pytest.param((), T0, False, id="ok/no-root"),
    ],
)
def test_should_prepare_intermediate(
    entries: tuple[AuthorityEntry, ...], now: datetime, expected: bool
) -> None:
    assert rules(*entries).should_prepare_intermediate(now) is expected


def test_prepared_intermediate_under_the_active_root_activates_at_once() -> None:
    waiting = intermediate(R1, PREPARED, at=T0 + 2 * H, n=2)
    assert rules(*STEADY, waiting).should_activate_intermediate(T0 + 2 * H)
    # Under a root still waiting for propagation: only with the root.
    under_new = intermediate(R2_PREPARED, PREPARED, at=T0 + 9 * H, n=3)
    assert not rules(*STEADY, R2_PREPARED, under_new).should_activate_intermediate(T0 + 9 * H)


R1_RETIRED = root(RETIRED, n=1)
OLD_CHILD = replace(intermediate(R1_RETIRED, RETIRED, at=T0 + 8 * H), retired_at=T0 + 9 * H)


@pytest.mark.parametrize(
    ("entries", "target", "now", "expected"),
    [
        pytest.param(STEADY, I1, T0 + 30 * H, False, id="ok/active-never"),
        pytest.param(
            (R1_RETIRED, OLD_CHILD), OLD_CHILD, T0 + 12 * H - timedelta(1), False, id="ok/int-valid"
        ),
        pytest.param((R1_RETIRED, OLD_CHILD), OLD_CHILD, T0 + 12 * H, True, id="ok/int-expired"),
        pytest.param(
            (R1_RETIRED, OLD_CHILD),
            R1_RETIRED,
            T0 + 12 * H - timedelta(seconds=1),
            False,
            id="ok/root-stays-while-chained-certs-live",
        ),
        pytest.param(
            (R1_RETIRED, OLD_CHILD), R1_RETIRED, T0 + 12 * H, True, id="ok/root-after-last-child"
        ),
        pytest.param(
            (R1_RETIRED, intermediate(R1_RETIRED, PREPARED, n=5)),
            R1_RETIRED,
            T0,
            True,
            id="ok/never-activated-children-signed-nothing",
        ),
        pytest.param(
            (R1_RETIRED, intermediate(R1_RETIRED, PREPARED, n=6)),
            None,
            T0,
            True,
            id="ok/stranded-prepared-intermediate",
        ),
        pytest.param(
            (R2_PREPARED, intermediate(R2_PREPARED, PREPARED, at=T0 + 8 * H, n=7)),
            None,
            T0 + 8 * H,
            False,
            id="ok/intermediate-waiting-for-its-root",
        ),
    ],
)
def test_should_remove(
    entries: tuple[AuthorityEntry, ...],
    target: AuthorityEntry | None,
    now: datetime,
    expected: bool,
) -> None:
    entry = target or entries[-1]
    assert rules(*entries).should_remove(entry, now) is expected


def test_bundle_lists_active_then_prepared_then_retired_and_never_removed() -> None:
    removed = root(REMOVED, n=3)
    authorities = AuthoritySet((R1_RETIRED, removed, R2_PREPARED, root(ACTIVE, n=4)))
    bundle = authorities.bundle()
    assert [b.serial_number for b in bundle] == [
        authorities.entries[3].certificate.serial_number,
        R2_PREPARED.certificate.serial_number,
        R1_RETIRED.certificate.serial_number,
    ]


def test_plan_walks_a_whole_root_rotation_in_order() -> None:
    steps = rules(*STEADY).plan(T0)
    assert [(s.step, s.at - T0) for s in steps] == [
        (Step.PREPARE_INTERMEDIATE, 2 * H),
        (Step.PREPARE_ROOT, 8 * H),
    ]
    later = rules(*ROTATING).plan(T0 + 8 * H)
    assert (Step.ACTIVATE_ROOT, 9 * H) in [(s.step, s.at - T0) for s in later]
    assert rules(*STEADY).due(T0 + 2 * H)[0].step == Step.PREPARE_INTERMEDIATE


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        pytest.param(POLICY, None, id="ok/defaults-of-the-fleet"),
        pytest.param(
            replace(POLICY, root_rotation=23 * H + timedelta(minutes=30)),
            "does not fit",
            id="fail/rotation-too-late",
        ),
        pytest.param(
            replace(POLICY, propagation_delay=timedelta(minutes=10)),
            "shorter than half",
            id="fail/propagation-too-short",
        ),
        pytest.param(
            RotationPolicy(
                root_ttl=timedelta(minutes=20),
                intermediate_ttl=timedelta(minutes=6),
                max_svid_ttl=timedelta(minutes=2),
                propagation_delay=timedelta(minutes=2),
                root_rotation=timedelta(minutes=10),
            ),
            None,
            id="ok/minutes",
        ),
    ],
)
def test_policy_problems(policy: RotationPolicy, problem: str | None) -> None:
    found = policy.problems()
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    ("from_state", "to_state"),
    [(ACTIVE, PREPARED), (RETIRED, ACTIVE), (REMOVED, ACTIVE), (PREPARED, RETIRED)],
)
def test_lifecycle_never_goes_back(from_state: AuthorityState, to_state: AuthorityState) -> None:
    with pytest.raises(ValueError, match="no lifecycle move"):
        Transition("x", from_state, to_state)
