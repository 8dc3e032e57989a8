"""The trust bundle service: versions and watchers."""

from __future__ import annotations

import asyncio

from meshca.service.bundle import TrustBundleService
from tests.core.builders import TRUST_DOMAIN, build_pki


async def test_watch_sends_now_and_on_every_change() -> None:
    first = build_pki().root
    second = build_pki(root_kind="ec-p256").root
    service = TrustBundleService(TRUST_DOMAIN, (first,))
    seen: list[int] = []

    async def watcher() -> None:
        async for snapshot in service.watch():
            seen.append(snapshot.sequence)
            if len(seen) == 3:
                return

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.01)
    assert seen == [1]
    service.publish((first, second))
    await asyncio.sleep(0.01)
    service.publish((first, second))  # unchanged: no new version
    await asyncio.sleep(0.01)
    service.publish((second,))
    await asyncio.wait_for(task, 1)
    assert seen == [1, 2, 3]
    assert service.current().roots == (second,)


async def test_a_crl_change_is_sent_with_the_same_sequence_and_survives_root_changes() -> None:
    first = build_pki().root
    second = build_pki(root_kind="ec-p256").root
    service = TrustBundleService(TRUST_DOMAIN, (first,))
    seen: list[tuple[int, tuple[bytes, ...]]] = []

    async def watcher() -> None:
        async for snapshot in service.watch():
            seen.append((snapshot.sequence, snapshot.crls))
            if len(seen) == 4:
                return

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.01)
    service.publish_crls((b"crl-1",))
    await asyncio.sleep(0.01)
    service.publish_crls((b"crl-1",))  # unchanged: nothing sent
    await asyncio.sleep(0.01)
    service.publish_crls((b"crl-1", b"crl-2"))
    await asyncio.sleep(0.01)
    service.publish((first, second))
    await asyncio.wait_for(task, 1)
    assert seen == [
        (1, ()),
        (1, (b"crl-1",)),
        (1, (b"crl-1", b"crl-2")),
        (2, (b"crl-1", b"crl-2")),
    ]
