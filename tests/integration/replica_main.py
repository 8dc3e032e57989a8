"""``meshca`` for replica tests, able to die with SIGKILL in the middle of a CA step.

With ``REPLICA_CRASH_AT=<checkpoint>`` (e.g. ``activate-root:before-record``),
``REPLICA_CRASH_MARK=<path>`` and ``REPLICA_CRASH_AFTER=<unix time>``, the first process
of any replica to reach that point after that time (not the first start's own steps)
creates the mark file and kills its whole replica (its process group) with SIGKILL,
as a host failure would. Every later process finds the mark and carries on, so the
replica that takes over finishes the same step.

The patch is made at import, outside ``__main__``: ``meshca serve`` spawns its workers,
and a spawned worker imports this file again (as ``__mp_main__``) before it runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from meshca import app

_CRASH_AT = os.environ.get("REPLICA_CRASH_AT")
_MARK = os.environ.get("REPLICA_CRASH_MARK")
_AFTER = float(os.environ.get("REPLICA_CRASH_AFTER", "0"))


def _crash_here(name: str) -> None:
    if name != _CRASH_AT or _MARK is None or time.time() < _AFTER:
        return
    try:
        fd = os.open(_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()} {name}\n".encode())
    os.fsync(fd)
    os.close(fd)
    os.killpg(os.getpgrp(), signal.SIGKILL)


if _CRASH_AT:
    _build = app.build_authorities

    def _build_with_crash(
        settings: Any, engine: Any, clock: Any, checkpoint: Callable[[str], None] | None = None
    ) -> Any:
        return _build(settings, engine, clock, _crash_here)

    app.build_authorities = _build_with_crash  # type: ignore[assignment]


if __name__ == "__main__":
    from meshca.cli import main

    sys.exit(main())
