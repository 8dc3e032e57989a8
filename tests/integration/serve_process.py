"""A real ``meshca serve`` process tree in its own session, so that it can be killed whole,
with its output collected and its port and workers known."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The repository root: spawned workers import ``meshca`` (and test entry points) from it.
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServeProcess:
    """One ``meshca serve`` process tree: the supervisor (session leader) and its workers."""

    name: str
    data_dir: Path
    process: subprocess.Popen[str]
    output: list[str]
    port: int = 0
    reader: threading.Thread | None = None
    #: Set once every worker logged "serving on" (or the output ended).
    serving: threading.Event = field(default_factory=threading.Event)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self, last: int = 40) -> str:
        return "".join(self.output[-last:])

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (not multiprocessing's resource tracker)."""
        pid = self.process.pid
        children: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children += [int(c) for c in listing.read().split()]
        workers = []
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    if b"spawn_main" in cmdline.read():
                        workers.append(child)
            except FileNotFoundError:
                continue  # exited meanwhile
        return workers

    def stop(self, timeout: float = 20) -> int:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close_output()

    def kill(self) -> None:
        """SIGKILL the whole process group (whatever is left of it), then reap the leader."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        self.process.wait()
        self._close_output()

    def _close_output(self) -> None:
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: they hold no
    port, lock or file any more, and who reaps them (an orphan's init) is not ours."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def launch(
    name: str,
    data_dir: Path,
    command: Sequence[str],
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    wait: float | None = 60,
) -> ServeProcess:
    """Start ``command`` (a ``meshca serve`` line) in a new session; with ``wait``, until
    each of its ``workers`` logs that it serves (or ``wait`` seconds pass)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MESHCA_", "REPLICA_"))}
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p
    )
    environ.update(env or {})
    process = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        start_new_session=True,
        cwd=REPO,
    )
    server = ServeProcess(name, data_dir, process, [])

    def collect() -> None:
        assert process.stdout is not None
        serving = 0
        for line in process.stdout:
            server.output.append(line)
            found = re.search(r"started \d+ workers on [\d.]+:(\d+)", line)
            if found:
                server.port = int(found.group(1))
            if "serving on" in line:
                serving += 1
                if serving == workers:
                    server.serving.set()
        server.serving.set()

    server.reader = threading.Thread(target=collect, name=f"{name}-output", daemon=True)
    server.reader.start()
    if wait is not None:
        ready = server.serving.wait(wait)
        assert ready and server.alive and server.port, server.log()
    return server
