"""The process's open-files limit: raised to the hard limit, and the share for connections.

Every connection is a file descriptor. A soft RLIMIT_NOFILE of 1,024 (a common default)
would make accept() fail with EMFILE long before memory runs short, so a worker raises
its soft limit to the hard one at start, as Go programs do since Go 1.19 and as Envoy's
documentation asks of its operators. The connection cap keeps the rest for files.
"""

from __future__ import annotations

import contextlib
import resource

__all__ = ["MAX_CONNECTIONS_PER_WORKER", "connection_cap", "raise_open_files_limit"]

#: Connections one worker holds at most, whatever the limit: ~11 KiB each when idle
#: (bench/floods.py), so ~220 MiB. Idle ones are closed after the idle limit anyway.
MAX_CONNECTIONS_PER_WORKER = 20_000
#: Descriptors kept for everything else: database files, Vault, logs, the record writer.
_RESERVED = 1024


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit if allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_cap(open_files: int) -> int:
    """Connections to accept at once under ``open_files`` descriptors (at least 64)."""
    if open_files == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_PER_WORKER
    reserved = min(_RESERVED, open_files // 4)
    return max(64, min(MAX_CONNECTIONS_PER_WORKER, open_files - reserved))
