"""Several ``meshca serve`` replicas on one PostgreSQL, each with its own data directory,
and a fleet of proxies spread over them that checks every peer's chain continuously."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from tests.integration.serve_process import ServeProcess, launch
from tests.integration.server_harness import TokenMinter, serve_command

ENTRY = Path(__file__).with_name("replica_main.py")

#: Lifetimes of seconds: a root rotation every ~6 s, an intermediate every ~5 s.
FAST_CA = [
    "--svid-ttl", "4s",
    "--max-svid-ttl", "4s",
    "--propagation-delay", "3s",
    "--root-rotation", "6s",
    "--root-ttl", "60s",
    "--intermediate-ttl", "10s",
    "--journal-poll", "0.25s",
    "--tree-head-interval", "1s",
]  # fmt: skip
AUDIT_TOKEN = "replica-audit-token"

#: One replica is one ``meshca serve`` process tree.
Replica = ServeProcess


def write_kek(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def replica_command(
    data_dir: Path, jwks: Path, database_url: str, kek: Path | None, extra: Sequence[str]
) -> list[str]:
    flags = [
        "--plaintext",
        "--database-url",
        database_url,
        "--audit-token-file",
        str(data_dir.parent / "audit-token"),
        *FAST_CA,
        *extra,
    ]
    if kek is not None:
        flags += ["--key-encryption-key-file", str(kek)]
    command = serve_command(data_dir, jwks, workers=1, extra=flags)
    assert command[1:3] == ["-m", "meshca"]
    return [sys.executable, str(ENTRY), *command[3:]]


def start_replica(
    name: str,
    base: Path,
    jwks: Path,
    database_url: str,
    kek: Path | None,
    *,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Replica:
    """Start replica ``name`` with data dir ``base/name``; with ``wait``, until it serves."""
    (base / "audit-token").write_text(AUDIT_TOKEN + "\n")
    data_dir = base / name
    command = replica_command(data_dir, jwks, database_url, kek, extra)
    return launch(name, data_dir, command, env=env, wait=60 if wait else None)


def leaf_serials_received(proxies: Sequence[Proxy]) -> set[str]:
    return {serial for p in proxies for serial in p.serials}


@dataclass
class Proxy:
    """A workload's proxy: renews at half-life from its replica, follows the bundle,
    and moves to the next replica when its own stops answering (as a Service would)."""

    name: str
    token: str
    replica: int
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    leaf: x509.Certificate | None = None
    intermediates: tuple[x509.Certificate, ...] = ()
    roots: tuple[x509.Certificate, ...] = ()
    renew_at: float = 0.0
    serials: list[str] = field(default_factory=list)
    failovers: int = 0

    def csr(self) -> bytes:
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(self.key, hashes.SHA256())
            .public_bytes(Encoding.DER)
        )


@dataclass
class FleetReport:
    rounds: int = 0
    verifications: int = 0
    failures: list[str] = field(default_factory=list)
    certificates: int = 0
    failovers: int = 0
    bundle_fetches: int = 0
    #: Each bundle sequence seen, with the roots every replica served under it.
    sequences: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    sequence_conflicts: list[str] = field(default_factory=list)


class Fleet:
    """Proxies spread over ``replicas``; ``run`` renews, follows bundles and checks peers."""

    def __init__(self, replicas: list[Replica], minter: TokenMinter, size: int) -> None:
        self.replicas = replicas
        self.proxies = [
            Proxy(f"p{i}", minter.mint(f"ns{i % 3}", f"sa{i}"), i % len(replicas))
            for i in range(size)
        ]
        self.report = FleetReport()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, replica: Replica) -> ca_pb2_grpc.CertificateServiceStub:
        channel = self._channels.get(replica.target)
        if channel is None:
            channel = self._channels[replica.target] = grpc.aio.insecure_channel(replica.target)
        return ca_pb2_grpc.CertificateServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def run(self, stop: asyncio.Event, check_every: float = 0.25) -> FleetReport:
        tasks = [asyncio.create_task(self._live(p, stop)) for p in self.proxies]
        try:
            while not stop.is_set():
                await self._check_round()
                try:
                    await asyncio.wait_for(stop.wait(), check_every)
                except TimeoutError:
                    pass
            await self._check_round()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.report

    async def _live(self, proxy: Proxy, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if time.monotonic() >= proxy.renew_at:
                    await self._renew(proxy)
                await self._follow_bundle(proxy)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                proxy.failovers += 1
                self.report.failovers += 1
                proxy.replica = (proxy.replica + 1) % len(self.replicas)
                continue
            try:
                await asyncio.wait_for(stop.wait(), 0.3)
            except TimeoutError:
                pass

    async def _renew(self, proxy: Proxy) -> None:
        stub = self._stub(self.replicas[proxy.replica])
        response = await stub.Sign(
            ca_pb2.SignRequest(csr=proxy.csr()),
            metadata=[("authorization", f"Bearer {proxy.token}")],
            timeout=3,
        )
        issued = time.monotonic()
        leaf = x509.load_pem_x509_certificate(response.certificate.encode())
        proxy.leaf = leaf
        proxy.intermediates = tuple(
            x509.load_pem_x509_certificate(p.encode()) for p in response.intermediates
        )
        proxy.roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in response.bundle)
        proxy.serials.append(response.serial)
        self.report.certificates += 1
        # Half of what is left (notBefore is backdated for clock skew).
        left = (leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        proxy.renew_at = issued + left / 2

    async def _follow_bundle(self, proxy: Proxy) -> None:
        stub = self._stub(self.replicas[proxy.replica])
        bundle = await stub.GetTrustBundle(ca_pb2.GetTrustBundleRequest(), timeout=3)
        proxy.roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in bundle.roots)
        self._note_sequence(bundle)

    def _note_sequence(self, bundle: ca_pb2.TrustBundle) -> None:
        self.report.bundle_fetches += 1
        roots = tuple(p.encode() for p in bundle.roots)
        known = self.report.sequences.setdefault(bundle.sequence, roots)
        if known != roots:
            self.report.sequence_conflicts.append(
                f"sequence {bundle.sequence} served with {len(known)} and {len(roots)} roots"
            )

    async def _check_round(self) -> None:
        """Every proxy checks every peer with its own roots, and with each live replica's."""
        now = datetime.now(UTC)
        bundles = [p.roots for p in self.proxies if p.leaf is not None]
        for replica in self.replicas:
            if replica.alive:
                try:
                    bundle = await self._stub(replica).GetTrustBundle(
                        ca_pb2.GetTrustBundleRequest(), timeout=3
                    )
                except grpc.aio.AioRpcError:
                    continue  # dying as we ask; its proxies move on
                self._note_sequence(bundle)
                bundles.append(
                    tuple(x509.load_pem_x509_certificate(p.encode()) for p in bundle.roots)
                )
        peers = [p for p in self.proxies if p.leaf is not None]
        for roots in set(bundles):
            verifier = PolicyBuilder().store(Store(list(roots))).time(now).build_client_verifier()
            for peer in peers:
                assert peer.leaf is not None
                self.report.verifications += 1
                try:
                    verifier.verify(peer.leaf, list(peer.intermediates))
                except VerificationError as error:
                    self.report.failures.append(
                        f"{now:%H:%M:%S.%f}: {peer.name}'s leaf {peer.serials[-1]} under "
                        f"{len(roots)} roots: {error}"
                    )
        self.report.rounds += 1
