"""The JWT-SVID key rules, table-driven over journals built at fixed times."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from meshca.core.jwt_svid import build_jwt_key_certificate
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
    Rotation,
    RotationPolicy,
    Step,
    entry_id,
)
from tests.core.builders import NOW, TRUST_DOMAIN, signer_key

H = timedelta(hours=1)
POLICY = RotationPolicy(
    root_ttl=24 * H,
    intermediate_ttl=4 * H,
    max_svid_ttl=H,
    propagation_delay=H,
    root_rotation=8 * H,
    jwt_keys=True,
    jwt_key_ttl=8 * H,
    max_jwt_svid_ttl=H / 4,
)
ACTIVE, PREPARED, RETIRED = (
    AuthorityState.ACTIVE,
    AuthorityState.PREPARED,
    AuthorityState.RETIRED,
)


def jwt_key(
    state: AuthorityState, *, at: datetime = NOW, ttl: timedelta = 8 * H, n: int = 1
) -> AuthorityEntry:
    cert = build_jwt_key_certificate(signer_key("ec-p256", 500 + n), TRUST_DOMAIN, at, ttl, n)
    return AuthorityEntry(
        id=entry_id(cert),
        kind=AuthorityKind.JWT_KEY,
        state=state,
        source=AuthoritySource.SELF,
        certificate=cert,
        parent_id=None,
        key_ref=f"file:keys/jwt-{n}.key",
        prepared_at=at,
        activated_at=at if state in (ACTIVE, RETIRED) else None,
        retired_at=at if state == RETIRED else None,
    )


def _jwt_steps(entries: tuple[AuthorityEntry, ...], now: datetime) -> list[tuple[Step, datetime]]:
    plan = Rotation(AuthoritySet(entries), POLICY).plan(now)
    jwt_steps = (Step.PREPARE_JWT_KEY, Step.ACTIVATE_JWT_KEY, Step.REMOVE)
    return [(s.step, s.at) for s in plan if s.step in jwt_steps]


@pytest.mark.parametrize(
    ("entries", "now", "expected"),
    [
        pytest.param((), NOW, [(Step.PREPARE_JWT_KEY, NOW)], id="ok/first-key-now"),
        pytest.param(
            (jwt_key(PREPARED),),
            NOW,
            [(Step.ACTIVATE_JWT_KEY, NOW)],
            id="ok/first-key-signs-at-once",
        ),
        pytest.param(
            (jwt_key(ACTIVE),),
            NOW,
            [(Step.PREPARE_JWT_KEY, NOW + 4 * H)],
            id="ok/successor-at-half-life",
        ),
        pytest.param(
            (jwt_key(ACTIVE, ttl=3 * H),),
            NOW,
            [(Step.PREPARE_JWT_KEY, NOW + H)],
            id="ok/successor-early-enough-to-wait-out-the-delay",
        ),
        pytest.param(
            (jwt_key(ACTIVE), jwt_key(PREPARED, at=NOW + 4 * H, n=2)),
            NOW + 4 * H,
            [(Step.ACTIVATE_JWT_KEY, NOW + 5 * H)],
            id="ok/published-for-the-delay-first",
        ),
        pytest.param(
            (jwt_key(ACTIVE, ttl=2 * H), jwt_key(PREPARED, at=NOW + 3 * H, n=2)),
            NOW + 3 * H,
            [(Step.ACTIVATE_JWT_KEY, NOW + 3 * H)],
            id="ok/expired-active-key-is-replaced-at-once",
        ),
        pytest.param(
            (jwt_key(RETIRED), jwt_key(ACTIVE, n=2)),
            NOW,
            [(Step.PREPARE_JWT_KEY, NOW + 4 * H), (Step.REMOVE, NOW + H / 4)],
            id="ok/retired-removed-once-its-tokens-expired",
        ),
        pytest.param(
            (jwt_key(RETIRED, ttl=H / 8), jwt_key(ACTIVE, n=2)),
            NOW,
            [(Step.PREPARE_JWT_KEY, NOW + 4 * H), (Step.REMOVE, NOW + H / 8)],
            id="ok/retired-removed-no-later-than-its-end",
        ),
    ],
)
def test_jwt_key_plan(
    entries: tuple[AuthorityEntry, ...], now: datetime, expected: list[tuple[Step, datetime]]
) -> None:
    assert sorted(_jwt_steps(entries, now), key=lambda s: s[1]) == sorted(
        expected, key=lambda s: s[1]
    )


def test_jwt_keys_off_plans_nothing_for_them() -> None:
    off = replace(POLICY, jwt_keys=False)
    plan = Rotation(AuthoritySet(()), off).plan(NOW)
    assert all(s.step not in (Step.PREPARE_JWT_KEY, Step.ACTIVATE_JWT_KEY) for s in plan)


def test_jwt_keys_are_never_roots_and_order_active_first() -> None:
    active, prepared = jwt_key(ACTIVE), jwt_key(PREPARED, at=NOW + H, n=2)
    authorities = AuthoritySet((prepared, active))
    assert authorities.bundle() == ()
    assert authorities.active_root is None
    assert authorities.jwt_bundle() == (active, prepared)


def test_a_jwt_key_change_is_a_new_bundle_version() -> None:
    first = jwt_key(ACTIVE)
    one = AuthoritySet((first,)).bundle_sequence()
    two = AuthoritySet((first, jwt_key(PREPARED, at=NOW + H, n=2))).bundle_sequence()
    assert two == one + 1
