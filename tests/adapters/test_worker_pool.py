"""WorkerPool: worker processes on one port and the record writer they depend on."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from meshca.adapters.worker_pool import WorkerPool

NO_HANG = 30.0


def serve_until_terminated(listen: str, record_socket: socket.socket) -> None:
    """A worker that does nothing until SIGTERM (the pool's way to stop it)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait(NO_HANG)


def exit_at_once(listen: str, record_socket: socket.socket) -> None:
    record_socket.close()


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


def _pool(target: Any, fail: bool) -> tuple[WorkerPool, list[Writer]]:
    made: list[Writer] = []

    def writer(connections: Sequence[socket.socket]) -> Writer:
        made.append(Writer(connections, fail))
        return made[-1]

    return WorkerPool(2, "127.0.0.1:0", target=target, writer=writer), made  # type: ignore[arg-type]


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
