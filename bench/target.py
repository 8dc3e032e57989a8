"""What the runner needs to know about a running system under test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Target"]


@dataclass(frozen=True)
class Target:
    """A started server, ready for h2load, with its request body already written.

    ``issued_count``, when set, reads the server's own record of certificates issued; the
    runner compares its change with h2load's success count, because an HTTP 200 does not
    mean a certificate (gRPC reports errors in trailers h2load does not read).
    """

    name: str
    url: str
    headers: Sequence[str]
    body: Path
    http1: bool
    pgid: int
    issued_count: Callable[[], int] | None = None
