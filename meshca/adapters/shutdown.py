"""SIGTERM and SIGINT for a serving event loop, and a watchdog for a drain that overstays.

``core.shutdown`` decides what each signal means; this module only hears them. A worker
of ``meshca serve`` needs no watchdog (its supervisor kills it at the grace's end);
``meshca dev serve`` has no supervisor, so it keeps the bound itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

from meshca.core.shutdown import Shutdown, SignalAction

__all__ = ["StopSignals", "exit_now", "start_watchdog"]

log = logging.getLogger("meshca")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT on the running loop: ``draining`` at the first, then maybe
    ``cut_short``, as ``shutdown`` decides."""

    def __init__(self, shutdown: Shutdown) -> None:
        self.shutdown = shutdown
        self.draining = asyncio.Event()
        self.cut_short = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        name = signal.Signals(sig).name
        match self.shutdown.signal(time.monotonic()):
            case SignalAction.DRAIN:
                log.info("%s: draining; calls in flight have up to %gs", name, self.shutdown.grace)
                self.draining.set()
            case SignalAction.CUT_SHORT:
                log.warning("%s again: cutting the drain short; calls in flight are aborted", name)
                self.cut_short.set()
            case SignalAction.IGNORE:
                log.info("%s during the drain: already stopping", name)


def exit_now(code: int) -> NoReturn:
    """End a drained server process at once, logs flushed.

    By now every record is committed and every connection closed; tearing the
    interpreter down (a full garbage collection over every module) would only add a
    second or two to the drain on a busy host, and count against the grace.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def start_watchdog(seconds: float, since: str) -> threading.Timer:
    """End this process (exit status 1) if it is still running ``seconds`` from now
    (``since`` names the moment, for the log).

    The last resort when a drain overstays: a thread stuck in a backend call (which the
    interpreter would wait for at exit) must not keep the process past its grace. No
    certificate leaves without its record, so ending mid-call loses none.
    """

    def expire() -> None:
        log.error("still running %gs after %s: exiting now", seconds, since)
        exit_now(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer
