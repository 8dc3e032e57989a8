"""Server processes for the bench: free ports, process groups, CPU accounting from /proc.

Every server runs in its own session, so stopping its process group also stops whatever it
forked (meshca's worker processes). CPU time is read from /proc, so Linux only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOCALHOST",
    "CpuSample",
    "cpu_seconds",
    "free_port",
    "group_cpu_seconds",
    "machine_cpu",
    "managed_group",
    "stop_group",
]

LOCALHOST = "127.0.0.1"
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL whatever is left after ``grace``.

    Returns once ``proc`` is reaped and no process of the group remains (or after one more
    ``grace`` period if a member will not die, which is then left to init).
    """
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid) or proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def managed_group(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` as the leader of a new session; its output goes to ``log_path``.

    The whole process group is stopped when the block exits, however it exits.
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def group_cpu_seconds(pgid: int) -> float:
    """User plus system CPU seconds used so far by the live processes of group ``pgid``.

    See ``cpu_seconds`` for what is counted.
    """
    return cpu_seconds(pgids=(pgid,))


def cpu_seconds(pgids: Iterable[int] = (), trees: Iterable[int] = ()) -> float:
    """CPU seconds used so far by the processes of groups ``pgids`` and of ``trees``.

    A tree is a process and all its live descendants, for servers whose children leave
    its process group (PostgreSQL's postmaster puts each child in a session of its own).
    Each process is counted once, with its user and system time and that of the children
    it has reaped, so a short-lived child (a PostgreSQL backend, say) still counts after
    it exits, through its parent. A process that is reaped by one outside the set is
    lost, so take both samples of a measurement while membership is stable.
    """
    groups, roots = set(pgids), set(trees)
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgrp, _ticks) in table.items():
        children.setdefault(ppid, []).append(pid)
    chosen = {pid for pid, (_ppid, pgrp, _ticks) in table.items() if pgrp in groups}
    in_trees: set[int] = set()
    pending = [root for root in roots if root in table]
    while pending:
        pid = pending.pop()
        if pid not in in_trees:
            in_trees.add(pid)
            pending.extend(children.get(pid, ()))
    return sum(table[pid][2] for pid in chosen | in_trees) / _TICKS


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgrp, CPU ticks of itself and its reaped children), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Field 2 (comm) may contain spaces; everything after its closing ')' is fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): ppid is field 4, pgrp 5, utime 14, stime 15, and
        # the reaped children's cutime 16 and cstime 17.
        ticks = sum(int(v) for v in fields[11:15])
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), ticks)
    return table


@dataclass(frozen=True)
class CpuSample:
    """Whole-machine CPU counters from /proc/stat, in clock ticks."""

    busy: int
    steal: int
    total: int

    def busy_fraction_since(self, earlier: CpuSample) -> float:
        """Share of all cores' time spent running something here since ``earlier``."""
        total = self.total - earlier.total
        return (self.busy - earlier.busy) / total if total else 0.0

    def steal_fraction_since(self, earlier: CpuSample) -> float:
        """Share of all cores' time the hypervisor gave to other guests since ``earlier``."""
        total = self.total - earlier.total
        return (self.steal - earlier.steal) / total if total else 0.0


def machine_cpu() -> CpuSample:
    """The aggregate ``cpu`` line of /proc/stat.

    Busy is user, nice, system, irq and softirq (guest time is already inside user); idle
    and iowait are not busy; steal is kept apart, as it is time this machine did not get.
    """
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(v) for v in stat.readline().split()[1:9]
        )
    busy = user + nice + system + irq + softirq
    return CpuSample(busy=busy, steal=steal, total=busy + idle + iowait + steal)
