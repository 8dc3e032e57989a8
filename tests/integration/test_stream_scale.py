"""10,000 concurrent streams against a real ``meshca serve`` process (issue 8, "Streams
must scale"): WatchTrustBundle and audit Export hold no thread per stream.

The server is ``meshca serve --workers 1`` in a subprocess: a supervisor (it runs the
host's record writer) and one worker process below it that serves every call. Threads
and resident memory are summed over that process tree from ``/proc/<pid>/status``, so
they are the server's alone, not the test's client threads. The worker, found as the
process listening on the port, must hold exactly the test's ``CHANNELS`` connections.
A sampler thread in the test reads the tree every few milliseconds for the whole test;
the peak, and the value while every stream is open, must stay within
``baseline + THREAD_GROWTH``.

Why that bound: a thread per stream would add 10,000 threads. What may legitimately grow
under load is bounded by configuration, not by streams: asyncio's default executor
(``asyncio.to_thread``: the rotator, the audit reader) starts threads lazily up to
``min(32, cpus + 4)``, and grpc's own thread pool adds a few threads when it is busy.
``THREAD_GROWTH`` = 40 covers the executor at its cap on any machine plus a few grpc
threads, and is 250 times below one thread per stream.

All 10,000 calls are sent at once. grpc's server queues calls that arrived but that
grpc.aio has not yet picked up, and cancels them (CANCELLED) once that queue passes
``grpc.server.max_pending_requests`` (grpc's default 1,000, hard limit 3,000): with those
defaults this burst lost thousands of calls. meshca raises the limits, and the burst
checks that none is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc, ca_pb2, ca_pb2_grpc
from meshca.cli.ca_cmd import load_bundle
from tests.core.builders import csr_pem
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter, serve_command

# One event loop for the module: grpc.aio delivers the last events of 10,000 cancelled
# calls a little after the test that opened them ends, and they need a loop still open.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

STREAMS = 10_000
#: Client connections the streams are spread over, each channel its own: 625 streams
#: each, within the server's HTTP/2 MAX_CONCURRENT_STREAMS (ConnectionLimits, 1,024).
CHANNELS = 16
#: Calls opened before waiting for their first answers (see the module docstring).
WAVE = STREAMS
#: How many threads the server may add while the streams are open (module docstring).
THREAD_GROWTH = 40
#: Resident memory the server may add per open stream, KiB. grpc.aio itself takes about
#: 23 KiB per open server stream (a bare grpc.aio server with a one-line async generator
#: handler, measured on a 2-core machine); meshca adds 2-7 KiB. 64 KiB leaves room for
#: allocator noise but not for a per-stream buffer or thread stack.
RSS_PER_STREAM_KIB = 64
AUDIT_TOKEN = "audit-token-scale-3d1f"
MESHCA = [sys.executable, "-m", "meshca"]


def _proc_status(pid: int) -> tuple[int, int]:
    """(threads, VmRSS in KiB) of process ``pid``."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return tree


def _tree_status(pid: int) -> tuple[int, int]:
    """Threads and VmRSS (KiB) summed over ``pid`` and every process below it."""
    threads = rss = 0
    for member in _process_tree(pid):
        with contextlib.suppress(FileNotFoundError):
            member_threads, member_rss = _proc_status(member)
            threads += member_threads
            rss += member_rss
    return threads, rss


