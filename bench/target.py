"""What the runner needs to know about a running system under test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Counter", "Target"]


@dataclass(frozen=True)
class Counter:
    """A count the server keeps of its own work, read before and after a measured run.

    The runner compares its change with the number of requests h2load completed: with
    ``exact`` it must be equal, otherwise at least as large (a log that also records the
    server's own housekeeping). ``what`` names it in the reason for an INVALID run.
    """

    what: str
    read: Callable[[], int]
    exact: bool = True


@dataclass(frozen=True)
class Target:
    """A started server, ready for h2load, with its request body already written.

    ``counters`` prove the work was done, because a 2xx status does not always mean a
    certificate: gRPC reports errors in trailers h2load does not read, so meshca's
    issuance record is counted; OpenBao with raft storage also proves that every request
    reached its audit file and its raft log.

    ``pgid`` is the server's process group. ``extra_trees`` are the root pids of other
    process trees that belong to the system and whose CPU counts as the system's: the
    postmaster of meshca-pg's PostgreSQL, whose children each run in a session of their
    own, so a process group would miss them.
    """

    name: str
    url: str
    headers: Sequence[str]
    body: Path
    http1: bool
    pgid: int
    counters: tuple[Counter, ...] = ()
    extra_trees: tuple[int, ...] = ()

    @property
    def issued_count(self) -> Callable[[], int] | None:
        """The first exact counter (meshca's issued records), for scripts that need one."""
        return next((c.read for c in self.counters if c.exact), None)
