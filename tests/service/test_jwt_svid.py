"""JWT-SVID keys through their lifecycle in the real journal, and the signing use case."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import jwt
import pytest

from meshca.adapters.keys.file_store import new_serial
from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.adapters.storage.tables import create_schema
from meshca.core.audit import Outcome
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from meshca.core.errors import (
    AuthenticationFailed,
    AuthorityNotReady,
    BackendUnavailable,
    InvalidRequest,
    InvalidSpiffeId,
    NotAuthorized,
    RequestTooLarge,
    Revoked,
)
from meshca.core.identity import KubernetesIdentity
from meshca.core.rotation import AuthorityKind, AuthorityState, RotationPolicy, Step
from meshca.core.spiffe import SpiffeId
from meshca.service.authority import AuthorityService
from meshca.service.bundle import BundleSnapshot
from meshca.service.jwt_svid import JwtSvidRequest, JwtSvidService
from tests.core.builders import NOW, TRUST_DOMAIN
from tests.fakes import FakeAttestor, FakeClock, MemoryAuditLog

POLICY = RotationPolicy(
    root_ttl=timedelta(days=365),
    intermediate_ttl=timedelta(days=30),
    max_svid_ttl=timedelta(hours=1),
    propagation_delay=timedelta(hours=2),
    root_rotation=timedelta(days=180),
    jwt_keys=True,
    jwt_key_ttl=timedelta(days=1),
    max_jwt_svid_ttl=timedelta(minutes=10),
)
WEB = KubernetesIdentity(
    namespace="shop", service_account="web", pod_name="web-1", pod_uid="u1", node_name="n1"
)
WEB_ID = "spiffe://example.org/ns/shop/sa/web"


def _authorities(tmp_path: Path, clock: FakeClock, policy: RotationPolicy) -> AuthorityService:
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


def _signer(
    authorities: AuthorityService, clock: FakeClock, audit: MemoryAuditLog
) -> JwtSvidService:
    return JwtSvidService(
        trust_domain=TRUST_DOMAIN,
        attestor=FakeAttestor({"web-token": WEB}),
        audit_log=audit,
        signer=authorities.jwt_signer,
        clock=clock,
        max_ttl=POLICY.max_jwt_svid_ttl,
        new_jti=lambda: f"{new_serial():x}",
        issuer="https://meshca.example.org",
    )


def _request(**changes: object) -> JwtSvidRequest:
    values: dict[str, object] = {
        "token": "web-token",
        "audiences": ("https://db.example.org",),
        "spiffe_id": None,
        "requested_ttl": None,
        "api": "test",
        "peer": "ipv4:10.0.0.1:1234",
    }
    values.update(changes)
    return JwtSvidRequest(**values)  # type: ignore[arg-type]


def _verify(token: str, jwks: bytes, audience: str = "https://db.example.org") -> dict[str, object]:
    keys = {k["kid"]: k for k in json.loads(jwks)["keys"]}
    kid = jwt.get_unverified_header(token)["kid"]
    if kid not in keys:
        raise jwt.InvalidKeyError(f"kid {kid} is not in the JWKS")
    key = jwt.PyJWK(keys[kid], algorithm="ES256")
    claims: dict[str, object] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        # The fake clock is years away from the real one.
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims


def _jwks(authorities: AuthorityService) -> bytes:
    view = authorities.view
    return BundleSnapshot(TRUST_DOMAIN, view.bundle, view.bundle_sequence, view.jwt_keys).jwks


async def test_a_jwt_key_is_published_before_it_signs_and_stays_until_its_tokens_expire(
    tmp_path: Path,
) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    journal = authorities.view.authorities
    (first,) = journal.select(AuthorityKind.JWT_KEY)
    assert first.state == AuthorityState.ACTIVE, "the first key of a trust domain signs at once"
    assert authorities.jwt_signer().kid == first.id
    audit = MemoryAuditLog()
    service = _signer(authorities, clock, audit)
    old_token = (await service.sign(_request())).token
    assert jwt.get_unverified_header(old_token)["kid"] == first.id

    # Half its life: the successor is prepared and published, but does not sign yet.
    clock.advance(POLICY.jwt_key_ttl / 2)
    reports = authorities.tick()
    assert [r.step for r in reports] == [Step.PREPARE_JWT_KEY]
    successor = authorities.view.authorities.prepared_jwt_key
    assert successor is not None
    assert [k.kid for k in authorities.view.jwt_keys] == [first.id, successor.id]
    assert successor.id in json.loads(_jwks(authorities))["keys"][1]["kid"]
    signed = await service.sign(_request())
    assert signed.kid == first.id, "a published key signs nothing before the delay"

    # Just before the propagation delay is over: still the first key.
    clock.advance(POLICY.propagation_delay - timedelta(seconds=1))
    assert authorities.tick() == []
    assert (await service.sign(_request())).kid == first.id

    clock.advance(timedelta(seconds=1))
    assert [r.step for r in authorities.tick()] == [Step.ACTIVATE_JWT_KEY]
    assert authorities.jwt_signer().kid == successor.id
    new_token = (await service.sign(_request())).token
    assert jwt.get_unverified_header(new_token)["kid"] == successor.id
    retired = authorities.view.authorities.get(first.id)
    assert retired is not None and retired.state == AuthorityState.RETIRED
    # The retired key stays in the JWKS: tokens it signed still verify.
    jwks = _jwks(authorities)
    assert _verify(old_token, jwks)["sub"] == WEB_ID
    assert _verify(new_token, jwks)["sub"] == WEB_ID

    # Once every token it signed has expired, it is removed and its key deleted.
    clock.advance(POLICY.max_jwt_svid_ttl - timedelta(seconds=1))
    assert authorities.tick() == []
    assert first.id in [k.kid for k in authorities.view.jwt_keys]
    clock.advance(timedelta(seconds=1))
    assert [r.step for r in authorities.tick()] == [Step.REMOVE]
    assert [k.kid for k in authorities.view.jwt_keys] == [successor.id]
    assert (
        first.key_ref is not None
        and first.key_ref not in FileKeyManager(tmp_path / "ca").key_refs()
    )
    with pytest.raises(jwt.InvalidKeyError):
        _verify(old_token, _jwks(authorities))
    assert _verify(new_token, _jwks(authorities))["sub"] == WEB_ID


async def test_jwt_keys_are_off_unless_the_policy_says_so(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    off = replace(POLICY, jwt_keys=False)
    authorities = _authorities(tmp_path, clock, off)
    authorities.bootstrap()
    assert authorities.view.authorities.select(AuthorityKind.JWT_KEY) == ()
    audit = MemoryAuditLog()
    with pytest.raises(AuthorityNotReady):
        await _signer(authorities, clock, audit).sign(_request())
    (record,) = audit.records
    assert record.outcome == Outcome.REFUSED and record.reason == "jwt-key-not-ready"


async def test_issued_record_has_jti_audiences_and_hash_never_the_token(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    audit = MemoryAuditLog()
    signed = await _signer(authorities, clock, audit).sign(
        _request(audiences=("b", "a"), spiffe_id=WEB_ID, requested_ttl=timedelta(minutes=2))
    )
    claims = _verify(signed.token, _jwks(authorities), audience="a")
    assert claims["sub"] == WEB_ID and claims["aud"] == ["b", "a"]
    assert claims["iss"] == "https://meshca.example.org"
    assert claims["exp"] == int((NOW + timedelta(minutes=2)).timestamp())
    assert claims["jti"] == signed.jti
    (record,) = audit.records
    assert record.outcome == Outcome.ISSUED and record.reason == "ok"
    assert record.serial == signed.jti and record.spiffe_id == WEB_ID
    assert record.fingerprint_sha256 == hashlib.sha256(signed.token.encode()).hexdigest()
    assert record.detail == 'aud=["b", "a"]'
    assert record.not_before == NOW and record.not_after == NOW + timedelta(minutes=2)
    assert record.namespace == "shop" and record.pod_uid == "u1"
    signature = signed.token.rsplit(".", 1)[1]
    assert all(signature not in str(getattr(record, f.name)) for f in fields(record))


@pytest.mark.parametrize(
    ("changes", "error", "reason"),
    [
        pytest.param({"audiences": ()}, InvalidRequest, "jwt-audience-missing", id="no-audience"),
        pytest.param(
            {"audiences": tuple(f"a{i}" for i in range(1000))},
            InvalidRequest,
            "jwt-too-many-audiences",
            id="1000-audiences",
        ),
        pytest.param(
            {"audiences": ("a" * 100_000,)}, InvalidRequest, "jwt-audience-too-large", id="huge"
        ),
        pytest.param(
            {"spiffe_id": "spiffe://example.org/ns/shop/sa/db"},
            NotAuthorized,
            "jwt-spiffe-id-mismatch",
            id="other-spiffe-id",
        ),
        pytest.param(
            {"spiffe_id": "spiffe://other.org/ns/shop/sa/web"},
            NotAuthorized,
            "jwt-spiffe-id-mismatch",
            id="other-trust-domain",
        ),
        pytest.param(
            {"spiffe_id": "not a spiffe id"}, InvalidSpiffeId, "invalid-spiffe-id", id="garbage-id"
        ),
        pytest.param(
            {"spiffe_id": "spiffe://example.org/" + "a" * 5000},
            InvalidSpiffeId,
            "invalid-spiffe-id",
            id="huge-id",
        ),
        pytest.param({"token": "forged"}, AuthenticationFailed, "token-invalid", id="bad-token"),
        pytest.param({"token": None}, AuthenticationFailed, "token-missing", id="no-token"),
        pytest.param(
            {"requested_ttl": timedelta(minutes=11)}, InvalidRequest, "jwt-ttl-too-long", id="ttl"
        ),
    ],
)
async def test_refusals_are_recorded_and_sign_nothing(
    tmp_path: Path, changes: dict[str, object], error: type[Exception], reason: str
) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    audit = MemoryAuditLog()
    with pytest.raises(error) as caught:
        await _signer(authorities, clock, audit).sign(_request(**changes))
    assert caught.value.reason == reason  # type: ignore[attr-defined]
    (record,) = audit.records
    assert record.outcome == Outcome.REFUSED and record.reason == reason
    assert record.serial is None and record.fingerprint_sha256 is None
    assert len(record.detail) <= 1000
    if reason.startswith("token"):
        assert record.spiffe_id is None
    else:
        assert record.spiffe_id == WEB_ID, "an attested caller is named in its refusal"


async def test_no_token_leaves_when_its_record_cannot_be_written(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    audit = MemoryAuditLog(fail=True)
    with pytest.raises(BackendUnavailable):
        await _signer(authorities, clock, audit).sign(_request())
    assert audit.records == [] and audit.failures == 1


async def test_a_journal_from_before_jwt_keys_gets_one_at_the_next_tick(tmp_path: Path) -> None:
    """An existing CA upgraded: its roots are untouched, and the first JWT key (with none to
    replace) signs at once; the bundle version grows by one for it."""
    clock = FakeClock(NOW)
    before = replace(POLICY, jwt_keys=False)
    old = _authorities(tmp_path, clock, before)
    old.bootstrap()
    signature = old.view.authorities.signature()
    sequence = old.view.bundle_sequence
    clock.advance(timedelta(days=3))
    upgraded = _authorities(tmp_path, clock, POLICY)
    upgraded.refresh()
    assert [r.step for r in upgraded.tick()] == [Step.PREPARE_JWT_KEY, Step.ACTIVATE_JWT_KEY]
    view = upgraded.view
    assert set(signature) < set(view.authorities.signature())
    assert view.bundle_sequence == sequence + 1
    assert upgraded.jwt_signer().kid == view.jwt_keys[0].kid


@pytest.mark.parametrize(
    ("kind", "value", "refused"),
    [
        pytest.param(DenyKind.SPIFFE_ID, WEB_ID, True, id="fail/denied-id"),
        pytest.param(
            DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop", True, id="fail/prefix"
        ),
        pytest.param(DenyKind.SPIFFE_ID, WEB_ID + "x", False, id="ok/other-id"),
        pytest.param(
            DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/sho", False, id="ok/not-a-segment"
        ),
    ],
)
async def test_the_deny_list_refuses_jwt_svids_too(
    tmp_path: Path, kind: DenyKind, value: str, refused: bool
) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    entry = DenyEntry(
        id=7,
        kind=kind,
        value=value,
        reason="stolen",
        requested_by="alice",
        created_at=NOW - timedelta(minutes=1),
    )
    audit = MemoryAuditLog()
    service = JwtSvidService(
        trust_domain=TRUST_DOMAIN,
        attestor=FakeAttestor({"web-token": WEB}),
        audit_log=audit,
        signer=authorities.jwt_signer,
        clock=clock,
        max_ttl=POLICY.max_jwt_svid_ttl,
        new_jti=lambda: f"{new_serial():x}",
        deny_list=lambda: DenyList(1, (entry,)),
    )
    if not refused:
        assert (await service.sign(_request())).spiffe_id == SpiffeId.parse(WEB_ID)
        return
    with pytest.raises(Revoked, match="deny-list entry 7"):
        await service.sign(_request())
    (record,) = audit.records
    assert record.outcome == Outcome.REFUSED and record.reason == "revoked"
    assert record.spiffe_id == WEB_ID


async def test_a_refusal_at_the_door_is_recorded(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    authorities = _authorities(tmp_path, clock, POLICY)
    authorities.bootstrap()
    audit = MemoryAuditLog()
    await _signer(authorities, clock, audit).record_refusal(
        "meshca.v1.SignJwtSvid", "ipv4:10.0.0.9:5", RequestTooLarge("too big")
    )
    (record,) = audit.records
    assert (record.outcome, record.api, record.reason, record.peer) == (
        Outcome.REFUSED,
        "meshca.v1.SignJwtSvid",
        "request-too-large",
        "ipv4:10.0.0.9:5",
    )
