"""Claiming the agent's Unix socket path safely.

A path that already exists is only taken over when it is a socket nobody listens on (a
previous agent that died); a live socket or any other kind of file is refused, so two
agents never fight over one path and no file is deleted by mistake.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

__all__ = ["SocketPathError", "claim_socket_path"]

#: sockaddr_un's sun_path is 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


class SocketPathError(Exception):
    """The socket path cannot be used; the message says why and what to do."""


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new listening socket, or raise ``SocketPathError``."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketPathError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
            f"at most {MAX_SOCKET_PATH}"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise SocketPathError(f"socket directory {path.parent} does not exist") from None
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(
            f"{path} exists and is not a socket; refusing to replace it (remove it or "
            "choose another --socket)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketPathError(f"cannot tell whether {path} is in use: {exc}") from exc
    else:
        raise SocketPathError(
            f"another process is listening on {path}; refusing to take it over "
            "(stop it or choose another --socket)"
        )
    finally:
        probe.close()
    # A stale socket file from an agent that is gone.
    path.unlink(missing_ok=True)
