"""WorkerPool: worker processes on one port and the record writer they depend on."""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from meshca.adapters.worker_pool import WorkerPool

NO_HANG = 30.0


def serve_until_terminated(listen: str, record_socket: socket.socket) -> None:
    """A worker that does nothing until SIGTERM (the pool's way to stop it)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait(NO_HANG)


def exit_at_once(listen: str, record_socket: socket.socket) -> None:
    record_socket.close()


def ignore_sigterm(ready: Path, listen: str, record_socket: socket.socket) -> None:
    """A worker whose drain never ends: only SIGKILL stops it. Says so in ``ready``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    (ready / str(os.getpid())).touch()
    time.sleep(NO_HANG)


class Writer:
    """A stand-in record writer: serves until stopped, or fails when told to."""

    def __init__(self, connections: Sequence[socket.socket], fail: bool) -> None:
        self.connections = connections
        self.fail = fail
        self.stopped = threading.Event()
        self.ran = False

    def run(self) -> None:
        self.ran = True
        try:
            if self.fail:
                raise RuntimeError("the database is gone for good")
            self.stopped.wait(NO_HANG)
        finally:
            for connection in self.connections:  # as HostRecordWriter does: they are its
                connection.close()

    def stop(self) -> None:
        self.stopped.set()


def _pool(target: Any, fail: bool, grace: float = 10.0) -> tuple[WorkerPool, list[Writer]]:
    made: list[Writer] = []

    def writer(connections: Sequence[socket.socket]) -> Writer:
        made.append(Writer(connections, fail))
        return made[-1]

    pool = WorkerPool(2, "127.0.0.1:0", target=target, writer=writer, grace=grace)  # type: ignore[arg-type]
    return pool, made


def _signal_self_when_ready(ready: Path, times: int, gap: float) -> threading.Thread:
    """SIGTERM this process ``times`` times once both workers ignore SIGTERM (the pool's
    handler is set by then)."""

    def send() -> None:
        deadline = time.monotonic() + NO_HANG
        while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(gap)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def test_a_failed_writer_stops_the_workers_and_fails_the_pool() -> None:
    pool, made = _pool(serve_until_terminated, fail=True)
    started = time.monotonic()
    assert pool.run() == 1
    assert time.monotonic() - started < NO_HANG / 2  # the workers did not sit out their wait
    assert made[0].ran and len(made[0].connections) == 2


def test_workers_that_finish_end_the_pool_cleanly() -> None:
    pool, made = _pool(exit_at_once, fail=False)
    assert pool.run() == 0
    assert made[0].stopped.is_set()  # the writer was told to finish after the workers


def test_workers_still_draining_after_the_grace_are_killed(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    pool, made = _pool(functools.partial(ignore_sigterm, tmp_path), fail=False, grace=0.5)
    sender = _signal_self_when_ready(tmp_path, times=1, gap=0)
    assert pool.run() == 1  # a killed worker is a failed drain
    ended = time.monotonic()
    sender.join()
    # Killed at the grace's end, not left to sit out their 30 s.
    assert "2 worker(s) still running 0.5s after the stop began: killing them" in caplog.text
    assert ended - min(p.stat().st_mtime for p in tmp_path.iterdir()) < NO_HANG / 2
    assert made[0].stopped.is_set()  # the writer served until the workers were gone
    assert "2 worker(s) still running 0.5s after the stop began: killing them" in caplog.text
    assert made[0].stopped.is_set()  # the writer served until they were gone


def test_a_second_signal_kills_the_workers_at_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    pool, _ = _pool(functools.partial(ignore_sigterm, tmp_path), fail=False, grace=NO_HANG)
    sender = _signal_self_when_ready(tmp_path, times=2, gap=0.2)
    started = time.monotonic()
    assert pool.run() == 1
    sender.join()
    assert time.monotonic() - started < NO_HANG / 2
    assert "SIGTERM again: killing the workers now" in caplog.text
    # The pool put the test process's own handler back.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
