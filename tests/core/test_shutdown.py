"""How the shutdown grace is split, and what each stop signal means."""

from __future__ import annotations

import pytest

from meshca.core.shutdown import MAX_CLEANUP, DrainBudget, Shutdown, SignalAction


@pytest.mark.parametrize(
    ("grace", "calls", "cleanup"),
    [
        pytest.param(10.0, 9.0, 1.0, id="ok/default-grace-keeps-one-second"),
        pytest.param(2.0, 1.6, 0.4, id="ok/short-grace-keeps-a-fifth"),
        pytest.param(0.1, 0.08, 0.02, id="ok/tiny-grace"),
        pytest.param(600.0, 599.0, MAX_CLEANUP, id="ok/long-grace-cleanup-capped"),
    ],
)
def test_budget_split(grace: float, calls: float, cleanup: float) -> None:
    budget = DrainBudget(grace)
    assert budget.calls == pytest.approx(calls)
    assert budget.cleanup == pytest.approx(cleanup)
    assert budget.calls + budget.cleanup == pytest.approx(grace)


@pytest.mark.parametrize("grace", [0.0, -1.0], ids=["fail/zero", "fail/negative"])
def test_grace_must_be_positive(grace: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        DrainBudget(grace)
    with pytest.raises(ValueError, match="must be positive"):
        Shutdown(grace, repeat_cuts_short=True)


@pytest.mark.parametrize(
    ("repeat_cuts_short", "actions"),
    [
        pytest.param(
            True,
            [SignalAction.DRAIN, SignalAction.CUT_SHORT, SignalAction.IGNORE],
            id="ok/operator-process-second-signal-cuts-short",
        ),
        pytest.param(
            False,
            [SignalAction.DRAIN, SignalAction.IGNORE, SignalAction.IGNORE],
            id="ok/supervised-worker-ignores-repeats",
        ),
    ],
)
def test_signals(repeat_cuts_short: bool, actions: list[SignalAction]) -> None:
    shutdown = Shutdown(10.0, repeat_cuts_short=repeat_cuts_short)
    assert [shutdown.signal(now=100.0 + i) for i in range(3)] == actions


def test_remaining_counts_from_the_first_signal() -> None:
    shutdown = Shutdown(10.0, repeat_cuts_short=False)
    assert shutdown.remaining(50.0) is None
    shutdown.signal(100.0)
    shutdown.signal(104.0)  # ignored: the grace still runs from the first
    assert shutdown.remaining(103.0) == pytest.approx(7.0)
    assert shutdown.remaining(110.0) == 0.0
    assert shutdown.remaining(125.0) == 0.0


def test_cut_short_leaves_no_time() -> None:
    shutdown = Shutdown(10.0, repeat_cuts_short=True)
    shutdown.signal(100.0)
    assert shutdown.remaining(101.0) == pytest.approx(9.0)
    shutdown.signal(101.0)
    assert shutdown.cut_short
    assert shutdown.remaining(101.0) == 0.0
