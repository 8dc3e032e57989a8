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
import signal
import socket
import threading
from collections.abc import Callable, Sequence

from meshca.adapters.storage.host_writer import HostRecordWriter

__all__ = ["WorkerPool"]

log = logging.getLogger("meshca")


class WorkerPool:
    """``count`` processes running ``target(listen, record_socket)``, then the writer.

    ``run`` returns an exit code: 0 when every worker stopped on SIGTERM or SIGINT (sent
    to the supervisor, which passes it on), 1 when one failed or the record writer
    stopped under them. The record writer keeps serving until every worker has exited,
    so their last records are committed.
    """

    def __init__(
        self,
        count: int,
        listen: str,
        target: Callable[[str, socket.socket], None],
        writer: Callable[[Sequence[socket.socket]], HostRecordWriter],
    ) -> None:
        if count < 1:
            raise ValueError(f"at least one worker is needed, not {count}")
        self._count = count
        self._listen = listen
        self._target = target
        self._make_writer = writer

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
        try:
            for process in workers:
                process.start()
            for _, theirs in pairs:
                # The child holds its own copy now: when it exits, the writer sees EOF.
                theirs.close()
            log.info("started %d workers on %s", len(workers), listen)
            return self._supervise(workers, writer_gone)
        finally:
            _stop(workers)
            for process in workers:
                if process.pid is not None:
                    process.join()
            writer.stop()
            writing.join()
            writer_gone.close()
            if placeholder is not None:
                placeholder.close()

    def _supervise(
        self, workers: Sequence[multiprocessing.process.BaseProcess], writer_gone: socket.socket
    ) -> int:
        previous = {
            sig: signal.signal(sig, lambda *_: _stop(workers))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            # If one worker dies, or the writer under them, stop the rest: a supervisor
            # above restarts us whole.
            ready = multiprocessing.connection.wait([writer_gone, *(p.sentinel for p in workers)])
            _stop(workers)
            exit_code = 0
            if writer_gone in ready:
                log.error("the issuance-record writer stopped; stopping the workers")
                exit_code = 1
            for process in workers:
                process.join()
                if process.exitcode not in (0, -signal.SIGTERM):
                    exit_code = 1
            return exit_code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _run_then_close(run: Callable[[], None], done: socket.socket) -> None:
    try:
        run()
    except Exception:
        log.exception("the issuance-record writer failed")
    finally:
        done.close()


def _stop(workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for process in workers:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()


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
