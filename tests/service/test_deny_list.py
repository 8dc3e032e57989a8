"""The deny-list in the signing use case, and the follower that keeps it current."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.core import errors
from meshca.core.audit import Outcome
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from meshca.core.identity import KubernetesIdentity
from meshca.core.issuance import IssuancePolicy
from meshca.service.ca import CertificateService, SignRequest
from meshca.service.deny_list import DenyListFollower
from tests.core.builders import NOW, TRUST_DOMAIN, build_pki, csr_pem, private_key
from tests.fakes import FakeAttestor, FakeClock, MemoryAuditLog

WEB = KubernetesIdentity(namespace="shop", service_account="web", pod_name="w", pod_uid="u1")
API = KubernetesIdentity(namespace="shop", service_account="api", pod_name="a", pod_uid="u2")
WEB_ID = "spiffe://example.org/ns/shop/sa/web"


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


def _service(audit: MemoryAuditLog, deny: list[DenyList], clock: FakeClock) -> CertificateService:
    serials = iter(range(1 << 100, (1 << 100) + 10_000))
    return CertificateService(
        trust_domain=TRUST_DOMAIN,
        attestor=FakeAttestor({"web": WEB, "api": API}),
        audit_log=audit,
        authority=lambda: build_pki().authority,
        clock=clock,
        policy=IssuancePolicy(default_ttl=timedelta(hours=1), max_ttl=timedelta(hours=24)),
        new_serial=lambda: next(serials),
        offload=_inline,
        deny_list=lambda: deny[0],
    )


def _request(token: str, csr: bytes | None = None) -> SignRequest:
    return SignRequest(token=token, csr=csr or csr_pem(), requested_ttl=None, api="test")


def _entry(id_: int, kind: DenyKind, value: str, **kw: Any) -> DenyEntry:
    return DenyEntry(
        id=id_,
        kind=kind,
        value=value,
        reason="the key leaked to pastebin",
        requested_by="alice",
        created_at=NOW - timedelta(minutes=5),
        **kw,
    )


def _key_sha256(key: Any) -> str:
    return hashlib.sha256(
        key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(_entry(7, DenyKind.SPIFFE_ID, WEB_ID), id="deny/exact"),
        pytest.param(
            _entry(7, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop/sa/web"),
            id="deny/prefix-equal",
        ),
    ],
)
async def test_a_denied_identity_is_refused_and_recorded_naming_only_the_entry(
    entry: DenyEntry,
) -> None:
    audit = MemoryAuditLog()
    service = _service(audit, [DenyList(3, (entry,))], FakeClock(NOW))

    with pytest.raises(errors.Revoked) as caught:
        await service.sign(_request("web"))
    assert isinstance(caught.value, errors.NotAuthorized)
    assert caught.value.message == "issuance refused by deny-list entry 7"
    signed = await service.sign(_request("api"))
    assert str(signed.spiffe_id) == "spiffe://example.org/ns/shop/sa/api"

    refused, issued = audit.records
    assert (refused.outcome, refused.reason) == (Outcome.REFUSED, "revoked")
    assert refused.spiffe_id == WEB_ID and refused.serial is None
    assert "pastebin" not in refused.detail and "alice" not in refused.detail
    assert issued.outcome is Outcome.ISSUED


async def test_a_namespace_prefix_denies_every_account_in_it_and_no_neighbour() -> None:
    audit = MemoryAuditLog()
    deny = DenyList(1, (_entry(2, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/sho"),))
    service = _service(audit, [deny], FakeClock(NOW))
    await service.sign(_request("web"))  # /ns/sho is not a segment of /ns/shop

    holder = [DenyList(2, (_entry(3, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop"),))]
    service = _service(audit, holder, FakeClock(NOW))
    for token in ("web", "api"):
        with pytest.raises(errors.Revoked, match=r"entry 3$"):
            await service.sign(_request(token))


async def test_a_denied_key_is_refused_whoever_presents_it() -> None:
    leaked = private_key("ec-p256", 3)
    audit = MemoryAuditLog()
    deny = DenyList(1, (_entry(9, DenyKind.KEY_SHA256, _key_sha256(leaked)),))
    service = _service(audit, [deny], FakeClock(NOW))

    for token in ("web", "api"):
        with pytest.raises(errors.Revoked, match=r"entry 9$"):
            await service.sign(_request(token, csr_pem(leaked)))
    fresh = private_key("ec-p256", 4)
    assert (await service.sign(_request("web", csr_pem(fresh)))).spiffe_id


async def test_serial_entries_do_not_block_and_expired_or_lifted_entries_stop_denying() -> None:
    clock = FakeClock(NOW)
    audit = MemoryAuditLog()
    deny = DenyList(
        4,
        (
            _entry(1, DenyKind.SERIAL, "1f"),
            _entry(2, DenyKind.SPIFFE_ID, WEB_ID, lifted_at=NOW, lifted_by="bob"),
            _entry(3, DenyKind.SPIFFE_ID, WEB_ID, until=NOW + timedelta(minutes=1)),
        ),
    )
    service = _service(audit, [deny], clock)
    with pytest.raises(errors.Revoked, match=r"entry 3$"):
        await service.sign(_request("web"))
    clock.advance(timedelta(minutes=1))
    await service.sign(_request("web"))


async def test_a_new_list_applies_to_the_next_request() -> None:
    holder = [DenyList()]
    service = _service(MemoryAuditLog(), holder, FakeClock(NOW))
    await service.sign(_request("web"))
    holder[0] = DenyList(1, (_entry(1, DenyKind.SPIFFE_ID, WEB_ID),))
    with pytest.raises(errors.Revoked):
        await service.sign(_request("web"))
    holder[0] = DenyList(2, ())
    await service.sign(_request("web"))


# -- the follower ------------------------------------------------------------------------------


@dataclass
class CountingSource:
    """A ``DenyListSource`` that counts reads; ``down`` makes both calls fail."""

    current: DenyList = field(default_factory=DenyList)
    revisions: int = 0
    loads: int = 0
    down: bool = False

    def revision(self) -> int:
        self.revisions += 1
        if self.down:
            raise errors.BackendUnavailable("database is down")
        return self.current.revision

    def load(self) -> DenyList:
        self.loads += 1
        if self.down:
            raise errors.BackendUnavailable("database is down")
        return self.current


def test_the_follower_reloads_only_when_the_revision_changes() -> None:
    source = CountingSource()
    follower = DenyListFollower(source)
    assert not follower.refresh() and source.loads == 0
    source.current = DenyList(12, (_entry(1, DenyKind.SPIFFE_ID, WEB_ID),))
    assert follower.refresh() and follower.current() is source.current
    assert not follower.refresh() and not follower.refresh()
    assert source.loads == 1 and source.revisions == 4


async def test_the_follower_keeps_the_last_list_while_storage_is_down() -> None:
    listed = DenyList(3, (_entry(1, DenyKind.SPIFFE_ID, WEB_ID),))
    source = CountingSource(current=listed)
    follower = DenyListFollower(source)
    follower.refresh()
    source.down = True
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop, 0.01))
    await asyncio.sleep(0.1)
    assert follower.degraded is not None and "database is down" in follower.degraded
    assert follower.current() is listed
    source.down = False
    source.current = DenyList(4, ())
    for _ in range(100):
        if follower.current().revision == 4:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert follower.current().revision == 4 and follower.degraded is None
