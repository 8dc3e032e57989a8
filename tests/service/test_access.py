"""Caller checks for ext_authz and PolicyService, and the records of their refusals."""

from __future__ import annotations

import pytest

from meshca.core.audit import Outcome
from meshca.core.callers import Access, SpiffePatterns
from meshca.core.errors import AuthenticationFailed, MeshcaError, NotAuthorized
from meshca.service.access import Caller, CallerGuard, PolicyAccess
from tests.fakes import FakeClock, MemoryAuditLog

TOKEN = "policy-token-5b1e"
ADMIN = "spiffe://example.org/ns/ops/sa/policy-admin"
PROXY = "spiffe://example.org/ns/shop/sa/frontend"
FOREIGN = "spiffe://other.org/ns/shop/sa/frontend"
EXT_AUTHZ = "envoy.service.auth.v3.Authorization/Check"
EXPLAIN = "meshca.v1.PolicyService/Explain"

ACCESS = PolicyAccess(
    callers=SpiffePatterns.parse(["spiffe://example.org/*"]),
    admins=frozenset({ADMIN}),
    token=TOKEN,
)
MALFORMED = AuthenticationFailed("authorization header must be 'Bearer <token>'", reason="x")

CASES = [
    # ext_authz on the policy port
    ("ok/ext-authz-svid-of-our-domain", Access.POLICY_CALLER, Caller(spiffe_id=PROXY), None),
    ("ok/ext-authz-admin-too", Access.POLICY_CALLER, Caller(spiffe_id=ADMIN), None),
    (
        "fail/ext-authz-no-svid",
        Access.POLICY_CALLER,
        Caller(),
        ("policy-caller-credentials-missing", AuthenticationFailed),
    ),
    (
        "fail/ext-authz-token-is-not-an-svid",
        Access.POLICY_CALLER,
        Caller(token=TOKEN),
        ("policy-caller-credentials-missing", AuthenticationFailed),
    ),
    (
        "fail/ext-authz-other-trust-domain",
        Access.POLICY_CALLER,
        Caller(spiffe_id=FOREIGN),
        ("not-a-policy-caller", NotAuthorized),
    ),
    # PolicyService
    ("ok/admin-svid", Access.POLICY_ADMIN, Caller(spiffe_id=ADMIN), None),
    ("ok/token", Access.POLICY_ADMIN, Caller(token=TOKEN), None),
    ("ok/token-with-any-svid", Access.POLICY_ADMIN, Caller(spiffe_id=PROXY, token=TOKEN), None),
    (
        "fail/no-credential",
        Access.POLICY_ADMIN,
        Caller(),
        ("policy-credentials-missing", AuthenticationFailed),
    ),
    (
        "fail/wrong-token",
        Access.POLICY_ADMIN,
        Caller(token=TOKEN + "x"),
        ("policy-token-invalid", AuthenticationFailed),
    ),
    (
        "fail/wrong-token-even-with-admin-svid",
        Access.POLICY_ADMIN,
        Caller(spiffe_id=ADMIN, token="nope"),
        ("policy-token-invalid", AuthenticationFailed),
    ),
    (
        "fail/malformed-header",
        Access.POLICY_ADMIN,
        Caller(spiffe_id=ADMIN, problem=MALFORMED),
        ("x", AuthenticationFailed),
    ),
    (
        "fail/proxy-svid-is-not-admin",
        Access.POLICY_ADMIN,
        Caller(spiffe_id=PROXY),
        ("not-a-policy-admin", NotAuthorized),
    ),
    ("ok/public", Access.PUBLIC, Caller(), None),
]


@pytest.mark.parametrize(
    ("access", "caller", "refusal"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_policy_access(
    access: Access, caller: Caller, refusal: tuple[str, type[MeshcaError]] | None
) -> None:
    if refusal is None:
        ACCESS.check(access, caller)
        return
    reason, kind = refusal
    with pytest.raises(kind) as caught:
        ACCESS.check(access, caller)
    assert caught.value.reason == reason
    # Refusals never quote the token.
    assert TOKEN not in caught.value.message


def test_without_a_token_configured_no_token_is_accepted() -> None:
    access = PolicyAccess(callers=None, admins=frozenset(), token=None)
    for token in ("", TOKEN, "None"):
        with pytest.raises(AuthenticationFailed):
            access.check(Access.POLICY_ADMIN, Caller(token=token))


def test_the_open_main_port_lets_any_ext_authz_caller_in() -> None:
    open_access = PolicyAccess(callers=None, token=TOKEN)
    open_access.check(Access.POLICY_CALLER, Caller())
    # ...but PolicyService still needs the token.
    with pytest.raises(AuthenticationFailed):
        open_access.check(Access.POLICY_ADMIN, Caller())


async def test_refusals_are_recorded_and_observed_admissions_are_not() -> None:
    records = MemoryAuditLog()
    heard: list[str] = []
    guard = CallerGuard(
        ACCESS,
        audit_log=records,
        clock=FakeClock(),
        on_outcome=lambda record, _duration: heard.append(record.reason),
    )
    await guard.admit(EXT_AUTHZ, Caller(spiffe_id=PROXY, peer="ipv4:10.0.0.1:5000"))
    await guard.admit(EXPLAIN, Caller(token=TOKEN))
    assert records.records == [] and heard == []

    with pytest.raises(NotAuthorized):
        await guard.admit(EXT_AUTHZ, Caller(spiffe_id=FOREIGN, peer="ipv4:10.0.0.2:5000"))
    with pytest.raises(AuthenticationFailed):
        await guard.admit(EXPLAIN, Caller(token="guess"))
    first, second = records.records
    assert (first.outcome, first.api, first.reason) == (
        Outcome.REFUSED,
        EXT_AUTHZ,
        "not-a-policy-caller",
    )
    assert first.spiffe_id == FOREIGN and first.peer == "ipv4:10.0.0.2:5000"
    assert (second.api, second.reason, second.spiffe_id) == (
        EXPLAIN,
        "policy-token-invalid",
        None,
    )
    assert "guess" not in second.detail
    assert heard == ["not-a-policy-caller", "policy-token-invalid"]


async def test_a_refusal_whose_record_fails_is_still_a_refusal() -> None:
    records = MemoryAuditLog(fail=True)
    guard = CallerGuard(ACCESS, audit_log=records, clock=FakeClock())
    with pytest.raises(AuthenticationFailed):
        await guard.admit(EXPLAIN, Caller())
    assert records.failures == 1


async def test_a_method_without_a_row_is_never_let_through() -> None:
    guard = CallerGuard(ACCESS, audit_log=MemoryAuditLog(), clock=FakeClock())
    with pytest.raises(KeyError):
        await guard.admit("meshca.v1.PolicyService/Reload", Caller(token=TOKEN))
