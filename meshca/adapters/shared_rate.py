"""``--issuance-rate`` counted once per host: one table in a shared file for every worker.

``meshca serve`` runs a worker process per core, and the kernel spreads connections over
them (SO_REUSEPORT): counted in each worker, a token replayed over many connections
would get ``--workers`` times its rate. Here the supervisor creates a fixed-size file
in the data directory before it starts the workers, each worker maps it, and every
admission runs under an exclusive ``flock`` on it: a few microseconds, only while the
limit is on.

The file is ``issuance-rate-<supervisor pid>.table`` in the data directory. Layout: a
header (magic, count, period in microseconds, slot count), then slots of (64-bit key
digest, 128-bit "full again" time on ``Gcra``'s scale). A key lives in one of ``PROBES``
slots from its digest's home; a key not found takes an empty slot, or one whose bucket
is full again, or else the one closest to full (forgiving that key the little it had
left: gaining from it takes ``slots`` other attested pods at once).

A lock held by a worker that dies is released by the kernel with its file. The file is
removed when the supervisor exits; counts do not outlive a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from datetime import datetime, timedelta
from pathlib import Path

from meshca.core.rate_limit import Gcra, IssuanceRate

__all__ = ["DEFAULT_SLOTS", "PROBES", "SharedRateLimiter", "create_rate_table"]

#: 131,072 slots of 24 bytes: 3 MiB per host, for more pods than a host's CA serves.
DEFAULT_SLOTS = 1 << 17
#: Slots looked at per key: a key's home and the next seven.
PROBES = 8

_MAGIC = b"meshcaR1"
_HEADER = struct.Struct("<8sQQQ")
_SLOT = struct.Struct("<Q16s")
_FILE_PREFIX = "issuance-rate-"
_FILE_SUFFIX = ".table"


def create_rate_table(directory: Path, rate: IssuanceRate, slots: int = DEFAULT_SLOTS) -> Path:
    """Create a fresh table for ``rate`` in ``directory``, named after this process;
    returns its path. Tables left by processes no longer running are removed.

    The file is written under a temporary name and renamed into place, so a process
    still mapping an older file of that name never sees it shrink.
    """
    if slots < PROBES:
        raise ValueError(f"a table needs at least {PROBES} slots")
    _remove_stale(directory)
    path = directory / f"{_FILE_PREFIX}{os.getpid()}{_FILE_SUFFIX}"
    building = path.with_name(path.name + ".new")
    header = _HEADER.pack(_MAGIC, rate.count, rate.period // timedelta(microseconds=1), slots)
    descriptor = os.open(building, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(descriptor, _HEADER.size + slots * _SLOT.size)
        os.pwrite(descriptor, header, 0)
    finally:
        os.close(descriptor)
    os.replace(building, path)
    return path


def _remove_stale(directory: Path) -> None:
    for stale in directory.glob(f"{_FILE_PREFIX}*{_FILE_SUFFIX}"):
        pid = stale.name.removeprefix(_FILE_PREFIX).removesuffix(_FILE_SUFFIX)
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            stale.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedRateLimiter:
    """An ``IssuanceLimiter`` over the table at ``path``, shared with the host's workers."""

    def __init__(self, path: Path, rate: IssuanceRate) -> None:
        self.rate = rate
        self._gcra = Gcra(rate)
        self._descriptor = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._descriptor).st_size
            self._map = mmap.mmap(self._descriptor, size)
        except BaseException:
            os.close(self._descriptor)
            raise
        magic, count, period_us, slots = _HEADER.unpack_from(self._map, 0)
        expected = (_MAGIC, rate.count, rate.period // timedelta(microseconds=1))
        if (magic, count, period_us) != expected or size != _HEADER.size + slots * _SLOT.size:
            self.close()
            raise ValueError(f"{path} is not a rate table for {rate}")
        self._slots = slots

    def admit(self, key: str, now: datetime) -> timedelta | None:
        digest = int.from_bytes(
            hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
        )
        digest = digest or 1  # 0 marks an empty slot
        at = self._gcra.at(now)
        fcntl.flock(self._descriptor, fcntl.LOCK_EX)
        try:
            offset, full_at = self._find(digest, at)
            new_full_at, wait = self._gcra.take(full_at, at)
            if wait is None:
                _SLOT.pack_into(self._map, offset, digest, new_full_at.to_bytes(16, "little"))
            return wait
        finally:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)

    def _find(self, digest: int, at: int) -> tuple[int, int | None]:
        """The slot for ``digest`` and its state (None: a new key's slot)."""
        home = digest % self._slots
        spare, spare_full_at = -1, 0
        for probe in range(PROBES):
            offset = _HEADER.size + ((home + probe) % self._slots) * _SLOT.size
            held, raw = _SLOT.unpack_from(self._map, offset)
            full_at = int.from_bytes(raw, "little")
            if held == digest:
                return offset, full_at
            # The best slot to take: empty or full again first, else the closest to full.
            rank = -1 if held == 0 or full_at <= at else full_at
            if spare < 0 or rank < spare_full_at:
                spare, spare_full_at = offset, rank
        return spare, None

    def close(self) -> None:
        self._map.close()
        os.close(self._descriptor)
