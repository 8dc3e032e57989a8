"""The call gate: admits and counts calls until closed, then refuses and ends streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshca.adapters.grpc.gate import CallGate


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admits_counts_then_refuses() -> None:
    gate = CallGate()
    assert gate.admit() and gate.admit()
    assert gate.in_flight == 2
    gate.release()
    gate.close()
    assert gate.closed
    assert not gate.admit()
    assert not gate.admit_stream()
    assert gate.in_flight == 1  # a refused call is not counted


async def test_idle_waits_for_admitted_calls() -> None:
    gate = CallGate()
    assert gate.admit()
    gate.close()
    waiting = asyncio.create_task(gate.idle(within=5.0, quiet=0.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    gate.release()
    assert await asyncio.wait_for(waiting, 1.0) is True


async def test_idle_gives_up_after_within() -> None:
    gate = CallGate()
    assert gate.admit()
    gate.close()
    assert await gate.idle(within=0.05, quiet=0.0) is False


async def test_idle_waits_until_refused_calls_stop_knocking() -> None:
    clock = ManualClock()
    gate = CallGate(clock)
    gate.close()
    waiting = asyncio.create_task(gate.idle(within=10.0, quiet=1.0))
    await asyncio.sleep(0.03)
    clock.now = 0.5
    assert not gate.admit()  # knocks at 0.5: quiet from then on
    clock.now = 1.2
    await asyncio.sleep(0.03)
    assert not waiting.done()
    clock.now = 1.6
    assert await asyncio.wait_for(waiting, 1.0) is True


async def test_until_closed_ends_a_stream_and_closes_it() -> None:
    gate = CallGate()
    finished = asyncio.Event()

    async def watch() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # a watch with nothing new to say
            yield 2
        finally:
            finished.set()

    received: list[int] = []

    async def consume() -> None:
        async for item in gate.until_closed(watch()):
            received.append(item)

    consuming = asyncio.create_task(consume())
    await asyncio.sleep(0.02)
    gate.close()
    await asyncio.wait_for(consuming, 1.0)
    assert received == [1]
    assert finished.is_set()


async def test_until_closed_passes_a_finite_stream_through() -> None:
    gate = CallGate()

    async def items() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    assert [i async for i in gate.until_closed(items())] == [0, 1, 2]


async def test_a_cancelled_call_closes_its_stream_cleanly() -> None:
    """The client cancels a watch while it waits: the stream closes, no RuntimeError."""
    gate = CallGate()
    finished = asyncio.Event()

    async def watch() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
        finally:
            finished.set()

    async def consume() -> None:
        async for _item in gate.until_closed(watch()):
            pass

    consuming = asyncio.create_task(consume())
    await asyncio.sleep(0.02)
    consuming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(consuming, 1.0)
    assert finished.is_set()
