"""The agent carries the server's CRLs: Workload API ``crl`` fields and SDS ``ROOTCA``.

A real server and a real ``meshca agent``. After ``meshca revoke --serial`` of the
agent's own SVID, the agent's Workload API streams (X509SVIDResponse and
X509BundlesResponse) and its SDS ``ROOTCA`` validation context carry a CRL, signed by
the SVID's issuer, that lists the serial.
"""

from __future__ import annotations

import asyncio
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe._proto import workload_pb2, workload_pb2_grpc

from meshca.core import der
from tests.integration.agent_harness import AgentProcess, launch_agent, short_dir
from tests.integration.serve_process import REPO
from tests.integration.server_harness import TRUST_DOMAIN, RunningServer, running_server
from tests.integration.test_agent import _SdsClient, _secrets

pytestmark = pytest.mark.integration

SETTINGS = {
    "journal_poll": timedelta(seconds=0.2),
    "max_svid_ttl": timedelta(seconds=60),
    "svid_ttl": timedelta(seconds=60),
    "propagation_delay": timedelta(seconds=60),
}
HEADER = [("workload.spiffe.io", "true")]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, **SETTINGS):
        yield running


@pytest.fixture
def sockets() -> Iterator[Path]:
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def agent(server: RunningServer, sockets: Path) -> AsyncIterator[AgentProcess]:
    running = await asyncio.to_thread(launch_agent, server, sockets)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.stop)


class _Stream:
    """Reads a server stream in a thread; ``next`` waits for the next message."""

    def __init__(self, call: Iterator[object]) -> None:
        self.call = call
        self.messages: queue.Queue[object] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError:
            pass

    def until(self, predicate: object, timeout: float = 20) -> object:
        while True:
            message = self.messages.get(timeout=timeout)
            if predicate(message):  # type: ignore[operator]
                return message


def _certificates(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates, as the Workload API sends chains."""
    found, offset = [], 0
    while offset < len(data):
        _tag, _start, end = der.read(data, offset)
        found.append(x509.load_der_x509_certificate(data[offset:end]))
        offset = end
    return found


def _lists(crls: object, serial: int, issuer: x509.Certificate) -> bool:
    for data in crls:  # type: ignore[attr-defined]
        crl = x509.load_der_x509_crl(data)
        if crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key()):
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                return True
    return False


async def test_agent_serves_the_crl_after_a_revoke(
    server: RunningServer, agent: AgentProcess
) -> None:
    await asyncio.to_thread(agent.wait_health, "SERVING")

    def scenario() -> None:
        channel = grpc.insecure_channel(f"unix:{agent.socket}")
        sds = _SdsClient(agent.socket)
        try:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            svids = _Stream(
                stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60)
            )
            bundles = _Stream(
                stub.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=60
                )
            )
            first = svids.until(lambda m: True)
            chain = _certificates(first.svids[0].x509_svid)  # type: ignore[attr-defined]
            leaf, issuer = chain[0], chain[1]
            # Before: each intermediate's (empty) CRL is already there.
            assert first.crl  # type: ignore[attr-defined]
            assert not _lists(first.crl, leaf.serial_number, issuer)  # type: ignore[attr-defined]

            result = subprocess.run(
                [
                    sys.executable, "-m", "meshca", "revoke",
                    "--data-dir", str(server.settings.data_dir),
                    "--trust-domain", TRUST_DOMAIN,
                    "--serial", f"{leaf.serial_number:x}",
                    "--reason", "agent host compromised",
                ],
                capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr

            def revoked(message: object) -> bool:
                return _lists(message.crl, leaf.serial_number, issuer)  # type: ignore[attr-defined]

            svids.until(revoked)
            bundled = bundles.until(revoked)
            assert bundled.bundles[f"spiffe://{TRUST_DOMAIN}"]  # type: ignore[attr-defined]

            sds.send(resource_names=["ROOTCA"])
            rootca = _secrets(sds.receive())["ROOTCA"].validation_context
            assert rootca.only_verify_leaf_cert_crl
            pem = rootca.crl.inline_bytes
            marker = b"-----BEGIN X509 CRL-----"
            ders = [
                x509.load_pem_x509_crl(marker + part).public_bytes(Encoding.DER)
                for part in pem.split(marker)[1:]
            ]
            assert _lists(ders, leaf.serial_number, issuer)
        finally:
            sds.close()
            channel.close()

    await asyncio.to_thread(scenario)
    assert "CRLs" in agent.log(400)