def _sockets(pid: int, port: int, state: str) -> list[int]:
    """Remote ports of process ``pid``'s TCP sockets in ``state`` (/proc/net/tcp's hex
    code: 01 ESTABLISHED, 0A LISTEN) whose local port is ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    peers = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local, peer = (int(address.rsplit(":", 1)[1], 16) for address in cols[1:3])
            # The inode ties the socket to this process: the table is the namespace's.
            if cols[3] == state and local == port and cols[9] in inodes:
                peers.append(peer)
    return sorted(peers)


def _check_connections(served: ServeProcess) -> None:
    # The process counted as the worker is the one holding the test's connections, one
    # per channel; the test's streams cannot be anywhere else.
    peers = _sockets(served.worker_pid, served.port, "01")
    assert len(peers) == CHANNELS, f"the worker's connections come from ports {peers}"


class Sampler:
    """Reads the threads and RSS of a process tree every ``interval`` s, on a thread of its
    own (the test's event loop is busy with 10,000 streams); keeps the peaks. The tree is
    walked anew each time, so a process started per stream would be counted too."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-sampler", daemon=True)
        self.peak_threads, self.peak_rss_kib = _tree_status(pid)
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            threads, rss = _tree_status(self._pid)
            self.peak_threads = max(self.peak_threads, threads)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ServeProcess:
    """``meshca serve --workers 1`` in a subprocess; its output is collected by a thread."""

    process: subprocess.Popen[str]
    port: int
    data_dir: Path
    minter: TokenMinter
    output: list[str] = field(default_factory=list, repr=False)

    @property
    def pid(self) -> int:
        """The ``meshca serve`` process: the supervisor, with its workers below it."""
        return self.process.pid

    @property
    def worker_pid(self) -> int:
        """The process that accepts connections on the port: the worker."""
        listening = [p for p in _process_tree(self.pid) if _sockets(p, self.port, "0A")]
        assert len(listening) == 1, f"processes listening on {self.port}: {listening}"
        return listening[0]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def roots_pem(self) -> bytes:
        return b"".join(r.public_bytes(Encoding.PEM) for r in load_bundle(self.data_dir))

    def channel(self, *options: tuple[str, Any]) -> grpc.aio.Channel:
        """A TLS channel with a connection of its own (no subchannel shared with others)."""
        return grpc.aio.secure_channel(
            self.target,
            grpc.ssl_channel_credentials(self.roots_pem()),
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.use_local_subchannel_pool", 1),
                *options,
            ],
        )

    def status(self) -> tuple[int, int]:
        """Threads and RSS (KiB) of every meshca process: supervisor and workers."""
        assert self.process.poll() is None, "".join(self.output[-50:])
        return _tree_status(self.pid)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One server for the module: starting and stopping one costs seconds. Neither test
    depends on the other having run, or not, before it."""
    tmp_path = tmp_path_factory.mktemp("stream-scale")
    minter, jwks = TokenMinter.create(tmp_path)
    token_file = tmp_path / "audit-token"
    token_file.write_text(AUDIT_TOKEN + "\n")
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    process = subprocess.Popen(
        serve_command(
            data_dir,
            jwks,
            workers=1,
            extra=["--journal-poll", "0.1s", "--audit-token-file", str(token_file)],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    listening = threading.Event()
    port: list[int] = []

    def collect() -> None:
        # Read to the end, so the server never blocks on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                listening.set()
        listening.set()

    reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    reader.start()
    try:
        assert listening.wait(60) and port, "".join(output)
        yield ServeProcess(process, port[0], data_dir, minter, output)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, "".join(output[-50:])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
            if process.stdout:
                process.stdout.close()


class Streams:
    """``CHANNELS`` channels and the calls opened over them; on exit every call is
    cancelled before the channels close, whatever happened."""

    def __init__(self, served: ServeProcess, *options: tuple[str, Any]) -> None:
        self.channels = [served.channel(*options) for _ in range(CHANNELS)]
        self.calls: list[Any] = []

    async def open(
        self, open_call: Callable[[grpc.aio.Channel], Any], check_first: Callable[[Any], None]
    ) -> list[Any]:
        """Open ``STREAMS`` calls spread over the channels, ``WAVE`` at a time; each call's
        first message is read and checked before the next wave is sent."""
        while len(self.calls) < STREAMS:
            wave = [
                open_call(self.channels[i % CHANNELS])
                for i in range(len(self.calls), min(STREAMS, len(self.calls) + WAVE))
            ]
            self.calls.extend(wave)
            firsts = await asyncio.wait_for(asyncio.gather(*(c.read() for c in wave)), 60)
            for first in firsts:
                check_first(first)
        return self.calls

    async def __aenter__(self) -> Streams:
        return self

    async def __aexit__(self, *_: object) -> None:
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close()


def _check_threads(label: str, threads: int, baseline: int) -> None:
    assert threads <= baseline + THREAD_GROWTH, (
        f"{label}: the server runs {threads} threads with {STREAMS} streams open "
        f"(baseline {baseline}, allowed growth {THREAD_GROWTH})"
    )


def _check_rss(label: str, rss_kib: int, baseline_kib: int) -> None:
    grown = rss_kib - baseline_kib
    assert grown <= STREAMS * RSS_PER_STREAM_KIB, (
        f"{label}: server RSS grew by {grown // 1024} MiB for {STREAMS} streams "
        f"({grown / STREAMS:.1f} KiB each; allowed {RSS_PER_STREAM_KIB})"
    )


async def _issue(
    served: ServeProcess, channel: grpc.aio.Channel, sa: str
) -> list[x509.Certificate]:
    response = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
        istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()),
        metadata=[("authorization", f"Bearer {served.minter.mint('default', sa)}")],
        timeout=30,
    )
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in response.cert_chain]


def _report(label: str, **values: object) -> None:
    # Shown with -s or on failure; the figures issue 8 asks for.
    print(f"[{label}] " + " ".join(f"{k}={v}" for k, v in values.items()))


async def test_ten_thousand_trust_bundle_watchers_without_a_thread_each(
    served: ServeProcess,
) -> None:
    """10,000 watchers get the bundle; with all of them connected the CA still issues, and
    a root rotation made by the CLI reaches every one of them as sequence 3 (version 2
    added the first JWT-SVID key)."""
    first_roots = load_bundle(served.data_dir)
    first_pems = [r.public_bytes(Encoding.PEM).decode() for r in first_roots]
    assert len(first_pems) == 1
    base_threads, base_rss = served.status()
    started = time.monotonic()

    def check_initial(bundle: Any) -> None:
        assert bundle.sequence == 2 and list(bundle.roots) == first_pems
        assert bundle.trust_domain == TRUST_DOMAIN

    async with Streams(served) as streams:
        with Sampler(served.pid) as sampler:
            calls = await streams.open(
                lambda ch: ca_pb2_grpc.CertificateServiceStub(ch).WatchTrustBundle(
                    ca_pb2.WatchTrustBundleRequest()
                ),
                check_initial,
            )
            opened = time.monotonic() - started
            # Every watcher is connected: measure now, not after they close.
            assert not any(c.done() for c in calls)
            _check_connections(served)
            open_threads, open_rss = served.status()
            worker_threads = _proc_status(served.worker_pid)[0]
            _check_threads("all watchers open", open_threads, base_threads)
            _check_rss("all watchers open", open_rss, base_rss)

            # The CA still issues while 10,000 watchers are connected.
            issue_started = time.monotonic()
            chain = await _issue(served, streams.channels[0], "web")
            issue_seconds = time.monotonic() - issue_started
            assert chain[-1] == first_roots[0]
            sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
                f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
            ]

            # A root rotation by the CLI, against the same data directory: the server
            # picks it up from the journal and must tell every watcher.
            rotate = await asyncio.to_thread(
                subprocess.run,
                [
                    *MESHCA,
                    "ca",
                    "rotate",
                    "--root",
                    "--data-dir",
                    str(served.data_dir),
                    "--trust-domain",
                    TRUST_DOMAIN,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert rotate.returncode == 0, rotate.stderr
            assert "prepare-root" in rotate.stdout
            rotated = time.monotonic()
            new_roots = load_bundle(served.data_dir)
            assert len(new_roots) == 2 and new_roots[0] == first_roots[0]
            new_pems = [r.public_bytes(Encoding.PEM).decode() for r in new_roots]
            updates = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 60)
            propagated = time.monotonic() - rotated
            assert len(updates) == STREAMS
            assert {u.sequence for u in updates} == {3}
            assert all(list(u.roots) == new_pems for u in updates)
            # Still all open after the update, and still no thread per watcher.
            assert not any(c.done() for c in calls)
            after_threads, after_rss = served.status()
            _check_threads("after the update", after_threads, base_threads)
    _check_threads("peak while watching", sampler.peak_threads, base_threads)
    _check_rss("peak while watching", sampler.peak_rss_kib, base_rss)
    assert sampler.samples > 10, "the sampler must have watched the whole test"
    _report(
        "watch",
        streams=STREAMS,
        open_s=f"{opened:.1f}",
        threads_baseline=base_threads,
        threads_open=open_threads,
        threads_open_worker=worker_threads,
        threads_after_update=after_threads,
        threads_peak=sampler.peak_threads,
        rss_baseline_mib=base_rss // 1024,
        rss_open_mib=open_rss // 1024,
        rss_after_update_mib=after_rss // 1024,
        rss_peak_mib=sampler.peak_rss_kib // 1024,
        issue_ms=f"{issue_seconds * 1000:.0f}",
        update_to_all_s=f"{propagated:.2f}",
        samples=sampler.samples,
    )


async def test_ten_thousand_audit_exports_in_flight_without_a_thread_each(
    served: ServeProcess,
) -> None:
    """10,000 slow auditors: each Export has sent its first entry and waits for the
    client to read on; the server holds all 10,000 calls at once.

    The export channels announce a one-byte HTTP/2 lookahead window and no BDP probing,
    so a server can send a call's next entry only once the client asks for it: the
    handlers cannot finish while the test holds back, whatever the server's speed.
    """
    slow_reader = (("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0))
    async with Streams(served, *slow_reader) as streams:
        serials = set()
        for sa in ("cart", "web"):
            chain = await _issue(served, streams.channels[0], sa)
            serials.add(f"{chain[0].serial_number:x}")
        metadata = [("authorization", f"Bearer {AUDIT_TOKEN}")]
        reference = audit_pb2_grpc.AuditServiceStub(streams.channels[0]).Export(
            audit_pb2.ExportRequest(), metadata=metadata, timeout=30
        )
        expected = [entry async for entry in reference]
        # The log holds a few records, newest first: the server's own serving certificate,
        # the two above, and the one the watch test issued if it ran first.
        assert 3 <= len(expected) <= 4
        assert {e.record.serial for e in expected} >= serials
        assert [e.record.api for e in expected].count("meshca.serving-certificate") == 1
        leaves = [e.leaf_index for e in expected]
        assert leaves == sorted(leaves, reverse=True) == list(range(len(expected) - 1, -1, -1))
        expected_bytes = [e.SerializeToString(deterministic=True) for e in expected]

        def check_first(entry: Any) -> None:
            assert entry.SerializeToString(deterministic=True) == expected_bytes[0]

        async def rest(call: Any) -> list[bytes]:
            entries = []
            while (entry := await call.read()) is not grpc.aio.EOF:
                entries.append(entry.SerializeToString(deterministic=True))
            assert await call.code() == grpc.StatusCode.OK
            return entries

        base_threads, base_rss = served.status()
        started = time.monotonic()
        with Sampler(served.pid) as sampler:
            calls = await streams.open(
                lambda ch: audit_pb2_grpc.AuditServiceStub(ch).Export(
                    audit_pb2.ExportRequest(), metadata=metadata, timeout=120
                ),
                check_first,
            )
            opened = time.monotonic() - started
            # All 10,000 calls are in flight: measure now, before the test reads on.
            assert not any(c.done() for c in calls)
            _check_connections(served)
            held_threads, held_rss = served.status()
            worker_threads = _proc_status(served.worker_pid)[0]
            _check_threads("all exports in flight", held_threads, base_threads)
            _check_rss("all exports in flight", held_rss, base_rss)

            results = await asyncio.wait_for(asyncio.gather(*(rest(c) for c in calls)), 120)
            finished = time.monotonic() - started
    assert len(results) == STREAMS
    assert all(result == expected_bytes[1:] for result in results)
    _check_threads("peak while exporting", sampler.peak_threads, base_threads)
    _check_rss("peak while exporting", sampler.peak_rss_kib, base_rss)
    assert sampler.samples > 10, "the sampler must have watched the whole test"
    _report(
        "export",
        streams=STREAMS,
        entries_each=len(expected),
        open_s=f"{opened:.1f}",
        all_done_s=f"{finished:.1f}",
        threads_baseline=base_threads,
        threads_in_flight=held_threads,
        threads_in_flight_worker=worker_threads,
        threads_peak=sampler.peak_threads,
        rss_baseline_mib=base_rss // 1024,
        rss_in_flight_mib=held_rss // 1024,
        rss_peak_mib=sampler.peak_rss_kib // 1024,
        samples=sampler.samples,
    )
