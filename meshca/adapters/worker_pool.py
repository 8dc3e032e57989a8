"""The worker processes of ``meshca serve`` on one port, and the host's record writer.

Python signs on one core per process, so ``serve`` runs one worker process per core,
all listening on one port (SO_REUSEPORT; the kernel spreads connections). This process,
the supervisor, serves no requests: it runs the host's issuance-record writer for them
(``storage.host_writer``), each worker holding one end of a socket pair to it, and it
stops every worker when one dies, so that a supervisor above (Kubernetes) restarts the
whole set. A worker whose writer is gone (the supervisor was killed alone) stops too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence

from meshca.adapters.storage.host_writer import HostRecordWriter
from meshca.core.shutdown import Shutdown, SignalAction

__all__ = ["WorkerPool"]

log = logging.getLogger("meshca")

#: Seconds the record writer gets, after the last worker exited, to commit what they sent.
WRITER_MARGIN = 1.0


class WorkerPool:
    """``count`` processes running ``target(listen, record_socket)``, then the writer.

    ``run`` returns an exit code: 0 when every worker stopped on SIGTERM or SIGINT (sent
    to the supervisor, which passes it on) within ``grace`` seconds, 1 when one failed,
    the record writer stopped under them, or a worker had to be killed. The record
    writer keeps serving until every worker has exited, so their last records are
    committed. A worker still alive ``grace`` seconds after the stop began is killed
    (SIGKILL), as is every worker at a second SIGTERM or SIGINT; the supervisor then
    exits within ``WRITER_MARGIN`` more seconds.
    """

    def __init__(
        self,
        count: int,
        listen: str,
        target: Callable[[str, socket.socket], None],
        writer: Callable[[Sequence[socket.socket]], HostRecordWriter],
        grace: float = 10.0,
    ) -> None:
        if count < 1:
            raise ValueError(f"at least one worker is needed, not {count}")
        self._count = count
        self._listen = listen
        self._target = target
        self._make_writer = writer
        self._shutdown = Shutdown(grace, repeat_cuts_short=True)

    def run(self) -> int:
        listen, placeholder = _reserve_port(self._listen)
        pairs = [socket.socketpair() for _ in range(self._count)]
        writer = self._make_writer([ours for ours, _ in pairs])
        # Closed when the writer's thread ends, however it ends: the supervisor wakes.
        writer_done, writer_gone = socket.socketpair()
        writing = threading.Thread(
            target=_run_then_close, args=(writer.run, writer_done), name="meshca-host-writer"
        )
        writing.daemon = True
        writing.start()
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=self._target, args=(listen, theirs), name=f"worker-{i}")
            for i, (_, theirs) in enumerate(pairs)
        ]
        signals = _SignalQueue()
        try:
            for process in workers:
                process.start()
            for _, theirs in pairs:
                # The child holds its own copy now: when it exits, the writer sees EOF.
                theirs.close()
            log.info("started %d workers on %s", len(workers), listen)
            return self._supervise(workers, writer_gone, signals)
        finally:
            self._begin_stop(workers)
            self._await_exit(workers, signals)
            writer.stop()
            # A writer stuck on the database holds no certificate back: the workers that
            # waited for it are gone, and their calls failed.
            writing.join(WRITER_MARGIN)
            if writing.is_alive():
                log.error(
                    "the issuance-record writer did not finish within %gs; exiting", WRITER_MARGIN
                )
            writer_gone.close()
            signals.close()
            if placeholder is not None:
                placeholder.close()

    def _supervise(
        self,
        workers: Sequence[multiprocessing.process.BaseProcess],
        writer_gone: socket.socket,
        signals: _SignalQueue,
    ) -> int:
        # If one worker dies, or the writer under them, stop the rest: a supervisor above
        # restarts us whole.
        failed = False
        while self._shutdown.started is None:
            ready = multiprocessing.connection.wait(
                [writer_gone, signals.readable, *(p.sentinel for p in workers)]
            )
            if signals.readable in ready:
                for sig in signals.take():
                    self._on_signal(sig, workers)
            if writer_gone in ready:
                log.error("the issuance-record writer stopped; stopping the workers")
                failed = True
                break
            exited = [p for p in workers if not p.is_alive()]
            if exited and self._shutdown.started is None:
                # Its exit code says whether it failed.
                log.warning(
                    "%s exited (%s); stopping the others", exited[0].name, exited[0].exitcode
                )
                break
        self._begin_stop(workers)
        killed = self._await_exit(workers, signals)
        for process in workers:
            if process.exitcode not in (0, -signal.SIGTERM):
                failed = True
        return 1 if failed or killed else 0

    def _on_signal(
        self, sig: signal.Signals, workers: Sequence[multiprocessing.process.BaseProcess]
    ) -> None:
        match self._shutdown.signal(time.monotonic()):
            case SignalAction.DRAIN:
                log.info(
                    "%s: stopping the workers; calls in flight have up to %gs",
                    sig.name,
                    self._shutdown.grace,
                )
                _signal_all(workers, signal.SIGTERM)
            case SignalAction.CUT_SHORT:
                log.warning("%s again: killing the workers now", sig.name)
                _signal_all(workers, signal.SIGKILL)
            case SignalAction.IGNORE:
                pass

    def _begin_stop(self, workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
        """SIGTERM every worker, once; the grace starts now unless a signal started it."""
        if self._shutdown.started is None:
            self._shutdown.signal(time.monotonic())
            _signal_all(workers, signal.SIGTERM)

    def _await_exit(
        self, workers: Sequence[multiprocessing.process.BaseProcess], signals: _SignalQueue
    ) -> bool:
        """Wait for every worker until the grace is over, then kill the rest.

        Returns whether any had to be killed. A second stop signal kills them at once.
        """
        while True:
            alive = [p for p in workers if p.is_alive()]
            left = self._shutdown.remaining(time.monotonic()) or 0.0
            if not alive or left <= 0:
                break
            ready = multiprocessing.connection.wait(
                [signals.readable, *(p.sentinel for p in alive)], left
            )
            if signals.readable in ready:
                for sig in signals.take():
                    self._on_signal(sig, workers)
        alive = [p for p in workers if p.is_alive()]
        if alive and not self._shutdown.cut_short:
            log.error(
                "%d worker(s) still running %gs after the stop began: killing them "
                "(their calls in flight fail; no certificate left without its record)",
                len(alive),
                self._shutdown.grace,
            )
        _signal_all(alive, signal.SIGKILL)
        for process in workers:
            if process.pid is not None:
                process.join()
        return bool(alive)


class _SignalQueue:
    """SIGTERM and SIGINT as bytes on a socket, for ``multiprocessing.connection.wait``.

    The handler only records the signal; the supervisor acts on it in its own loop.
    """

    def __init__(self) -> None:
        self.readable, self._writable = socket.socketpair()
        self.readable.setblocking(False)
        self._writable.setblocking(False)
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            self._writable.send(bytes([signum]))

    def take(self) -> list[signal.Signals]:
        received = b""
        with contextlib.suppress(BlockingIOError):
            received = self.readable.recv(64)
        return [signal.Signals(b) for b in received]

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.readable.close()
        self._writable.close()


def _run_then_close(run: Callable[[], None], done: socket.socket) -> None:
    try:
        run()
    except Exception:
        log.exception("the issuance-record writer failed")
    finally:
        done.close()


def _signal_all(workers: Sequence[multiprocessing.process.BaseProcess], sig: int) -> None:
    for process in workers:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)


def _reserve_port(listen: str) -> tuple[str, socket.socket | None]:
    """``listen`` with a concrete port; for port 0, a placeholder socket that keeps it ours.

    A bound socket that never listens gets no connections, but keeps the port ours
    while the workers bind it too.
    """
    host, _, port_text = listen.rpartition(":")
    if int(port_text) != 0:
        return listen, None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    placeholder = socket.socket(family, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind((host.strip("[]"), 0))
    return f"{host}:{placeholder.getsockname()[1]}", placeholder
